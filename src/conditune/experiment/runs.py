"""The layout of an experiment folder, and what identifies its configuration.

::

    experiment.json                the resolved config and its fingerprint (another config is refused)
    runs/<arm>/seed<k>/plan.json   what the arm trains (names / LoRA section) and its expected LLM parameter count
    runs/<arm>/seed<k>/train/      the trainer's output.dir: metrics.jsonl (train + eval records), checkpoints/, final/
    runs/<arm>/seed<k>/done.json   written last: the run is finished and is skipped on a re-run
    results.csv, summary.md, *.png  rebuilt from the above at the end of every invocation
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from conditune.config import to_dict

DONE = "done.json"
PLAN = "plan.json"
INFO = "experiment.json"
# keys of the experiment section that change what a run computes (arms, seeds, shard may change freely)
RESULT_KEYS = ("count", "scan", "exclude", "lora_targets", "lora_rank", "kappa_lora_rank", "lora_alpha_ratio",
               "heldout_text", "heldout_limit", "max_tokens", "instructions", "instructions_limit",
               "agreement_new_tokens")  # fmt: skip


def run_dir(output: str | Path, arm: str, seed: int) -> Path:
    return Path(output) / "runs" / arm / f"seed{seed}"


def is_done(output: str | Path, arm: str, seed: int) -> bool:
    return (run_dir(output, arm, seed) / DONE).is_file()


def fingerprint(cfg) -> str:
    """sha256 (16 hex digits) of what decides the runs' results: the training recipe and the result keys."""
    e = to_dict(cfg.experiment)
    doc = {"recipe": to_dict(cfg.recipe()), **{k: e[k] for k in RESULT_KEYS}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]
