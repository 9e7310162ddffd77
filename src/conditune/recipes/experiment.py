"""The experiment recipe: train and evaluate every (arm, seed), resumably, then rebuild the report.

The folder layout is :mod:`conditune.experiment.runs`'s. Identical footing: every run of seed k uses
``training.seed = k``, which fixes the batch order (a pure function of the data and the seed), the
adaptor's initialisation and the dropout masks; steps, warmup and schedule come from the shared recipe.
The trainer records a chained hash of the batches it consumed (``data_sha``) and the learning rates in
``metrics.jsonl``; the report checks that they agree across arms. A killed run resumes from its last
checkpoint (one is written at every evaluation), so evaluations already logged are kept.

Shared alignment stage (``experiment.share_alignment`` with ``training.align_steps > 0``): the CTC alignment
of the adaptor does not involve the LLM, so it is the same for every arm of a seed. It runs once per seed
(``runs/_align/seed<k>``, the LLM frozen, stopped with a checkpoint at ``align_steps``) and every arm of that
seed, the long-horizon runs included, starts its main phase from it (``training.init_from``); each run logs
hashes of the adaptor state it started from and the report checks they agree.

Per-item results: at every evaluation the hook appends to ``train/eval_items.jsonl`` the per-utterance word
errors of the dev set and the probe's per-item numbers (:meth:`ForgettingResult.items`), from which the report
draws paired bootstrap intervals.

``experiment.json`` (the config, its fingerprint, the machine and the dates) is written once the first run has
finished, so a command that fails before any run completes leaves the folder free for the corrected one.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from conditune.config import to_dict
from conditune.errors import CondituneError
from conditune.experiment.config import ExperimentConfig, load_experiment_config, parse_shard
from conditune.experiment.runs import (
    DONE,
    INFO,
    ITEMS,
    PLAN,
    align_dir,
    fingerprint,
    is_done,
    long_dir,
    machine_history,
    run_dir,
    write_items,
)
from conditune.io import atomic_write_json
from conditune.machine import machine_description

ALIGN_WAIT_S = 10.0  # another shard's alignment stage: how often to look for it


def load_probe(cfg: ExperimentConfig):
    """The forgetting probe: held-out texts and instruction prompts per language, the knowledge questions."""
    from conditune.evaluation.forgetting import (
        DEFAULT_INSTRUCTIONS,
        ForgettingProbe,
        read_knowledge_questions,
        read_texts,
    )

    e = cfg.experiment
    texts = {lang: read_texts(path, limit=e.heldout_limit) for lang, path in sorted(e.heldout_text.items())}
    for lang, rows in texts.items():
        if not rows:
            raise CondituneError(f"experiment.heldout_text.{lang}: {e.heldout_text[lang]} holds no text")
    source = e.instructions if e.instructions is not None else DEFAULT_INSTRUCTIONS
    langs = sorted(texts) or sorted(source)
    prompts = {lang: list(source.get(lang, []))[: e.instructions_limit] for lang in langs if source.get(lang)}
    questions = read_knowledge_questions(e.knowledge_probe) if e.knowledge_probe else []
    if e.knowledge_probe and not questions:
        raise CondituneError(f"experiment.knowledge_probe: {e.knowledge_probe} holds no question")
    return ForgettingProbe(texts, prompts, e.metric_batch, e.max_tokens, e.agreement_new_tokens, questions=questions,
                           knowledge_count=e.knowledge_questions, knowledge_seed=e.knowledge_seed,
                           knowledge_max_tokens=e.knowledge_max_tokens)  # fmt: skip


def dev_items(train_dir: Path) -> list[list[Any]]:
    """Per dev utterance of the evaluation just written: ``[audio, language, word errors, reference words]``."""
    from conditune.evaluation.wer import utterance_errors
    from conditune.io import read_jsonl

    path = train_dir / "eval_predictions.jsonl"
    if not path.is_file():
        return []
    rows = read_jsonl(path)
    errors = utterance_errors([r["reference"] for r in rows], [r["hypothesis"] for r in rows],
                              [r["language"] for r in rows])  # fmt: skip
    return [[r["audio"], r["language"], e, w] for r, (e, w) in zip(rows, errors)]


def forgetting_hook(probe, llm_config, train_dir: Path | None = None, *, knowledge_from: int = 0):
    """The trainer's evaluation hook: the probe on (base LLM, the model's LLM), flattened into the eval record;
    with ``train_dir``, the per-item numbers of this evaluation appended to ``train_dir/eval_items.jsonl``. The
    knowledge questions run at evaluations from step ``knowledge_from`` on."""
    from conditune.evaluation.pair import load_base_llm

    def hook(step: int, model, processor) -> dict[str, float]:
        base = load_base_llm(llm_config, model.device)
        measured = probe.measure(base, model.llm, processor.tokenizer, knowledge=step >= knowledge_from)
        if train_dir is not None:
            write_items(train_dir / ITEMS, {"step": step, "dev": dev_items(train_dir), **measured.items()})
        return measured.flat()

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
                "choose another --output (only experiment.arms, seeds, shard and long_horizon.arms/seeds may change "
                "between runs)"
            )
    return fp


def planned_runs(cfg: ExperimentConfig) -> list[tuple[str, int, bool]]:
    """Every (arm, seed, long horizon?) of the config, main grid first (seed by seed), then the long-horizon runs."""
    e = cfg.experiment
    runs = [(arm, seed, False) for seed in e.seeds for arm in e.arms]
    long_seeds = e.long_horizon.seeds or e.seeds
    return runs + [(arm, seed, True) for seed in long_seeds for arm in e.long_horizon.arms]


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
    fp = check_folder(out, cfg)  # a report too: its summary names this config's fingerprint
    if report_only:
        if not any(is_done(out, a, s) for a in cfg.experiment.arms for s in cfg.experiment.seeds):
            raise CondituneError(f"{out}: no finished run of these arms and seeds to report on")
    else:
        from conditune.io import check_writable

        check_writable(out, folder=True)
        runs = planned_runs(cfg)
        if cfg.experiment.shard:
            i, n = parse_shard(cfg.experiment.shard)
            runs = [r for k, r in enumerate(runs) if k % n == i]
        skipped = [r for r in runs if is_done(out, *r)]
        for arm, seed, long in skipped:
            log(f"{_label(arm, long)} seed {seed}: done, skipped")
        todo = [r for r in runs if r not in skipped]
        if todo:
            ran = _run_all(cfg, out, todo, fp, log)
    report = build_report(out, cfg)
    log(f"report: {out / 'summary.md'}")
    return {"ran": [(a, s) for a, s, long in ran if not long], "ran_long": [(a, s) for a, s, long in ran if long],
            "skipped": [(a, s) for a, s, long in skipped if not long], **report}  # fmt: skip


def _label(arm: str, long: bool) -> str:
    return f"{arm} (long horizon)" if long else arm


def _run_all(cfg: ExperimentConfig, out: Path, todo: list[tuple[str, int, bool]], fp: str, log) -> list:
    from conditune.experiment.arms import load_scan, needs_full_spectrum, plan_arms

    records, meta = load_scan(cfg, log)
    full = load_scan(cfg, log, spectrum="full")[0] if needs_full_spectrum(cfg) else None
    probe = load_probe(cfg)
    plans_by_seed: dict[int, dict] = {}
    arms = list(dict.fromkeys([*cfg.experiment.arms, *cfg.experiment.long_horizon.arms]))
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    _own_alignment_stages(cfg, out, todo, log)
    ran = []
    for arm, seed, long in todo:
        if seed not in plans_by_seed:
            plans_by_seed[seed] = plan_arms(cfg, records, seed, meta, full_records=full, arms=arms)
        init_from = _alignment_for(cfg, out, seed, log)
        _run_one(cfg, out, arm, seed, plans_by_seed[seed][arm], probe, log, init_from=init_from, long=long)
        _claim(out, cfg, fp, started)  # a run finished: the folder is this config's
        ran.append((arm, seed, long))
    return ran


def _claim(out: Path, cfg: ExperimentConfig, fp: str, started: str) -> None:
    info = out / INFO
    old: dict[str, Any] = {}
    if info.is_file():
        with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
            old = json.loads(info.read_text())
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    machine = machine_description()
    atomic_write_json(info, {"fingerprint": fp, "config": to_dict(cfg),
                             "first_run_started_at": old.get("first_run_started_at") or started, "updated_at": now,
                             "machine": machine, "machines": machine_history(old, machine, started, now)})  # fmt: skip


# ---------------------------------------------------------------------------------------------- alignment stage


def shares_alignment(cfg: ExperimentConfig) -> bool:
    return bool(cfg.experiment.share_alignment and cfg.training.align_steps)


def _own_alignment_stages(cfg: ExperimentConfig, out: Path, todo, log) -> None:
    """The alignment stages this process runs first: every seed it needs (without shards), or the seeds whose
    index in ``experiment.seeds`` falls to its shard (the other shards wait for them)."""
    if not shares_alignment(cfg):
        return
    seeds = list(dict.fromkeys(seed for _, seed, _ in todo))
    if cfg.experiment.shard:
        i, n = parse_shard(cfg.experiment.shard)
        every = list(dict.fromkeys([*cfg.experiment.seeds, *cfg.experiment.long_horizon.seeds]))
        seeds = [s for k, s in enumerate(every) if k % n == i]
    for seed in seeds:
        run_alignment(cfg, out, seed, log)


def run_alignment(cfg: ExperimentConfig, out: Path, seed: int, log) -> Path:
    """The shared alignment stage of ``seed`` (the LLM frozen, stopped at ``align_steps`` with a checkpoint),
    unless it is done; returns its checkpoint. A done stage whose checkpoint is gone (a folder copied without
    weights) is trained again and used only if it reproduces the adaptor the seed's runs started from."""
    from conditune.training import checkpoint as ckpt
    from conditune.training import trainer

    folder = align_dir(out, seed)
    recorded = json.loads((folder / DONE).read_text()) if (folder / DONE).is_file() else None
    if recorded is not None:
        if Path(recorded["checkpoint"]).is_dir():
            return Path(recorded["checkpoint"])
        _refuse_other_cpu(recorded, seed, folder / DONE)
        log(f"alignment stage seed {seed}: its checkpoint {recorded['checkpoint']} is gone; training it again, to be "
            "used only if it reproduces the recorded adaptor")  # fmt: skip
    train_dir = folder / "train"
    tc = cfg.train_config_for(seed, train_dir, {"mode": "none"})
    resume = bool(ckpt.list_checkpoints(train_dir))
    tc.output.overwrite = not resume
    log(f"alignment stage seed {seed}: {'resuming' if resume else 'training'} ({tc.training.align_steps} CTC steps, "
        "shared by every arm of the seed)")  # fmt: skip
    a = tc.training.align_steps
    result = trainer.train(tc, resume=resume, stop_at=a, log=lambda m: log(f"  [align/{seed}] {m}"))
    if result.step != a:
        raise CondituneError(f"alignment stage seed {seed} stopped at step {result.step}, not {a}")
    checkpoint = ckpt.checkpoints_root(train_dir) / f"step-{a:08d}"
    sha = checkpoint_adaptor_sha(checkpoint)
    if recorded is not None and recorded.get("adaptor_sha") != sha:
        raise CondituneError(
            f"alignment stage seed {seed}: trained again, its adaptor ({sha[:12]}) differs from the one the seed's "
            f"finished runs started from ({str(recorded.get('adaptor_sha'))[:12]}; float results can differ between "
            f"machines): remove {folder / DONE} to go on from the new one (the report flags the runs that started "
            "from the old one), or run another seed"
        )
    atomic_write_json(folder / DONE, {"seed": seed, "checkpoint": str(checkpoint.resolve()), "step": a,
                                      "machine": machine_description(), "adaptor_sha": sha,
                                      "align_seconds_per_step": result.align_seconds_per_step,
                                      "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                      **({"first": recorded} if recorded else {})})  # fmt: skip
    return checkpoint


def _refuse_other_cpu(recorded: dict, seed: int, done: Path) -> None:
    """Before training a gone stage again: one trained on another CPU does not reproduce (float rounding differs
    between CPUs; seen for AMD EPYC -> Intel Xeon), so say so now rather than after the stage."""
    then = (recorded.get("machine") or {}).get("cpu")
    now = machine_description()["cpu"]
    if then and then != now:
        raise CondituneError(
            f"alignment stage seed {seed} ran on {then} and its checkpoint is gone: trained again on this {now} it "
            f"would not reproduce the adaptor the seed's runs started from: finish the seed on a {then}, remove "
            f"{done} to start the seed afresh here, or run another seed"
        )


def checkpoint_adaptor_sha(checkpoint: Path) -> str:
    """The adaptor hash (:meth:`Trainer.main_start_record`'s) of a saved checkpoint's adaptor and CTC head."""
    from safetensors.torch import load_file

    from conditune.speech.modeling import WEIGHTS_NAME
    from conditune.training.checkpoint import tensors_sha

    state = load_file(str(checkpoint / WEIGHTS_NAME))
    return tensors_sha({k[len("adaptor.") :]: v for k, v in state.items() if k.startswith("adaptor.")})


def _alignment_for(cfg: ExperimentConfig, out: Path, seed: int, log) -> Path | None:
    """The checkpoint a run of ``seed`` starts its main phase from (None: no shared stage); under shards, waits
    for the shard that runs it."""
    if not shares_alignment(cfg):
        return None
    done = align_dir(out, seed) / DONE
    if not cfg.experiment.shard:
        return run_alignment(cfg, out, seed, log)
    if not done.is_file():
        log(f"waiting for the alignment stage of seed {seed} (another shard runs it)")
    while not done.is_file():
        time.sleep(ALIGN_WAIT_S)
    return Path(json.loads(done.read_text())["checkpoint"])


# ---------------------------------------------------------------------------------------------- one run


def _run_one(cfg: ExperimentConfig, out: Path, arm: str, seed: int, plan, probe, log, *, init_from, long) -> None:
    from conditune.training import checkpoint as ckpt
    from conditune.training import trainer

    folder = long_dir(out, arm, seed) if long else run_dir(out, arm, seed)
    train_dir = folder / "train"
    tc = cfg.train_config_for(seed, train_dir, plan.trainable, init_from=init_from, long_horizon=long)
    resume = bool(ckpt.list_checkpoints(train_dir))
    if not resume:
        tc.output.overwrite = True  # a run killed before its first checkpoint starts afresh
        (train_dir / ITEMS).unlink(missing_ok=True)
    plan_doc = {"arm": arm, "seed": seed, "long_horizon": long, "trainable": plan.trainable,
                "expected_llm_params": plan.llm_params, "note": plan.note,
                "init_from": str(init_from) if init_from else None}  # fmt: skip
    atomic_write_json(folder / PLAN, plan_doc)
    label = _label(arm, long)
    log(f"{label} seed {seed}: {'resuming' if resume else 'training'} ({plan.note})")
    started = time.monotonic()
    last = tc.training.align_steps + tc.training.max_steps
    knowledge_from = last if cfg.experiment.knowledge_at == "last" else 0
    hook = forgetting_hook(probe, tc.model.llm, train_dir, knowledge_from=knowledge_from)
    result = trainer.train(tc, resume=resume, log=lambda m: log(f"  [{label}/{seed}] {m}"), eval_hook=hook)
    if result.stopped != "max_steps":
        raise CondituneError(f"{label} seed {seed} stopped early ({result.stopped})")
    atomic_write_json(folder / DONE, {
        "arm": arm,
        "seed": seed,
        "long_horizon": long,
        "result": result.to_dict(),
        "note": plan.note,
        "expected_llm_params": plan.llm_params,
        "machine": machine_description(),  # where it trained: a folder's runs may come from several machines
        "this_invocation_s": round(time.monotonic() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })  # fmt: skip
    if not cfg.experiment.keep_checkpoints:
        shutil.rmtree(ckpt.checkpoints_root(train_dir), ignore_errors=True)
