"""``conditune demo``: the whole method end to end on a CPU in a fixed wall-clock budget.

The recipe is ``configs/speech_demo.yaml`` (its training sections and its ``demo:`` section); the demo adds
only what its budget and its own stages decide (:func:`budget_overrides`). Stages, each printed with its
elapsed time (long ones show progress bars with an ETA):

1. **models** — fetch SmolLM2-135M-Instruct (GGUF) and Whisper base (CTranslate2), re-hash the files.
2. **data** — synthesise an English + German speech set into ``$CONDITUNE_HOME/demo/speech`` (skipped when
   its manifests were written with the same settings) and encode every utterance once into the feature
   cache. Sizes follow the budget (:func:`plan_sizes`).
3. **scan + select** — scan SmolLM2 (cached by fingerprint), select the ``demo.count`` lowest-κ tensors.
4. **train** — :class:`~conditune.training.trainer.Trainer` for the time left after reserving the evaluation.
5. **evaluate** — test WER per language; forgetting of the LLM alone on held-out sentences, greedy agreement.
6. **report** — ``metrics.json``, ``report.md``, ``predictions.jsonl``, ``training.png``, ``kappa_selected.png``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from conditune.config import load_config
from conditune.errors import CondituneError
from conditune.io import atomic_write_json, atomic_write_text
from conditune.training.config import TrainConfig, training_part
from conditune.validation import require_range

# Measured on the 2-core reference machine (see docs/demo.md); used to size the data set and the reserve.
SYNTH_S_PER_UTT = 0.03  # espeak-ng / flite, one job per core (measured 0.02 s on 2026-12-01)
ENCODE_S_PER_UTT = 0.13  # CTranslate2 Whisper-base float32, ~4.4 s utterances (measured 0.11-0.13 s)
STEP_S = 3.0  # one optimizer step at batch 4 (adaptor + 100 SmolLM2 tensors)
STEP_S_SAFE = 3.5  # planning value for the step count (the schedule spans it; max_seconds caps the run)
ALIGN_STEP_S = 0.3  # one CTC alignment step (adaptor only; measured 0.19 s at batch 4 on 2026-12-02)
LLM_LOAD_S = 45.0  # de-quantising the SmolLM2 GGUF + its tokenizer
GENERATE_S_PER_UTT = 1.0  # greedy transcription, batch 8, up to 48 new tokens
HELDOUT_S_PER_TEXT = 0.3  # base + adapted forward pass per held-out sentence (batch 16)
AGREE_S_PER_PROMPT = 5.0  # base + adapted greedy continuation (24 tokens)
DATA_SEED = 0  # the speech set does not depend on training.seed, so every demo run shares it
STAGES = ("models", "data", "scan", "train", "evaluate", "report")
SETTINGS_NAME = "demo_settings.json"


@dataclass
class DemoSettings:
    output: str = "runs/demo"
    minutes: float = 30.0
    count: int = 100  # lowest-kappa tensors to train
    train_per_language: int | None = None  # None: from the budget
    dev_per_language: int | None = None
    test_per_language: int | None = None
    heldout: int = 100  # held-out sentences per language for the forgetting metrics
    agreement_prompts: int = 10  # English DEFAULT_INSTRUCTIONS for greedy agreement (0: skip)
    max_steps: int | None = None  # fixed main steps instead of the budget's
    vocab_size: int | None = 1000  # speak sentences of the N most frequent words only (None: any sentence)
    speech_dir: str | None = None  # None: $CONDITUNE_HOME/demo/speech
    progress: bool = True

    def validate(self) -> None:
        require_range(self.minutes, "--minutes (demo.minutes)", low=0, low_open=True)
        require_range(self.count, "--count (demo.count)", low=1, allow_none=True)
        for key in ("train_per_language", "dev_per_language", "test_per_language", "max_steps", "vocab_size"):
            require_range(getattr(self, key), f"demo.{key}", low=1, allow_none=True)
        require_range(self.heldout, "--heldout (demo.heldout)", low=1, allow_none=True)
        require_range(self.agreement_prompts, "--agreement-prompts (demo.agreement_prompts)", low=0, allow_none=True)


@dataclass
class DemoConfig(TrainConfig):
    demo: DemoSettings = field(default_factory=DemoSettings)

    def validate(self, *, require_data: bool = False) -> None:
        self.demo.validate()
        super().validate(require_data=require_data)  # data.train: the demo's own speech set, filled in later


def load_demo_config(
    path: str | Path | Mapping[str, Any] | None = None, overrides: Sequence[str] | Mapping[str, Any] = ()
) -> DemoConfig:
    """The demo's recipe (``configs/speech_demo.yaml`` unless ``path``) with overrides, validated."""
    from conditune.recipes import config_path

    return load_config(DemoConfig, path if path is not None else config_path("speech_demo"), overrides)


