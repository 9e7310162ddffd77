"""Run every (arm, seed) of an experiment, resumably, and rebuild the report.

Layout of ``DIR``::

    experiment.json            the resolved config and its fingerprint (a different config is refused)
    runs/<arm>/seed<k>/plan.json   what the arm trains (names / LoRA section) and its expected LLM parameter count
    runs/<arm>/seed<k>/train/  the trainer's output_dir: metrics.jsonl (train + eval records), checkpoints/, final/
    runs/<arm>/seed<k>/done.json   written last: the run is finished and is skipped on a re-run
    results.csv, summary.md, *.png  rebuilt from the above at the end of every invocation

Identical footing: every run of seed k uses ``train.seed = k``, which fixes the batch order (a pure
function of the data and the seed), the adaptor's initialisation and the dropout masks; steps,
warmup and schedule come from the shared ``train`` section. The trainer records a chained hash of the
batches it consumed (``data_sha``) and the learning rates in ``metrics.jsonl``; the report checks that
they agree across arms. A killed run resumes from its last checkpoint (one is written at every
evaluation), so evaluations already logged are kept and the rest are recomputed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from conditune.errors import CondituneError
from conditune.experiment.config import ExperimentConfig, load_experiment_config, parse_shard, to_dict
from conditune.io import atomic_write_json

DONE = "done.json"
PLAN = "plan.json"

# keys of the experiment section that change what a run computes (arms, seeds, shard may change freely)
_RESULT_KEYS = (
    "count",
    "scan",
    "exclude",
    "lora_targets",
    "lora_rank",
    "kappa_lora_rank",
    "lora_alpha_ratio",
    "heldout_text",
    "heldout_limit",
    "max_tokens",
    "instructions",
    "instructions_limit",
    "agreement_new_tokens",
)


def run_dir(output: Path, arm: str, seed: int) -> Path:
    return Path(output) / "runs" / arm / f"seed{seed}"


def fingerprint(cfg: ExperimentConfig) -> str:
    e = asdict(cfg.experiment)
    doc = {"train_data": cfg.train_data, **{k: e[k] for k in _RESULT_KEYS}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_probes(cfg: ExperimentConfig) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(held-out texts per language, instruction prompts per language)."""
    from conditune.evaluation.forgetting import DEFAULT_INSTRUCTIONS, read_texts

    e = cfg.experiment
    texts = {lang: read_texts(path, limit=e.heldout_limit) for lang, path in sorted(e.heldout_text.items())}
    for lang, rows in texts.items():
        if not rows:
            raise CondituneError(f"experiment.heldout_text.{lang}: {e.heldout_text[lang]} holds no text")
    source = e.instructions if e.instructions is not None else DEFAULT_INSTRUCTIONS
    langs = sorted(texts) or sorted(source)
    prompts = {lang: list(source.get(lang, []))[: e.instructions_limit] for lang in langs if source.get(lang)}
    return texts, prompts


class _BaseLLM:
    """The untouched base LLM, loaded once per process and shared by every run's forgetting probes."""

    def __init__(self):
        self.key, self.model = None, None

    def get(self, llm_config, device):
        from conditune.speech.modeling import load_llm

        key = json.dumps(asdict(llm_config), sort_keys=True)
        if self.key != key:
            self.model = None
            model = load_llm(llm_config)
            model.requires_grad_(False)
            model.eval()
            self.key, self.model = key, model
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        return self.model


def make_hook(cfg: ExperimentConfig, texts, prompts, base: _BaseLLM, llm_config) -> Callable[[int, Any], dict]:
    from conditune.evaluation.forgetting import greedy_agreement, text_metrics

    e = cfg.experiment

    def hook(step: int, model) -> dict[str, float]:
        started = time.monotonic()
        base_llm = base.get(llm_config, model.device)
        out: dict[str, float] = {}
        changes, kls, agreements = [], [], []
        for lang, rows in texts.items():
            m = text_metrics(
                base_llm, model.llm, model.tokenizer, rows, batch_size=e.metric_batch, max_tokens=e.max_tokens
            )
            change = m["perplexity_adapted"] / m["perplexity_base"] - 1.0
            out.update(
                {
                    f"ppl_base_{lang}": m["perplexity_base"],
                    f"ppl_adapted_{lang}": m["perplexity_adapted"],
                    f"ppl_change_{lang}": change,
                    f"kl_{lang}": m["kl_to_base"],
                }
            )
            changes.append(change)
            kls.append(m["kl_to_base"])
        for lang, rows in prompts.items():
            a = greedy_agreement(base_llm, model.llm, model.tokenizer, rows, max_new_tokens=e.agreement_new_tokens)
            out.update({f"agreement_{lang}": a["agreement"], f"exact_{lang}": a["exact"]})
            agreements.append(a["agreement"])
        if changes:
            out["ppl_change"] = sum(changes) / len(changes)
            out["kl"] = sum(kls) / len(kls)
        if agreements:
            out["agreement"] = sum(agreements) / len(agreements)
        out["forgetting_s"] = round(time.monotonic() - started, 3)
        return out

    return hook


