#!/usr/bin/env bash
# Set up conditune on a fresh machine: a virtual environment in .venv with the CPU build of
# PyTorch and conditune itself (--dev adds the test tools), plus the Debian packages for speech
# synthesis and texts (espeak-ng, flite, fortunes, fortunes-de) when run as root.
# Re-running is cheap: what is already there is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=".venv/bin/python -m pip --disable-pip-version-check -q"
# The CPU build first: an unpinned torch would pull GBs of CUDA packages on this kind of machine.
.venv/bin/python -c "import torch" 2>/dev/null || $pip install torch==2.13.0
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
$pip install -e ".${extras}"

if ! command -v espeak-ng >/dev/null || [ ! -d /usr/share/games/fortunes ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng flite fortunes fortunes-de >/dev/null
  else
    # No root: espeak-ng from a wheel; texts must then come from files (conditune data synth --text).
    $pip install espeakng-loader
    echo "setup: not root, so no Debian packages; using the espeakng-loader wheel for speech synthesis" >&2
  fi
fi
echo "setup: done (.venv ready)" >&2
