#!/usr/bin/env bash
# Set up conditune on a fresh machine: a virtual environment in .venv with the CPU build of
# PyTorch and conditune itself (--dev adds the test tools), plus, when run as root, the Debian
# packages for speech synthesis and texts: espeak-ng, MBROLA voices, SVOX Pico, festival, flite,
# fortunes, fortunes-de, trans-de-en. Pico and MBROLA are in Debian's contrib and non-free
# sections: on Debian they are enabled in a private apt sources file of conditune's own.
# Without root, or when apt fails, setup goes on and says in one line which engines are missing
# (`conditune data synth` skips them). Re-running is cheap: what is already there is kept.
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

main_packages="espeak-ng flite festival festvox-kallpc16k festvox-us-slt-hts fortunes fortunes-de trans-de-en"
nonfree_packages="libttspico-utils mbrola mbrola-us1 mbrola-us2 mbrola-en1 mbrola-de1 mbrola-de3 mbrola-de5 mbrola-de7"
sources_file=/etc/apt/sources.list.d/conditune-contrib-non-free.sources

missing_packages() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || printf '%s ' "$p"
  done
}

# contrib + non-free for this Debian release, from the same mirror as its main archive (deb822).
enable_contrib_non_free() {
  [ -r /etc/os-release ] || return 1
  local id codename uri keyring
  id=$(. /etc/os-release && echo "${ID:-}")
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  [ "$id" = debian ] && [ -n "$codename" ] || return 1
  uri=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v -e security -e conditune | awk '{print $2}' | grep -m1 debian || true)
  [ -n "$uri" ] || uri=$(grep -hsE '^deb .*debian' /etc/apt/sources.list 2>/dev/null | grep -v security | awk '{print $2}' | head -1 || true)
  [ -n "$uri" ] || uri=http://deb.debian.org/debian
  keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  local content="Types: deb
URIs: $uri
Suites: $codename $codename-updates
Components: contrib non-free
Signed-By: $keyring"
  [ -f "$sources_file" ] && [ "$(cat "$sources_file")" = "$content" ] && return 0
  printf '%s\n' "$content" >"$sources_file"
}

wanted=$(missing_packages $main_packages $nonfree_packages)
if [ -n "$wanted" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    enable_contrib_non_free || echo "setup: not Debian: contrib/non-free not enabled (Pico and MBROLA may be missing)" >&2
    export DEBIAN_FRONTEND=noninteractive
    if apt-get update -qq >/dev/null 2>&1; then
      # One transaction for speed; if a package is not found (no non-free here), main's alone.
      # shellcheck disable=SC2086
      apt-get install -y -qq --no-install-recommends $wanted >/dev/null 2>&1 ||
        apt-get install -y -qq --no-install-recommends $(missing_packages $main_packages) >/dev/null 2>&1 ||
        echo "setup: apt-get install failed: speech engines may be missing" >&2
    else
      echo "setup: apt-get update failed: no Debian packages installed" >&2
    fi
  elif ! command -v espeak-ng >/dev/null; then
    # No root: espeak-ng from a wheel; texts come from PyPI (or conditune data synth --text).
    $pip install espeakng-loader
    echo "setup: not root, so no Debian packages; using the espeakng-loader wheel for espeak-ng" >&2
  fi
fi
.venv/bin/python - <<'EOF' >&2 || true
from conditune.data.engines import VOICES, missing_engines, voice_installed

missing = missing_engines()
voices = sorted({v.package for v in VOICES if v.engine not in missing and not voice_installed(v)})
parts = [f"{name} (apt-get install {package})" for name, package in missing.items()]
parts += [f"voice package {package}" for package in voices]
if parts:
    print("setup: speech engines missing (conditune data synth skips them): " + "; ".join(parts))
EOF
echo "setup: done (.venv ready)" >&2
