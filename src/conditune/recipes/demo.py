"""``conditune demo``: the whole method end to end on a CPU in a fixed wall-clock budget.

The recipe is ``configs/speech_demo.yaml`` (its training sections, its ``synth:`` and its ``demo:`` section);
the demo adds only what its budget and its own stages decide (:func:`budget_overrides`). Stages, each
printed with its elapsed time (long ones show progress bars with an ETA):

1. **models** — fetch SmolLM2-135M-Instruct (GGUF) and Whisper base (CTranslate2), re-hash the files.
2. **calibrate** — synthesise and encode the dev and test sets and a few training utterances, select the
   ``demo.count`` lowest-κ tensors (scan cached by fingerprint), then time a few alignment and main
   steps, transcription, the forgetting probes and Whisper's decoder on them: the speeds of this machine
   (:class:`~conditune.recipes.demo_plan.Speeds`).
3. **plan** — the data size and the alignment and main steps that fit what is left of the budget
   (:func:`~conditune.recipes.demo_plan.plan_budget`).
4. **data** — the training set of that size (the calibration's utterances reused), encoded once.
5. **train** — :class:`~conditune.training.trainer.Trainer` on the adaptor + the selected tensors.
6. **evaluate** — WER with 95 % intervals on the test set and on the held-out-voice test set, Whisper's own
   decoder on the same audio as the reference row, forgetting of the LLM alone on held-out general text
   (perplexity, KL per language) and greedy agreement on instructions.
7. **report** — ``metrics.json``, ``report.md``, ``predictions.jsonl``, ``training.png``, ``kappa_selected.png``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from conditune.config import load_config
from conditune.data.synth import SynthConfig
from conditune.errors import CondituneError
from conditune.io import atomic_write_json, atomic_write_text
from conditune.recipes.demo_plan import DemoPlan
from conditune.training.config import TrainConfig, training_part
from conditune.validation import require_range

STAGES = ("models", "calibrate", "plan", "data", "train", "evaluate", "report")
MIN_MINUTES = 5.0  # below this no budget holds model loading, calibration, training and evaluation
LANGUAGES = ("en", "de")


@dataclass
class DemoSettings:
    output: str = "runs/demo"
    minutes: float = 30.0
    count: int = 100  # lowest-kappa tensors to train
    dev_per_language: int = 20
    test_per_language: int = 100
    heldout_voice_per_language: int | None = None  # None: as many as test
    heldout: int = 100  # held-out sentences per language for the forgetting metrics
    agreement_prompts: int = 10  # English DEFAULT_INSTRUCTIONS for greedy agreement (0: skip)
    whisper_reference: bool = False  # Whisper's own decoder on the test audio, the reference row
    align_share: float = 0.35  # of the training time, for the CTC alignment stage
    main_epochs: float = 1.0  # passes of the main steps over the training set: the budget buys data, not passes
    max_train_per_language: int = 8000
    calibration_utterances: int = 16  # training utterances per language timed before planning
    train_per_language: int | None = None  # fixed instead of planned (tests)
    max_steps: int | None = None  # fixed main steps instead of planned (tests); training.align_steps then applies
    speech_dir: str | None = None  # None: $CONDITUNE_HOME/demo/speech
    progress: bool = True

    def validate(self) -> None:
        require_range(self.minutes, "--minutes (demo.minutes)", low=0, low_open=True)
        if self.max_steps is None and self.minutes < MIN_MINUTES:
            raise CondituneError(
                f"--minutes {self.minutes:g} is too short: model loading, calibration, training and evaluation need "
                f"{MIN_MINUTES:g} minutes or more (use --minutes 10 or more)"
            )
        require_range(self.count, "--count (demo.count)", low=1)
        for key in ("dev_per_language", "test_per_language", "heldout", "calibration_utterances",
                    "max_train_per_language"):  # fmt: skip
            require_range(getattr(self, key), f"demo.{key}", low=1)
        for key in ("heldout_voice_per_language", "train_per_language", "max_steps"):
            require_range(getattr(self, key), f"demo.{key}", low=1, allow_none=True)
        require_range(self.agreement_prompts, "--agreement-prompts (demo.agreement_prompts)", low=0)
        require_range(self.align_share, "demo.align_share", low=0, high=1, high_open=True)
        require_range(self.main_epochs, "demo.main_epochs", low=0, low_open=True)


@dataclass
class DemoConfig(TrainConfig):
    synth: SynthConfig = field(default_factory=SynthConfig)
    demo: DemoSettings = field(default_factory=DemoSettings)

    def validate(self, *, require_data: bool = False) -> None:
        self.demo.validate()
        self.synth.validate()
        super().validate(require_data=require_data)  # data.train: the demo's own speech set, filled in later


def load_demo_config(
    path: str | Path | Mapping[str, Any] | None = None, overrides: Sequence[str] | Mapping[str, Any] = ()
) -> DemoConfig:
    """The demo's recipe (``configs/speech_demo.yaml`` unless ``path``) with overrides, validated."""
    from conditune.recipes import config_path

    return load_config(DemoConfig, path if path is not None else config_path("speech_demo"), overrides)


