#!/usr/bin/env bash
# Run poft-mlx's offline test suite on MLX's CUDA backend (an NVIDIA machine without
# network access). The mlx-cuda-13 wheel (90 MB) travels in two parts, .dev/wa/part_aa and
# .dev/wb/part_ab (made with `split -b 46000000`), beside the mlx, mlx-lm and gguf wheels
# for the machine's Python; its other dependencies (nvidia-* CUDA 13 libraries, torch,
# transformers, peft, pytest) are expected to be installed there already.
#   first call : mkdir -p /tmp/w && cp .dev/wa/* /tmp/w/
#   second call: bash scripts/cuda_check.sh  (carrying .dev/wb)
set -uo pipefail
cp .dev/wb/* /tmp/w/ 2>/dev/null
cd /tmp/w && cat part_aa part_ab > mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl && cd - >/dev/null
echo "94cb48fba73e5ee39467e51c35c51c691123359ca17bafd1a24cf92ad6732bee  /tmp/w/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl" | sha256sum -c - || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/w/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD POFT_MLX_QUIET_BLAS=1
python3 - <<'PY'
import mlx.core as mx
print("mlx", mx.__version__, "default device:", mx.default_device(), "cuda:", mx.cuda.is_available())
import poft_mlx.device as d
print("poft-mlx backend:", d.backend())
PY
python3 -m pytest -q -ra -p no:cacheprovider -m "not real and not distributed and not slow" \
  tests/test_losses.py tests/test_render.py tests/test_config.py tests/test_data.py tests/test_train.py \
  tests/test_dpo.py tests/test_export.py tests/test_report.py 2>&1 | tee "${OUT:-/tmp}/cuda_tests.log" | tail -25