@dataclass
class Sizes:
    train: int
    dev: int
    test: int
    heldout: int


@dataclass
class DemoResult:
    output: Path
    metrics: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    setup_seconds: float = 0.0


# ---------------------------------------------------------------------------------------------- planning


def plan_sizes(budget_s: float, demo: DemoSettings) -> Sizes:
    """Utterances per language so that synthesis + encoding take about a fifth of the budget.

    30 minutes gives 600 train, 8 dev and 30 test utterances per language (~4 min of set-up the first
    time, seconds afterwards)."""
    per_lang = max(8, int(0.2 * budget_s / (SYNTH_S_PER_UTT + ENCODE_S_PER_UTT))) // 2
    test = demo.test_per_language if demo.test_per_language is not None else int(min(30, max(2, per_lang // 10)))
    dev = demo.dev_per_language if demo.dev_per_language is not None else int(min(8, max(2, 0.03 * per_lang)))
    train = demo.train_per_language
    if train is None:
        train = int(min(600, max(4, per_lang - test - dev)))
    return Sizes(train=train, dev=dev, test=test, heldout=demo.heldout)


def eval_reserve(sizes: Sizes, demo: DemoSettings) -> float:
    """Seconds kept back from training for the final evaluation and the report."""
    langs = 2
    return (
        LLM_LOAD_S + 10.0 + langs * sizes.test * GENERATE_S_PER_UTT + langs * sizes.heldout * HELDOUT_S_PER_TEXT
        + demo.agreement_prompts * AGREE_S_PER_PROMPT + 10.0
    )  # fmt: skip


def plan_steps(cfg: DemoConfig, sizes: Sizes, *, left_s: float) -> tuple[int, float | None]:
    """(main steps, training.max_seconds) for the ``left_s`` seconds the budget leaves after the set-up."""
    if cfg.demo.max_steps:
        return cfg.demo.max_steps, None
    # training stops at max_seconds, then evaluates dev once more and saves: keep that out of its budget too
    max_seconds = left_s - eval_reserve(sizes, cfg.demo) - (2 * sizes.dev * GENERATE_S_PER_UTT + 15.0)
    if max_seconds - LLM_LOAD_S < 2 * STEP_S:
        raise CondituneError(
            f"--minutes {cfg.demo.minutes} leaves no time to train after the set-up and the evaluation reserve "
            f"({eval_reserve(sizes, cfg.demo):.0f} s)"
        )
    # the trainer loads the LLM and runs the alignment steps inside its budget
    steps = int((max_seconds - LLM_LOAD_S - cfg.training.align_steps * ALIGN_STEP_S) / STEP_S_SAFE)
    return max(2, steps), max(1.0, max_seconds)


def budget_overrides(cfg: DemoConfig, *, speech: dict[str, Path], names_file: Path, sizes: Sizes,
                     max_steps: int, max_seconds: float | None) -> dict[str, Any]:  # fmt: skip
    """The values the demo adds to its recipe: its data, its selection, and what its budget decides."""
    from conditune.machine import usable_cores

    return {
        "data.train": str(speech["train"]),
        "data.dev": str(speech["dev"]),
        "model.trainable.names_file": str(names_file),
        "model.encoder.threads": usable_cores(),
        "training.max_steps": max_steps,
        "training.max_seconds": max_seconds,
        "optimizer.warmup_steps": min(cfg.optimizer.warmup_steps, max(1, max_steps // 10)),
        "evaluation.every": max(10, max_steps // 4),
        "evaluation.max_utterances": 2 * sizes.dev,
        "output.log_every": max(1, min(5, max_steps // 10)),
        "output.dir": str(Path(cfg.demo.output) / "train"),
        "output.overwrite": True,  # every demo run trains afresh
        "output.progress": cfg.demo.progress,
    }


def check_budget(cfg: DemoConfig, sizes: Sizes) -> None:
    """One error line when the budget cannot hold the evaluation and model loading (before any work)."""
    minimum = eval_reserve(sizes, cfg.demo) + LLM_LOAD_S + 2 * sizes.dev * GENERATE_S_PER_UTT + 15.0 + 10 * STEP_S
    if cfg.demo.max_steps is None and cfg.demo.minutes * 60 < minimum:
        raise CondituneError(
            f"--minutes {cfg.demo.minutes:g} is too short: evaluation and model loading alone take about "
            f"{minimum / 60:.1f} minutes on 2 cores (use --minutes 10 or more)"
        )


# ---------------------------------------------------------------------------------------------- console


class Console:
    """Stage headers with the elapsed time and the budget left, and indented log lines, on stderr."""

    def __init__(self, enabled: bool, start: float, budget: float):
        from rich.console import Console as RichConsole

        self.console = RichConsole(stderr=True, quiet=not enabled)
        self.start, self.budget = start, budget

    def stage(self, index: int, name: str, what: str) -> None:
        used = time.monotonic() - self.start
        self.console.rule(
            f"[bold][{index}/{len(STAGES)}] {name}[/bold] — {what}  "
            f"[dim](elapsed {clock(used)}, budget left {clock(max(0.0, self.budget - used))})[/dim]",
            align="left",
        )

    def log(self, message: str) -> None:
        self.console.print(f"  {message}", highlight=False)


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


# ---------------------------------------------------------------------------------------------- stages


def stage_models(con: Console) -> dict[str, Path]:
    from conditune import models

    paths = {}
    for name in ("smollm2", "whisper-base"):
        was = models.is_installed(name)
        paths[name] = models.fetch(name, log=con.log)
        models.verify(name)
        con.log(f"{name}: {'cached' if was else 'installed'}, sha256 verified ({models.model_dir(name)})")
    return paths


def speech_settings(sizes: Sizes, vocab_size: int | None = None) -> dict[str, Any]:
    return {"languages": ["en", "de"], "train": sizes.train, "dev": sizes.dev, "test": sizes.test,
            "heldout": sizes.heldout, "seed": DATA_SEED, "vocab_size": vocab_size, "format": 1}  # fmt: skip


def stage_data(
    con: Console, speech_dir: Path, sizes: Sizes, progress: bool, vocab_size: int | None = None
) -> tuple[dict[str, Path], bool]:
    """Synthesise the speech set unless the manifests were written with the same settings; returns (files, reused)."""
    import os

    from conditune.data.synth import SynthConfig, synthesize_dataset

    settings = speech_settings(sizes, vocab_size)
    files = {split: speech_dir / f"{split}.jsonl" for split in ("train", "dev", "test")}
    files.update({f"heldout_{lang}": speech_dir / f"heldout_text.{lang}.txt" for lang in ("en", "de")})
    marker = speech_dir / SETTINGS_NAME
    try:
        cached = json.loads(marker.read_text()) == settings and all(f.is_file() for f in files.values())
    except (OSError, json.JSONDecodeError):
        cached = False
    if cached:
        con.log(
            f"speech set cached in {speech_dir} ({sizes.train} train, {sizes.dev} dev, {sizes.test} test per language)"
        )
        return files, True
    con.log(f"synthesising {2 * (sizes.train + sizes.dev + sizes.test)} utterances "
            f"({sizes.train} train, {sizes.dev} dev, {sizes.test} test per language) into {speech_dir}")  # fmt: skip
    cfg = SynthConfig(
        output=speech_dir, languages=("en", "de"), count_train=sizes.train, count_dev=sizes.dev,
        count_test=sizes.test, heldout_count=sizes.heldout, seed=DATA_SEED, jobs=max(1, os.cpu_count() or 1),
        vocab_size=vocab_size,
    )  # fmt: skip
    result = synthesize_dataset(cfg, progress=progress, log=con.log)
    if result.failed:
        con.log(f"{len(result.failed)} utterances failed to synthesise and were left out")
    atomic_write_json(marker, settings)
    return files, False


def encode_features(con: Console, cfg: TrainConfig, manifests: list[Path], progress: bool) -> int:
    """Encode every utterance of ``manifests`` into the feature cache the trainer and the evaluation read;
    returns how many were not cached yet."""
    from conditune.data.examples import read_manifests
    from conditune.models import conditune_home
    from conditune.speech.processing import SpeechProcessor
    from conditune.training.progress import ProgressBar

    utts, _ = read_manifests([str(m) for m in manifests])
    processor = SpeechProcessor.from_config(
        cfg.model, cache_dir=cfg.data.feature_cache or conditune_home() / "features"
    )
    cache = processor.cache
    with ProgressBar(progress, "encode", len(utts)) as bar:
        _, bad = cache.prepare([u.audio for u in utts], batch_size=cfg.data.encode_batch, progress=bar.callback)
    con.log(f"features: {cache.hits} cached, {cache.misses} encoded, {len(bad)} unreadable")
    return cache.misses


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


def stage_evaluate(con: Console, final_dir: Path, cfg: TrainConfig, speech: dict[str, Path], sizes: Sizes,
                   demo: DemoSettings) -> dict[str, Any]:  # fmt: skip
    """Test WER, forgetting (perplexity, KL per language) and greedy agreement of the trained model."""
    import torch

    from conditune.data.examples import prepare_examples, read_manifests
    from conditune.evaluation.forgetting import DEFAULT_INSTRUCTIONS, ForgettingProbe, read_texts
    from conditune.evaluation.pair import load_trained_pair
    from conditune.evaluation.transcription import evaluate_examples
    from conditune.machine import usable_cores
    from conditune.models import conditune_home
    from conditune.training.progress import ProgressBar

    torch.set_num_threads(usable_cores())
    started = time.monotonic()
    pair = load_trained_pair(
        final_dir, load_encoder=True, cache_dir=cfg.data.feature_cache or conditune_home() / "features"
    )
    utts, _ = read_manifests(speech["test"])
    examples = prepare_examples(utts, pair.processor, batch_size=16).examples
    with ProgressBar(demo.progress, "test WER", len(examples)) as bar:
        result = evaluate_examples(pair.model, pair.processor, examples, batch_size=8,
                                   max_new_tokens=cfg.evaluation.max_new_tokens, progress=bar.callback)  # fmt: skip
    timings = {"test_wer": time.monotonic() - started}
    wer = result.wer
    con.log("test WER: " + ", ".join(f"{k} {wer.get(k, math.nan):.1f}%" for k in ("en", "de", "all"))
            + f" ({len(examples)} utterances, {timings['test_wer']:.0f} s)")  # fmt: skip
    probe = ForgettingProbe(
        texts={lang: read_texts(speech[f"heldout_{lang}"], limit=sizes.heldout) for lang in ("en", "de")},
        prompts={"en": DEFAULT_INSTRUCTIONS["en"][: demo.agreement_prompts]} if demo.agreement_prompts else {},
        batch_size=16,
        max_tokens=128,
    )
    forgetting = probe.measure(pair.base, pair.adapted, pair.processor.tokenizer)
    for lang, f in forgetting.text.items():
        con.log(f"forgetting ({lang}, {f['texts']} held-out sentences, {f['tokens']} tokens): perplexity "
                f"{f['perplexity_base']:.2f} -> {f['perplexity_adapted']:.2f}, KL {f['kl_to_base']:.4f} nats/token")  # fmt: skip
    agreement = forgetting.agreement.get("en")
    if agreement:
        con.log(f"greedy agreement on {agreement['prompts']} English instructions: {100 * agreement['agreement']:.1f}% "
                f"of tokens, {100 * agreement['exact']:.0f}% identical answers")  # fmt: skip
    timings["forgetting_and_agreement"] = forgetting.seconds
    return {"wer": wer, "predictions": result.predictions, "forgetting": forgetting.text, "agreement": agreement,
            "timings": timings, "adaptor_parameters": sum(p.numel() for p in pair.model.adaptor.parameters())}  # fmt: skip


# ---------------------------------------------------------------------------------------------- the recipe


def run_demo(cfg: DemoConfig, log: Callable[[str], None] | None = None) -> DemoResult:
    """Run the demo within ``demo.minutes`` of wall-clock time; see the module docstring."""

    from conditune.io import check_writable, cleaned_up_on_failure

    start, budget = time.monotonic(), float(cfg.demo.minutes) * 60.0
    cfg.validate()
    sizes = plan_sizes(budget, cfg.demo)
    check_budget(cfg, sizes)
    output = check_writable(cfg.demo.output, folder=True)
    with cleaned_up_on_failure(output):
        return _run_stages(cfg, output, sizes, start, budget)


def _run_stages(cfg: DemoConfig, output: Path, sizes: Sizes, start: float, budget: float) -> DemoResult:
    from conditune.models import conditune_home, model_path

    output.mkdir(parents=True, exist_ok=True)
    con = Console(cfg.demo.progress, start, budget)
    timings: dict[str, float] = {}

    def done(stage: str, since: float) -> float:
        timings[stage] = round(time.monotonic() - since, 2)
        return time.monotonic()

    t = time.monotonic()
    con.stage(1, "models", "SmolLM2-135M-Instruct (GGUF) and Whisper base (CTranslate2), checksummed")
    stage_models(con)
    t = done("models", t)
    speech_dir = Path(cfg.demo.speech_dir) if cfg.demo.speech_dir else conditune_home() / "demo" / "speech"
    con.stage(
        2,
        "data",
        f"English + German synthetic speech, {sizes.train}/{sizes.dev}/{sizes.test} train/dev/test per language",
    )
    speech, data_cached = stage_data(con, speech_dir, sizes, cfg.demo.progress, cfg.demo.vocab_size)
    t = done("synthesis", t)
    misses = encode_features(con, cfg, [speech["train"], speech["dev"], speech["test"]], cfg.demo.progress)
    t = done("encoding", t)
    con.stage(3, "scan + select", f"κ of every SmolLM2 matrix (cached), the {cfg.demo.count} lowest-κ tensors train")
    names_file = output / "selected_names.txt"
    records, selection = stage_scan(con, model_path("smollm2"), cfg.demo.count, names_file, cfg.demo.progress)
    t = done("scan_select", t)
    setup_seconds = time.monotonic() - start
    con.log(
        f"set-up before training: {setup_seconds:.1f} s ({'all cached' if data_cached and not misses else 'first run'})"
    )

    max_steps, max_seconds = plan_steps(cfg, sizes, left_s=budget - (time.monotonic() - start))
    overrides = budget_overrides(cfg, speech=speech, names_file=names_file, sizes=sizes, max_steps=max_steps,
                                 max_seconds=max_seconds)  # fmt: skip
    train_cfg = load_config(TrainConfig, training_part(cfg), overrides)
    con.stage(4, "train", f"adaptor + {len(selection.chosen)} tensors, up to {max_steps} steps"
              + (f" / {clock(max_seconds)}" if max_seconds else "") + f" (evaluation reserve {clock(eval_reserve(sizes, cfg.demo))})")  # fmt: skip
    from conditune.training.trainer import train

    result = train(train_cfg, log=con.log)
    t = done("train", t)
    con.stage(
        5,
        "evaluate",
        f"test WER ({2 * sizes.test} utterances) and forgetting ({sizes.heldout} held-out sentences per language)",
    )
    ev = stage_evaluate(con, result.final_dir, train_cfg, speech, sizes, cfg.demo)
    t = done("evaluate", t)
    con.stage(6, "report", f"metrics.json, report.md, training.png, kappa_selected.png in {output}")
    metrics = _metrics(cfg, train_cfg, result, ev, selection, sizes, budget, setup_seconds, data_cached and not misses)
    _write_outputs(output, metrics, ev, records, selection, Path(train_cfg.output.dir), timings, t, start)
    fe = ev["forgetting"]["en"]
    con.log(f"done in {clock(metrics['seconds'])}: WER all {metrics['wer']['all']:.1f}%, perplexity "
            f"{fe['perplexity_base']:.2f} -> {fe['perplexity_adapted']:.2f}, KL {fe['kl_to_base']:.4f}")  # fmt: skip
    return DemoResult(output=output, metrics=metrics, timings=timings, setup_seconds=setup_seconds)


def _metrics(cfg, train_cfg, result, ev, selection, sizes, budget, setup_seconds, setup_cached) -> dict[str, Any]:
    keys = ("perplexity_base", "perplexity_adapted", "kl_to_base", "tokens", "texts")
    align = train_cfg.training.align_steps
    return {
        "wer": {k: ev["wer"].get(k, math.nan) for k in ("en", "de", "all")},
        "forgetting": {k: ev["forgetting"]["en"][k] for k in keys},
        "trainable": {"tensors": len(selection.chosen), "parameters": selection.selected_params},
        "steps": max(0, result.step - align),  # main steps (Algorithm 1)
        "align_steps": min(result.step, align),
        "readout": train_cfg.model.ctc.readout if train_cfg.model.ctc.compress else "adaptor",
        "seconds": 0.0,
        "forgetting_de": {k: ev["forgetting"]["de"][k] for k in keys},
        "agreement": ({k: ev["agreement"][k] for k in ("agreement", "exact", "prompts")} if ev["agreement"] else None),
        "trainable_adaptor_parameters": ev["adaptor_parameters"],
        "budget_seconds": budget,
        "setup_seconds": round(setup_seconds, 2),
        "setup_cached": setup_cached,
        "sizes": asdict(sizes),
        "train": {
            "stopped": result.stopped,
            "seconds_per_step": round(result.seconds_per_step, 3),
            "align_seconds_per_step": round(result.align_seconds_per_step, 3),
            "final_loss": result.losses[max(result.losses)] if result.losses else None,
            "dev_wer": {k: v for k, v in (result.eval or {}).items() if k != "counts"},
        },
        "selection": {"policy": selection.describe(), "share": selection.share},
    }


def _write_outputs(output, metrics, ev, records, selection, train_dir, timings, t, start) -> None:
    from conditune.machine import machine_description
    from conditune.recipes.demo_report import write_report
    from conditune.selection.plots import plot_selection
    from conditune.training.plots import plot_training

    lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in ev["predictions"])
    atomic_write_text(output / "predictions.jsonl", lines)
    plot_training(train_dir / "metrics.jsonl", output / "training.png")
    plot_selection(
        records, selection, output / "kappa_selected.png", title="SmolLM2-135M: κ of the trained vs frozen tensors"
    )
    timings["report"] = round(time.monotonic() - t, 2)
    metrics["timings"] = {**timings, "evaluate_detail": {k: round(v, 2) for k, v in ev["timings"].items()}}
    metrics["seconds"] = round(time.monotonic() - start, 2)
    write_report(
        output / "report.md", {**metrics, "timings": timings}, ev["predictions"], machine_description(), ev["agreement"]
    )
    atomic_write_json(output / "metrics.json", metrics)