@dataclass
class DemoResult:
    output: Path
    metrics: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    setup_seconds: float = 0.0


# ---------------------------------------------------------------------------------------------- console


class Console:
    """Stage headers with the elapsed time and the budget left, and indented log lines, on stderr."""

    def __init__(self, enabled: bool, start: float, budget: float):
        from rich.console import Console as RichConsole

        self.console = RichConsole(stderr=True, quiet=not enabled)
        self.start, self.budget = start, budget
        self.timings: dict[str, float] = {}
        self._stage: tuple[str, float] | None = None

    def stage(self, name: str, what: str) -> None:
        self.done()
        used = time.monotonic() - self.start
        self.console.rule(
            f"[bold][{STAGES.index(name) + 1}/{len(STAGES)}] {name}[/bold] — {what}  "
            f"[dim](elapsed {clock(used)}, budget left {clock(max(0.0, self.budget - used))})[/dim]",
            align="left",
        )
        self._stage = (name, time.monotonic())

    def done(self) -> None:
        if self._stage is not None:
            name, since = self._stage
            self.timings[name] = round(time.monotonic() - since, 2)
            self._stage = None

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def log(self, message: str) -> None:
        self.console.print(f"  {message}", highlight=False)


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


# ---------------------------------------------------------------------------------------------- stages


def stage_models(con: Console) -> None:
    from conditune import models

    for name in ("smollm2", "whisper-base"):
        was = models.is_installed(name)
        models.fetch(name, log=con.log)
        models.verify(name)
        con.log(f"{name}: {'cached' if was else 'installed'}, sha256 verified ({models.model_dir(name)})")


def synthesize(con: Console, cfg: DemoConfig, speech_dir: Path, train_per_language: int) -> tuple[dict[str, Path], int]:
    """The speech set with ``train_per_language`` training utterances (what exists is reused); (files, made now)."""
    from conditune.data.synth import synthesize_dataset
    from conditune.machine import usable_cores

    d = cfg.demo
    synth = replace(
        cfg.synth, output=str(speech_dir), count_train=train_per_language, count_dev=d.dev_per_language,
        count_test=d.test_per_language, heldout_count=d.heldout, count_heldout_voice=d.heldout_voice_per_language,
        jobs=usable_cores(), languages=list(LANGUAGES),
    )  # fmt: skip
    result = synthesize_dataset(synth, progress=d.progress, log=con.log)
    if result.failed:
        con.log(f"{len(result.failed)} utterances failed to synthesise and were left out")
    files = {split: Path(path) for split, path in result.manifests.items()}
    files.update({f"heldout_{lang}": Path(path) for lang, path in result.heldout.items()})
    return files, result.synthesized


def encode(con: Console, processor, manifests: list[Path], progress: bool, batch: int) -> int:
    """Every utterance of ``manifests`` into the feature cache the trainer and the evaluation read; how many were
    encoded now (the rest was cached)."""
    from conditune.data.examples import read_manifests
    from conditune.training.progress import ProgressBar

    utts, _ = read_manifests([str(m) for m in manifests])
    cache = processor.cache
    before = cache.misses
    with ProgressBar(progress, "encode", len(utts)) as bar:
        _, bad = cache.prepare([u.audio for u in utts], batch_size=batch, progress=bar.callback)
    con.log(f"features: {len(utts) - (cache.misses - before) - len(bad)} cached, {cache.misses - before} encoded, "
            f"{len(bad)} unreadable")  # fmt: skip
    return cache.misses - before


def stage_scan(con: Console, llm_path: Path, count: int, names_file: Path, progress: bool):
    from conditune.scanning import scan_source
    from conditune.selection import select, write_selection

    records, meta = scan_source(str(llm_path), progress=progress)
    con.log(f"scan: {meta['records']} matrices, {meta['reused_from_cache']} from the cache, "
            f"{meta['computed']} computed ({meta['seconds']:.1f} s)")  # fmt: skip
    selection = select(records, "lowest", count=count, meta=meta)
    write_selection(selection, names_file)
    con.log(f"selected the {len(selection.chosen)} lowest-κ tensors ({selection.selected_params:,} parameters, "
            f"{100 * selection.share:.1f}% of the model) -> {names_file}")  # fmt: skip
    return records, selection


