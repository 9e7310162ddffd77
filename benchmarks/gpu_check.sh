#!/usr/bin/env bash
# The GPU check of issue #16: one script, under 5 minutes on one H200, results in results/gpu/.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine (python3 with torch+CUDA there)
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # here: the same logic at toy sizes on the CPU (~1 min)
#
# On the device tool: run it from the repository root with a timeout that leaves room for a rerun, e.g.
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=420)
# Results are copied to $OUT when it is set (the device tool brings $OUT back).
# conditune is used from src/ (nothing is installed). The trainer reads audio with soundfile; if the
# machine lacks it, carry wheels in .whl/ (see /work/.library/device/README.md), e.g. here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl soundfile cffi pycparser
# and name .whl in the run's carry: the wheels are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " == *" --cpu-dry-run "* && -x .venv/bin/python ]]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export CONDITUNE_HOME=${CONDITUNE_HOME:-$(mktemp -d)}
OUTPUT=results/gpu
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do [[ "${args[i]}" == --output ]] && OUTPUT=${args[i + 1]}; done
mkdir -p "$OUTPUT"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUTPUT/nvidia_smi.txt"
"$PY" -c "import torch, transformers, safetensors, scipy, soundfile; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
    || echo "gpu_check: a module is missing (soundfile: see the header of this script); the train part will fail"
timeout 290 "$PY" benchmarks/gpu_check.py "$@" 2>&1 | tee "$OUTPUT/gpu_check.log"
status=${PIPESTATUS[0]}
[[ -n "${OUT:-}" && -d "${OUT:-}" ]] && cp "$OUTPUT"/gpu_check.json "$OUTPUT"/gpu_check.md "$OUTPUT"/gpu_check.log "$OUTPUT"/nvidia_smi.txt "$OUT"/ 2> /dev/null
exit "$status"
