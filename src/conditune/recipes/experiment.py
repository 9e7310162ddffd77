"""The experiment recipe: train and evaluate every (arm, seed), resumably, then rebuild the report.

The folder layout is :mod:`conditune.experiment.runs`'s. Identical footing: every run of seed k uses
``training.seed = k``, which fixes the batch order (a pure function of the data and the seed), the
adaptor's initialisation and the dropout masks; steps, warmup and schedule come from the shared recipe.
The trainer records a chained hash of the batches it consumed (``data_sha``) and the learning rates in
``metrics.jsonl``; the report checks that they agree across arms. A killed run resumes from its last
checkpoint (one is written at every evaluation), so evaluations already logged are kept.

``experiment.json`` (the config and its fingerprint) is written once the first run has finished, so a
command that fails before any run completes leaves the folder free for the corrected one.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from conditune.config import to_dict
from conditune.errors import CondituneError
from conditune.experiment.config import ExperimentConfig, load_experiment_config, parse_shard
from conditune.experiment.runs import DONE, INFO, PLAN, fingerprint, is_done, run_dir
from conditune.io import atomic_write_json


def load_probe(cfg: ExperimentConfig):
    """The forgetting probe: held-out texts and instruction prompts per language."""
    from conditune.evaluation.forgetting import DEFAULT_INSTRUCTIONS, ForgettingProbe, read_texts

    e = cfg.experiment
    texts = {lang: read_texts(path, limit=e.heldout_limit) for lang, path in sorted(e.heldout_text.items())}
    for lang, rows in texts.items():
        if not rows:
            raise CondituneError(f"experiment.heldout_text.{lang}: {e.heldout_text[lang]} holds no text")
    source = e.instructions if e.instructions is not None else DEFAULT_INSTRUCTIONS
    langs = sorted(texts) or sorted(source)
    prompts = {lang: list(source.get(lang, []))[: e.instructions_limit] for lang in langs if source.get(lang)}
    return ForgettingProbe(texts, prompts, e.metric_batch, e.max_tokens, e.agreement_new_tokens)


def forgetting_hook(probe, llm_config) -> Callable[[int, Any, Any], dict[str, float]]:
    """The trainer's evaluation hook: the probe on (base LLM, the model's LLM), flattened into the eval record."""
    from conditune.evaluation.pair import load_base_llm

    def hook(step: int, model, processor) -> dict[str, float]:
        base = load_base_llm(llm_config, model.device)
        return probe.measure(base, model.llm, processor.tokenizer).flat()

    return hook


def check_folder(out: Path, cfg: ExperimentConfig) -> str:
    """This config's fingerprint; one error line when ``out`` holds an experiment with another one."""
    fp = fingerprint(cfg)
    info = out / INFO
    if info.is_file():
        try:
            old = json.loads(info.read_text()).get("fingerprint")
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        if old not in (None, fp):
            raise CondituneError(
                f"{out} holds an experiment with another configuration (fingerprint {old}, now {fp}): "
                "choose another --output (only experiment.arms, seeds and shard may change between runs)"
            )
    return fp


def run_experiment(
    config: ExperimentConfig | str | Path | Mapping[str, Any],
    output: str | Path,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    *,
    log: Callable[[str], None] | None = None,
    report_only: bool = False,
) -> dict[str, Any]:
    """Train and evaluate every (arm, seed) not yet done in ``output``, then rebuild the report there."""
    from conditune.experiment.report import build_report

    log = log or (lambda msg: None)
    cfg = config if isinstance(config, ExperimentConfig) else load_experiment_config(config, overrides)
    out = Path(output)
    ran, skipped = [], []
    if report_only:
        if not any(is_done(out, a, s) for a in cfg.experiment.arms for s in cfg.experiment.seeds):
            raise CondituneError(f"{out}: no finished run of these arms and seeds to report on")
    else:
        from conditune.io import check_writable

        check_writable(out, folder=True)
        fp = check_folder(out, cfg)
        runs = [(arm, seed) for seed in cfg.experiment.seeds for arm in cfg.experiment.arms]
        if cfg.experiment.shard:
            i, n = parse_shard(cfg.experiment.shard)
            runs = [r for k, r in enumerate(runs) if k % n == i]
        skipped = [r for r in runs if is_done(out, *r)]
        for arm, seed in skipped:
            log(f"{arm} seed {seed}: done, skipped")
        todo = [r for r in runs if r not in skipped]
        if todo:
            ran = _run_all(cfg, out, todo, fp, log)
    report = build_report(out, cfg)
    log(f"report: {out / 'summary.md'}")
    return {"ran": ran, "skipped": skipped, **report}


def _run_all(cfg: ExperimentConfig, out: Path, todo: list[tuple[str, int]], fp: str, log) -> list[tuple[str, int]]:
    from conditune.experiment.arms import load_scan, plan_arms

    records, meta = load_scan(cfg, log)
    probe = load_probe(cfg)
    plans_by_seed: dict[int, dict] = {}
    ran = []
    for arm, seed in todo:
        if seed not in plans_by_seed:
            plans_by_seed[seed] = plan_arms(cfg, records, seed, meta)
        _run_one(cfg, out, arm, seed, plans_by_seed[seed][arm], probe, log)
        atomic_write_json(out / INFO, {"fingerprint": fp, "config": to_dict(cfg)})  # a run finished: claim it
        ran.append((arm, seed))
    return ran


def _run_one(cfg: ExperimentConfig, out: Path, arm: str, seed: int, plan, probe, log) -> None:
    from conditune.training import checkpoint as ckpt
    from conditune.training import trainer

    folder = run_dir(out, arm, seed)
    train_dir = folder / "train"
    tc = cfg.train_config_for(seed, train_dir, plan.trainable)
    resume = bool(ckpt.list_checkpoints(train_dir))
    if not resume:
        tc.output.overwrite = True  # a run killed before its first checkpoint starts afresh
    plan_doc = {"arm": arm, "seed": seed, "trainable": plan.trainable, "expected_llm_params": plan.llm_params,
                "note": plan.note}  # fmt: skip
    atomic_write_json(folder / PLAN, plan_doc)
    log(f"{arm} seed {seed}: {'resuming' if resume else 'training'} ({plan.note})")
    started = time.monotonic()
    result = trainer.train(
        tc, resume=resume, log=lambda m: log(f"  [{arm}/{seed}] {m}"), eval_hook=forgetting_hook(probe, tc.model.llm)
    )
    if result.stopped != "max_steps":
        raise CondituneError(f"{arm} seed {seed} stopped early ({result.stopped})")
    atomic_write_json(folder / DONE, {
        "arm": arm,
        "seed": seed,
        "result": result.to_dict(),
        "note": plan.note,
        "expected_llm_params": plan.llm_params,
        "this_invocation_s": round(time.monotonic() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })  # fmt: skip
    if not cfg.experiment.keep_checkpoints:
        shutil.rmtree(ckpt.checkpoints_root(train_dir), ignore_errors=True)