def budget_overrides(cfg: DemoConfig, *, speech: dict[str, Path], names_file: Path, plan: DemoPlan | None,
                     output: Path, seconds_left: float | None = None) -> dict[str, Any]:  # fmt: skip
    """The values the demo adds to its recipe: its data, its selection, and what its budget decides.

    ``seconds_left``: the budget left when training starts; training may use all of it but the planned
    evaluation reserve (the data stage may have been faster or slower than planned)."""
    from conditune.machine import usable_cores

    main_steps = plan.main_steps if plan else cfg.demo.max_steps
    values = {
        "data.train": str(speech["train"]),
        "data.dev": str(speech["dev"]),
        "model.trainable.names_file": str(names_file),
        "model.encoder.threads": usable_cores(),
        "training.max_steps": main_steps,
        "optimizer.warmup_steps": min(cfg.optimizer.warmup_steps, max(1, main_steps // 10)),
        "evaluation.every": max(1, main_steps // 4),
        "output.log_every": max(1, min(cfg.output.log_every, main_steps // 10)),
        "output.dir": str(output / "train"),
        "output.overwrite": True,  # every demo run trains afresh
        "output.progress": cfg.demo.progress,
    }
    if plan is not None:
        limit = plan.train_seconds if seconds_left is None else max(60, int(seconds_left - plan.reserve_seconds))
        values.update({"training.align_steps": plan.align_steps, "training.max_seconds": limit})
    return values


# ---------------------------------------------------------------------------------------------- the recipe


def run_demo(cfg: DemoConfig, log: Callable[[str], None] | None = None) -> DemoResult:
    """Run the demo within ``demo.minutes`` of wall-clock time; see the module docstring."""
    from conditune.io import check_writable, cleaned_up_on_failure

    cfg.validate()
    start, budget = time.monotonic(), float(cfg.demo.minutes) * 60.0
    output = check_writable(cfg.demo.output, folder=True)
    with cleaned_up_on_failure(output):
        return _run_stages(cfg, output, Console(cfg.demo.progress, start, budget))


def _run_stages(cfg: DemoConfig, output: Path, con: Console) -> DemoResult:
    from conditune.models import conditune_home, model_path
    from conditune.recipes.demo_calibrate import calibrate, plan_for
    from conditune.recipes.demo_evaluate import stage_evaluate

    output.mkdir(parents=True, exist_ok=True)
    d = cfg.demo
    speech_dir = Path(d.speech_dir) if d.speech_dir else conditune_home() / "demo" / "speech"
    names_file = output / "selected_names.txt"
    con.stage("models", "SmolLM2-135M-Instruct (GGUF) and Whisper base (CTranslate2), checksummed")
    stage_models(con)
    fixed = d.train_per_language is not None and d.max_steps is not None
    con.stage("calibrate", "dev and test sets, the lowest-κ selection, and this machine's speeds")
    records, selection = stage_scan(con, model_path("smollm2"), d.count, names_file, d.progress)
    speeds, made = calibrate(con, cfg, speech_dir, names_file, skip_timing=fixed)
    con.stage("plan", "data size, alignment and main steps that fit the budget left")
    plan = None if fixed else plan_for(con, cfg, speeds, made)
    train_per_language = d.train_per_language or plan.train_per_language
    con.stage("data", f"{train_per_language} training utterances per language, spoken and encoded once")
    speech, _ = synthesize(con, cfg, speech_dir, train_per_language)
    processor = _processor(cfg)
    misses = encode(con, processor, [speech["train"], speech["dev"]], d.progress, cfg.data.encode_batch)
    setup_seconds = time.monotonic() - con.start
    overrides = budget_overrides(cfg, speech=speech, names_file=names_file, plan=plan, output=output,
                                 seconds_left=con.left())  # fmt: skip
    train_cfg = load_config(TrainConfig, training_part(cfg), overrides)
    t = train_cfg.training
    con.stage("train", f"adaptor + {len(selection.chosen)} tensors: {t.align_steps} alignment + {t.max_steps} main steps"
              + (f", stopping by {clock(t.max_seconds)}" if t.max_seconds else ""))  # fmt: skip
    result = _train(con, cfg, train_cfg)
    beside = " (with Whisper's decoder beside)" if cfg.demo.whisper_reference else ""
    con.stage("evaluate", f"test and held-out-voice WER{beside}, forgetting on general text")
    ev = stage_evaluate(con, result.final_dir, train_cfg, speech, cfg.demo)
    con.stage("report", f"metrics.json, report.md, training.png, kappa_selected.png in {output}")
    metrics = _metrics(cfg, train_cfg, result, ev, selection, speeds, plan, con, setup_seconds, misses)
    _write_outputs(output, metrics, ev, records, selection, Path(train_cfg.output.dir), con)
    return DemoResult(output=output, metrics=metrics, timings=con.timings, setup_seconds=setup_seconds)


def _processor(cfg: DemoConfig):
    from conditune.models import conditune_home
    from conditune.speech.processing import SpeechProcessor

    return SpeechProcessor.from_config(cfg.model, cache_dir=cfg.data.feature_cache or conditune_home() / "features")


def _train(con: Console, cfg: DemoConfig, train_cfg: TrainConfig):
    from conditune.evaluation.pair import load_base_llm
    from conditune.training.trainer import train

    # the base LLM stays loaded for the evaluation; training adapts a copy of it (one GGUF de-quantisation)
    return train(train_cfg, log=con.log, llm=copy.deepcopy(load_base_llm(train_cfg.model.llm)))


def _metrics(cfg, train_cfg, result, ev, selection, speeds, plan, con, setup_seconds, misses) -> dict[str, Any]:
    align = train_cfg.training.align_steps
    test = ev["sets"]["test"]
    return {
        "wer": test["wer"],
        "wer_ci": test["ci"],
        "heldout_voice": {k: ev["sets"]["test_heldout_voice"][k] for k in ("wer", "ci", "utterances", "voices")}
        if "test_heldout_voice" in ev["sets"]
        else None,
        "whisper_reference": {name: s.get("whisper") for name, s in ev["sets"].items()},
        "forgetting": ev["forgetting"]["en"],
        "forgetting_de": ev["forgetting"]["de"],
        "agreement": ev["agreement"],
        "trainable": {"tensors": len(selection.chosen), "parameters": selection.selected_params},
        "trainable_adaptor_parameters": ev["adaptor_parameters"],
        "steps": max(0, result.step - align),  # main steps (Algorithm 1)
        "align_steps": min(result.step, align),
        "readout": train_cfg.model.ctc.readout if train_cfg.model.ctc.compress else "adaptor",
        "train": {
            "stopped": result.stopped,
            "seconds_per_step": round(result.seconds_per_step, 3),
            "align_seconds_per_step": round(result.align_seconds_per_step, 3),
            "train_utterances": result.train_utterances,
            "skipped": result.skipped,
            "final_loss": result.losses[max(result.losses)] if result.losses else None,
            "dev_wer": {k: v for k, v in (result.eval or {}).items() if k != "counts"},
        },
        "speeds": speeds.to_dict() if speeds else None,
        "plan": plan.to_dict() if plan else None,
        "budget_seconds": con.budget,
        "setup_seconds": round(setup_seconds, 2),
        "setup_cached": misses == 0,
        "selection": {"policy": selection.describe(), "share": selection.share},
        "seconds": 0.0,
    }


def _write_outputs(output, metrics, ev, records, selection, train_dir, con) -> None:
    from conditune.machine import machine_description
    from conditune.recipes.demo_report import write_report
    from conditune.selection.plots import plot_selection
    from conditune.training.plots import plot_training

    lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for s in ev["sets"].values() for p in s["predictions"])
    atomic_write_text(output / "predictions.jsonl", lines)
    plot_training(train_dir / "metrics.jsonl", output / "training.png")
    plot_selection(
        records, selection, output / "kappa_selected.png", title="SmolLM2-135M: κ of the trained vs frozen tensors"
    )
    con.done()
    metrics["timings"] = {**con.timings, "evaluate_detail": {k: round(v, 2) for k, v in ev["timings"].items()}}
    metrics["seconds"] = round(time.monotonic() - con.start, 2)
    write_report(output / "report.md", metrics, ev, machine_description())
    atomic_write_json(output / "metrics.json", metrics)
    w = metrics["wer"]
    con.log(f"done in {clock(metrics['seconds'])}: test WER en {_pct(w.get('en'))}, de {_pct(w.get('de'))}, "
            f"all {_pct(w.get('all'))}")  # fmt: skip


def _pct(value) -> str:
    return f"{value:.1f}%" if isinstance(value, float) and math.isfinite(value) else "–"
