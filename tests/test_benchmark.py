"""scripts/benchmark.py end to end on the real SmolLM2 from PyPI, every section, tiny sizes.

Speed is not asserted (benchmarks report it; tests do not time things): this checks that every
section runs, that the contenders see the same batches, and that the report holds every target.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.real
def test_benchmark_runs_every_section(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--attribution", "--json-out", str(out),
           "--batch-size", "2", "--max-len", "96", "--lora-layers", "2", "--warmup", "1", "--steps", "1",
           "--rounds", "1", "--score-batch-size", "2", "--score-batches", "1", "--vocab-size", "8192",
           "--vocab-batches", "1,2", "--quant-batch-size", "1", "--compile-steps", "1",
           "--gen-batch-size", "2", "--gen-batches", "1", "--gen-max-tokens", "6",
           "--scale-sizes", "20,40", "--scale-models", "smollm2-135m-instruct", "--no-scale-train"]
    scratch = tmp_path / "tmp"  # the benchmark's temporary folders (the scale section's converted models, runs)
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    # nothing of ours left behind (the scale section once leaked 0.5-16 GB a run); mlx/ is MLX's own
    # cache of compiled CPU kernels (a few MB), kept on purpose between runs
    assert sorted(p.name for p in scratch.iterdir()) in ([], ["mlx"])
    res = json.loads(out.read_text())
    names = {c["name"] for c in res["train"]["contenders"]}
    assert {"poft-mlx PoFT (cached r_ref)", "poft-mlx SFT", "mlx-lm lora SFT", "poft-mlx PoFT (resident r_ref)",
            "poft-mlx PoFT, MLX's own ops (no CPU kernels)", "mlx-lm lora SFT + poft-mlx CPU kernels"} == names
    assert all(c.get("same_batches", True) for c in res["train"]["contenders"] + res["long"]["contenders"])
    assert res["long"]["mean_length"] == 96  # every joined chat cut to exactly --max-len tokens
    for section in ("train", "long", "score"):
        for c in res[section]["contenders"]:
            assert c["tok_s"] > 0 and 0 < c["mfu"] < 1.5 and c["peak_gb"] > 0, (section, c)
    assert len(res["vocab"]["rows"]) == 2 + 2  # poft-mlx and plain at batches 1 and 2
    assert {r["name"] for r in res["quant"]["rows"]} == {"float32", "dequantize + matmul", "quantized_matmul"}
    rows = res["compile"]["rows"]
    assert [r["setting"] for r in rows] == ["repeated batch", "GSM8K batches"]
    assert all(r["speedup"] > 0 and r["compiled_shapes"] <= r["eager_shapes"] for r in rows), rows
    gen = {c["name"]: c for c in res["generate"]["contenders"]}
    assert len(gen) == 3 and all(c["tokens"] > 0 and c["tok_s"] > 0 for c in gen.values()), gen
    # greedy, float32 both: poft-mlx's batched generation produces mlx-lm's own tokens
    assert gen["poft-mlx generate"]["same_tokens_as_mlx_lm_float32"], gen
    scale = res["scale"]["models"]["smollm2-135m-instruct"]
    assert [r["records"] for r in scale["rows"]] == [20, 40]
    assert all(r["fit_many_rec_s"] > 0 and r["prep_peak_rss_gb"] > 0 for r in scale["rows"])
    assert "fit_length_rec_s" in scale["rows"][0] and set(scale["exponents"]) >= {"fit_many_rec_s", "score_cache_load_s"}
    targets = {name: value for name, value, _, _ in res["targets"]}
    assert len(targets) == 9 and all(math.isfinite(v) for v in targets.values()), targets
    assert "targets" in r.stdout and "PoFT training MFU at length 96" in r.stdout