def run_experiment(
    config: ExperimentConfig | str | Path | dict,
    output: str | Path,
    overrides=(),
    *,
    log: Callable[[str], None] | None = None,
    report_only: bool = False,
) -> dict[str, Any]:
    """Train and evaluate every (arm, seed) not yet done in ``output``, then rebuild the report there."""
    from conditune.experiment.arms import load_scan, plan_arms
    from conditune.experiment.report import build_report

    log = log or (lambda msg: None)
    cfg = config if isinstance(config, ExperimentConfig) else load_experiment_config(config, overrides)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(cfg)
    info_path = out / "experiment.json"
    if info_path.is_file():
        try:
            old = json.loads(info_path.read_text()).get("fingerprint")
        except json.JSONDecodeError:
            old = None
        if old not in (None, fp):
            raise CondituneError(
                f"{out} holds an experiment with another configuration (fingerprint {old}, now {fp}): "
                "choose another --output (only experiment.arms, seeds and shard may change between runs)"
            )
    atomic_write_json(info_path, {"fingerprint": fp, "config": to_dict(cfg)})

    ran, skipped = [], []
    if not report_only:
        runs = [(arm, seed) for seed in cfg.experiment.seeds for arm in cfg.experiment.arms]
        if cfg.experiment.shard:
            i, n = parse_shard(cfg.experiment.shard)
            runs = [r for k, r in enumerate(runs) if k % n == i]
        todo = [r for r in runs if not (run_dir(out, *r) / DONE).is_file()]
        skipped = [r for r in runs if r not in todo]
        for arm, seed in skipped:
            log(f"{arm} seed {seed}: done, skipped")
        if todo:
            records, meta = load_scan(cfg, log)
            texts, prompts = load_probes(cfg)
            base = _BaseLLM()
            plans_by_seed: dict[int, dict] = {}
            for arm, seed in todo:
                if seed not in plans_by_seed:
                    plans_by_seed[seed] = plan_arms(cfg, records, seed, meta)
                _run_one(cfg, out, arm, seed, plans_by_seed[seed][arm], texts, prompts, base, log)
                ran.append((arm, seed))
    report = build_report(out, cfg)
    log(f"report: {out / 'summary.md'}")
    return {"ran": ran, "skipped": skipped, **report}


def _run_one(cfg: ExperimentConfig, out: Path, arm: str, seed: int, plan, texts, prompts, base, log) -> None:
    from conditune.training import checkpoint as ckpt
    from conditune.training.trainer import train

    folder = run_dir(out, arm, seed)
    train_dir = folder / "train"
    tc = cfg.train_config_for(seed, train_dir, plan.trainable)
    resume = bool(ckpt.list_checkpoints(train_dir))
    if not resume:
        tc.train.overwrite = True  # a run killed before its first checkpoint starts afresh
    atomic_write_json(
        folder / PLAN,
        {
            "arm": arm,
            "seed": seed,
            "trainable": plan.trainable,
            "expected_llm_params": plan.llm_params,
            "note": plan.note,
        },
    )
    log(f"{arm} seed {seed}: {'resuming' if resume else 'training'} ({plan.note})")
    started = time.monotonic()
    result = train(
        tc,
        resume=resume,
        log=lambda m: log(f"  [{arm}/{seed}] {m}"),
        eval_hook=make_hook(cfg, texts, prompts, base, tc.model.llm),
    )
    if result.stopped != "max_steps":
        raise CondituneError(f"{arm} seed {seed} stopped early ({result.stopped})")
    atomic_write_json(
        folder / DONE,
        {
            "arm": arm,
            "seed": seed,
            "result": result.to_dict(),
            "note": plan.note,
            "expected_llm_params": plan.llm_params,
            "this_invocation_s": round(time.monotonic() - started, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )
    if not cfg.experiment.keep_checkpoints:
        shutil.rmtree(ckpt.checkpoints_root(train_dir), ignore_errors=True)
