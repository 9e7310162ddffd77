"""The layout of an experiment folder, and what identifies its configuration.

::

    experiment.json                the resolved config, its fingerprint, the dates, the machine of the last
                                   invocation and the machines of all (``machines``)
    runs/<arm>/seed<k>/plan.json   what the arm trains (names / LoRA / OSF section), its expected LLM parameter count
    runs/<arm>/seed<k>/train/      the trainer's output.dir: metrics.jsonl (train + eval + main_start records),
                                   eval_items.jsonl (per-item results of every evaluation), checkpoints/, final/
    runs/<arm>/seed<k>/done.json   written last: the run is finished and is skipped on a re-run
    runs/_align/seed<k>/           the seed's shared alignment stage (train/checkpoints/step-<align_steps>, done.json)
    runs/_long/<arm>/seed<k>/      a long-horizon run (experiment.long_horizon), laid out like a main run
    results.csv, summary.md, *.png  rebuilt from the above at the end of every invocation

Arm names never start with ``_``, so the shared folders cannot collide with an arm's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from conditune.config import to_dict

DONE = "done.json"
PLAN = "plan.json"
INFO = "experiment.json"
ITEMS = "eval_items.jsonl"
# keys of the experiment section that change what a run computes (arms, seeds, shard may change freely)
RESULT_KEYS = ("count", "scan", "exclude", "lora_targets", "lora_rank", "kappa_lora_rank", "lora_alpha_ratio",
               "heldout_text", "heldout_limit", "max_tokens", "instructions", "instructions_limit",
               "agreement_new_tokens")  # fmt: skip
# Keys added since the first experiments were run (2026-12-02). Each enters the fingerprint only when it differs
# from the value it had before it existed, so a folder made before it still resumes under the same fingerprint.
ADDED_EXPERIMENT_KEYS: dict[str, Any] = {
    "pissa_init": "pissa_niter_4",
    "osf_targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "osf_rank": "match",
    "knowledge_probe": None,
    "knowledge_questions": 500,
    "knowledge_seed": 0,
    "knowledge_max_tokens": 320,
    "knowledge_at": "every",
    "long_horizon.steps_multiplier": 4,
    "long_horizon.evaluations": 8,
}
ADDED_RECIPE_KEYS: dict[str, Any] = {
    "model.trainable.lora.init": "default",
    "model.trainable.osf": {"effective_rank": None, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {}},
    "training.init_from": None,
    "optimizer.fused": False,
}


def run_dir(output: str | Path, arm: str, seed: int) -> Path:
    return Path(output) / "runs" / arm / f"seed{seed}"


def long_dir(output: str | Path, arm: str, seed: int) -> Path:
    return Path(output) / "runs" / "_long" / arm / f"seed{seed}"


def align_dir(output: str | Path, seed: int) -> Path:
    return Path(output) / "runs" / "_align" / f"seed{seed}"


def is_done(output: str | Path, arm: str, seed: int, long: bool = False) -> bool:
    return ((long_dir if long else run_dir)(output, arm, seed) / DONE).is_file()


def _dotted(doc: dict[str, Any], key: str) -> tuple[dict[str, Any] | None, str]:
    *parents, last = key.split(".")
    for part in parents:
        doc = doc.get(part) if isinstance(doc, dict) else None
        if doc is None:
            return None, last
    return doc, last


def _drop_defaults(doc: dict[str, Any], added: dict[str, Any]) -> None:
    for key, default in added.items():
        parent, last = _dotted(doc, key)
        if parent is not None and parent.get(last) == default:
            del parent[last]


def fingerprint(cfg) -> str:
    """sha256 (16 hex digits) of what decides the runs' results: the training recipe and the result keys."""
    e = to_dict(cfg.experiment)
    recipe = to_dict(cfg.recipe())
    _drop_defaults(recipe, ADDED_RECIPE_KEYS)
    added = {}
    for key, default in ADDED_EXPERIMENT_KEYS.items():
        parent, last = _dotted(e, key)
        if parent is not None and last in parent and parent[last] != default:
            added[key] = parent[last]
    doc = {"recipe": recipe, **{k: e[k] for k in RESULT_KEYS}, **added}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_items(path: str | Path) -> dict[int, dict[str, Any]]:
    """step -> the per-item record of that evaluation (the last one written for a step wins)."""
    from conditune.io import read_jsonl

    path = Path(path)
    if not path.is_file():
        return {}
    return {int(r["step"]): r for r in read_jsonl(path) if isinstance(r, dict) and "step" in r}


def write_items(path: Path, record: dict[str, Any]) -> None:
    """Add one evaluation's per-item record, dropping any of the same or a later step (left by a killed run that
    resumed from an earlier checkpoint); the file is replaced atomically."""
    from conditune.io import atomic_write_text

    kept = [r for step, r in sorted(read_items(path).items()) if step < int(record["step"])]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in [*kept, record]))


def machine_history(old: dict[str, Any], machine: dict[str, Any], started: str, now: str) -> list[dict[str, Any]]:
    """Every kind of machine the folder's invocations ran on, in order, each with when it was first and last seen (a
    folder written before the history was kept starts it with its one recorded machine)."""
    from conditune.machine import same_machine

    history = [dict(m) for m in old.get("machines") or []]
    if not history and old.get("machine"):
        history = [
            {**old["machine"], "first_seen": old.get("first_run_started_at"), "last_seen": old.get("updated_at")}
        ]
    entry = {k: v for k, v in machine.items() if k != "load_average"}
    if history and same_machine(history[-1], entry):
        history[-1]["last_seen"] = now
    else:
        history.append({**entry, "first_seen": started, "last_seen": now})
    return history
