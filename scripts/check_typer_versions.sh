#!/usr/bin/env bash
# Run the command-line contract tests (usage errors, help, exit codes) against typer/click versions
# the pyproject allows, each installed into its own folder put first on PYTHONPATH (the .venv stays
# as it is). Needs the package registry. Usage: scripts/check_typer_versions.sh [SPEC ...]
# where SPEC is "typer==X[,click==Y]"; the default list is the edges of the allowed range.
set -uo pipefail
cd "$(dirname "$0")/.."
specs=("$@")
[ ${#specs[@]} -gt 0 ] || specs=(
  "typer==0.24.0,click==8.2.1" "typer==0.24.0,click==8.5.1" "typer==0.25.1,click==8.2.1"
  "typer==0.25.1,click==8.5.1" "typer==0.26.0" "typer==0.27.0" "typer==0.28.0" "typer==0.29.2"
)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
status=0
for spec in "${specs[@]}"; do
  target="$root/${spec//[=,]/_}"
  if ! .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --target "$target" ${spec//,/ } \
      >"$target.log" 2>&1; then
    echo "$spec: cannot install ($(tail -1 "$target.log"))"; status=1; continue
  fi
  if PYTHONPATH="$target" .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_cli_errors.py \
      -k "usage or subcommand or help or exit_codes or data_check" >"$target.out" 2>&1; then
    echo "$spec: $(tail -1 "$target.out")"
  else
    echo "$spec: FAILED: $(tail -1 "$target.out")"; status=1
  fi
done
exit $status
