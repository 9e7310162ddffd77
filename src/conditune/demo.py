"""``conditune demo``: the whole method end to end on a CPU in a fixed wall-clock budget.

Stages (each printed with its elapsed time; long ones show rich progress bars with an ETA):

1. **models** — :func:`conditune.models.fetch` SmolLM2-135M-Instruct (GGUF) and Whisper base (CTranslate2),
   then re-hash the installed files (:func:`conditune.models.verify`).
2. **data** — synthesise an English + German speech set (:mod:`conditune.data.synth`) into
   ``$CONDITUNE_HOME/demo/speech`` (skipped when its manifests were written with the same settings) and
   encode every utterance once with the frozen Whisper encoder into the feature cache
   (``$CONDITUNE_HOME/features``). Sizes follow the budget (:func:`plan_sizes`).
3. **scan + select** — scan SmolLM2 (cached by fingerprint) and select the ``count`` lowest-κ tensors;
   their names go to ``DIR/selected_names.txt``.
4. **train** — adaptor + selected tensors with :func:`conditune.training.trainer.train` for the time that
   is left after reserving the evaluation (``DIR/train``).
5. **evaluate** — test-split WER (percent) per language and overall; forgetting of the LLM alone on the
   held-out sentences (English under ``forgetting``, German under ``forgetting_de``) and greedy agreement
   on :data:`~conditune.evaluation.forgetting.DEFAULT_INSTRUCTIONS`.
6. **report** — ``DIR/metrics.json``, ``DIR/report.md``, ``DIR/training.png``, ``DIR/kappa_selected.png``
   (all written atomically).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from conditune.errors import CondituneError
from conditune.io import atomic_write, atomic_write_json, atomic_write_text, read_jsonl

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
READOUT_NOTE = {
    "embeddings": ", the LLM reading one position per CTC-labelled token (the CTC posterior times its own token embeddings)"
}
DATA_SEED = 0  # the speech set does not depend on --seed, so every demo run shares it

STAGES = ("models", "data", "scan", "train", "evaluate", "report")


@dataclass
class DemoOptions:
    output: Path = Path("runs/demo")
    minutes: float = 30.0
    seed: int = 0
    count: int = 100  # lowest-kappa tensors to train
    train_per_language: int | None = None  # None: from the budget
    dev_per_language: int | None = None
    test_per_language: int | None = None
    heldout: int = 100  # held-out sentences per language for the forgetting metrics
    agreement_prompts: int = 10  # English DEFAULT_INSTRUCTIONS for greedy agreement (0: skip)
    max_steps: int | None = None  # None: from the budget
    batch: int = 4
    lr: float = 3e-4  # adaptor (its post-norm attention layers do not train at 1e-3: docs/speech.md)
    llm_lr: float = 1e-4
    align_steps: int = 1500  # CTC alignment of the adaptor to the LLM's token embeddings before the main steps
    # what the LLM reads: "embeddings" (CTC-compressed positions, each the CTC posterior times the LLM's token
    # embeddings, with the CTC loss kept on at ctc_weight) or "adaptor" (every adaptor position, the paper's)
    readout: str = "embeddings"
    ctc_weight: float = 0.5
    vocab_size: int | None = 1000  # speak sentences of the N most frequent words only (None: any sentence)
    progress: bool = True
    speech_dir: Path | None = None  # None: $CONDITUNE_HOME/demo/speech

    def __post_init__(self):  # fail before minutes of set-up, not after
        from conditune.speech.config import CTC_READOUTS

        if self.readout not in CTC_READOUTS:
            raise CondituneError(f"--readout must be one of {', '.join(CTC_READOUTS)}, not {self.readout!r}")


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


def plan_sizes(budget_s: float, options: DemoOptions) -> Sizes:
    """Utterances per language so that synthesis + encoding take about a fifth of the budget.

    30 minutes gives 600 train, 8 dev and 30 test utterances per language (~4 min of set-up the first
    time, seconds afterwards).
    """
    total = max(8, int(0.2 * budget_s / (SYNTH_S_PER_UTT + ENCODE_S_PER_UTT)))
    per_lang = total // 2
    test = options.test_per_language if options.test_per_language is not None else int(min(30, max(2, per_lang // 10)))
    dev = options.dev_per_language if options.dev_per_language is not None else int(min(8, max(2, 0.03 * per_lang)))
    train = (
        options.train_per_language
        if options.train_per_language is not None
        else int(min(600, max(4, per_lang - test - dev)))
    )
    return Sizes(train=train, dev=dev, test=test, heldout=options.heldout)


# ---------------------------------------------------------------------------------------------- console


class _Console:
    def __init__(self, enabled: bool, start: float, budget: float):
        from rich.console import Console

        self.console = Console(stderr=True, quiet=not enabled)
        self.start, self.budget = start, budget

    def stage(self, index: int, name: str, what: str) -> None:
        used = time.monotonic() - self.start
        self.console.rule(
            f"[bold][{index}/{len(STAGES)}] {name}[/bold] — {what}  "
            f"[dim](elapsed {_clock(used)}, budget left {_clock(max(0.0, self.budget - used))})[/dim]",
            align="left",
        )

    def log(self, message: str) -> None:
        self.console.print(f"  {message}", highlight=False)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def _bar(enabled: bool, label: str, total: int):
    """A rich progress bar (or None): returns (progress, task)."""
    if not enabled or total <= 0:
        return None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    progress.start()
    return progress, progress.add_task(label, total=total)


# ---------------------------------------------------------------------------------------------- stages


def _quiet_libraries() -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass


def stage_models(con: _Console) -> dict[str, Path]:
    from conditune import models

    paths = {}
    for name in ("smollm2", "whisper-base"):
        was = models.is_installed(name)
        paths[name] = models.fetch(name, log=con.log)
        models.verify(name)
        con.log(f"{name}: {'cached' if was else 'installed'}, sha256 verified ({models.model_dir(name)})")
    return paths


def speech_settings(sizes: Sizes, vocab_size: int | None = None) -> dict[str, Any]:
    return {
        "languages": ["en", "de"],
        "train": sizes.train,
        "dev": sizes.dev,
        "test": sizes.test,
        "heldout": sizes.heldout,
        "seed": DATA_SEED,
        "vocab_size": vocab_size,
        "format": 1,
    }


SETTINGS_NAME = "demo_settings.json"


def stage_data(
    con: _Console, speech_dir: Path, sizes: Sizes, progress: bool, vocab_size: int | None = None
) -> tuple[dict[str, Path], bool]:
    """Synthesise the speech set unless the manifests were written with the same settings; returns (files, reused)."""
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
    con.log(
        f"synthesising {2 * (sizes.train + sizes.dev + sizes.test)} utterances "
        f"({sizes.train} train, {sizes.dev} dev, {sizes.test} test per language) into {speech_dir}"
    )
    cfg = SynthConfig(
        output=speech_dir,
        languages=("en", "de"),
        count_train=sizes.train,
        count_dev=sizes.dev,
        count_test=sizes.test,
        heldout_count=sizes.heldout,
        seed=DATA_SEED,
        jobs=max(1, os.cpu_count() or 1),
        vocab_size=vocab_size,
    )
    result = synthesize_dataset(cfg, progress=progress, log=con.log)
    if result.failed:
        con.log(f"{len(result.failed)} utterances failed to synthesise and were left out")
    atomic_write_json(marker, settings)
    return files, False


def encode_features(con: _Console, config, manifests: list[Path], progress: bool) -> tuple[int, int]:
    """Encode every utterance of ``manifests`` into the feature cache train() and the evaluation read."""
    from conditune.speech.encoders import build_encoder
    from conditune.training.trainer import make_cache, read_manifests

    utts, _ = read_manifests([str(m) for m in manifests], strict=False)
    encoder = build_encoder(config.model.encoder)
    cache = make_cache(config, encoder)
    bar = _bar(progress, "encode", len(utts))
    try:
        lengths, bad = cache.prepare(
            [u.audio for u in utts],
            batch_size=config.data.encode_batch,
            progress=(lambda n: bar[0].advance(bar[1], n)) if bar else None,
        )
    finally:
        if bar:
            bar[0].stop()
    con.log(f"features: {cache.hits} cached, {cache.misses} encoded, {len(bad)} unreadable")
    return cache.hits, cache.misses


def stage_scan(con: _Console, llm_path: Path, count: int, names_file: Path, progress: bool):
    from conditune.scanning import scan_source
    from conditune.selection import select, write_selection

    records, meta = scan_source(str(llm_path), progress=progress)
    con.log(
        f"scan: {meta['records']} matrices, {meta['reused_from_cache']} from the cache, {meta['computed']} computed "
        f"({meta['seconds']:.1f} s)"
    )
    selection = select(records, "lowest", count=count, meta=meta)
    write_selection(selection, names_file)
    con.log(
        f"selected the {len(selection.chosen)} lowest-κ tensors ({selection.selected_params:,} parameters, "
        f"{100 * selection.share:.1f}% of the model) -> {names_file}"
    )
    return records, selection


def train_config(
    options: DemoOptions,
    speech: dict[str, Path],
    names_file: Path,
    train_dir: Path,
    *,
    max_seconds: float | None,
    max_steps: int,
    dev_utterances: int,
):
    from conditune.training.config import load_train_config

    eval_every = max(10, max_steps // 4)
    compressed = options.readout == "embeddings"
    overrides = {
        "model": {
            "encoder": {
                "backend": "ct2",
                "path": "demo:whisper-base",
                "compute_type": "float32",
                "threads": max(1, os.cpu_count() or 1),
            },
            "llm": {"path": "demo:smollm2", "dtype": "float32"},
            "adaptor": {
                "subsample": 4,
                "depth": 2,
                "heads": 9,
                "dropout": 0.1,
                "ctc_compress": compressed,
                "ctc_readout": options.readout,
            },
            "trainable": {"mode": "names", "names_file": str(names_file)},
        },
        "data": {
            "train": str(speech["train"]),
            "dev": str(speech["dev"]),
            "max_batch": options.batch,
            "encode_batch": 16,
        },
        "train": {
            "output_dir": str(train_dir),
            "overwrite": True,
            "seed": options.seed,
            "lr": options.lr,
            "llm_lr": options.llm_lr,
            "align_steps": options.align_steps,
            "align_lr": options.lr,
            "ctc_weight": options.ctc_weight if compressed else 0.0,
            "weight_decay": 0.01,
            "warmup_steps": min(20, max(1, max_steps // 10)),
            "schedule": "cosine",
            "max_steps": max_steps,
            "max_seconds": max_seconds,
            "clip_norm": 1.0,
            "log_every": max(1, min(5, max_steps // 10)),
            "eval_every": eval_every,
            "eval_max_utterances": dev_utterances,
            "save_every": 0,
            "keep_last": 1,
            "max_new_tokens": 48,
            "eval_batch": 8,
            "tensorboard": False,
            "progress": options.progress,
            "device": "cpu",
        },
    }
    return load_train_config(None, _flatten(overrides))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def eval_reserve(sizes: Sizes, options: DemoOptions) -> float:
    """Seconds kept back from training for the final evaluation and the report."""
    langs = 2
    return (
        LLM_LOAD_S
        + 10.0
        + langs * sizes.test * GENERATE_S_PER_UTT
        + langs * sizes.heldout * HELDOUT_S_PER_TEXT
        + options.agreement_prompts * AGREE_S_PER_PROMPT
        + 10.0
    )


def load_speech_and_base(final_dir: Path):
    """The trained speech model and its untouched base LLM, de-quantising the GGUF only once (~35 s on 2 cores)."""
    import copy

    from conditune.speech.encoders import build_encoder
    from conditune.speech.modeling import CONFIG_NAME, SpeechLLM, load_llm, load_tokenizer, new_adaptor, read_config

    config = read_config(final_dir)
    meta = json.loads((Path(final_dir) / CONFIG_NAME).read_text()).get("_meta", {})
    base = load_llm(config.llm)
    base.requires_grad_(False)
    base.eval()
    llm = copy.deepcopy(base)
    encoder = build_encoder(config.encoder)
    adaptor = new_adaptor(meta.get("encoder_dim", encoder.dim), llm, config)  # its trained state is loaded below
    model = SpeechLLM(config, encoder, llm, load_tokenizer(config.llm), adaptor=adaptor)
    model.load_trained_state(final_dir)
    model.eval()
    return model, base


def stage_evaluate(
    con: _Console, final_dir: Path, config, speech: dict[str, Path], sizes: Sizes, options: DemoOptions
) -> dict[str, Any]:
    import torch

    from conditune.evaluation.forgetting import DEFAULT_INSTRUCTIONS, greedy_agreement, read_texts, text_metrics
    from conditune.evaluation.wer import word_error_rate
    from conditune.speech.features import pad_frames
    from conditune.training.trainer import make_cache, prepare_examples, read_manifests

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    model, base = load_speech_and_base(final_dir)
    cache = make_cache(config, model.encoder)
    utts, _ = read_manifests(str(speech["test"]), strict=False)
    examples, _ = prepare_examples(utts, model, cache, strict=False, batch_size=16, max_text_tokens=None)
    order = sorted(range(len(examples)), key=lambda i: examples[i].frames)
    hyps: dict[int, str] = {}
    bar = _bar(options.progress, "test WER", len(order))
    try:
        for start in range(0, len(order), 8):
            idx = order[start : start + 8]
            frames, lengths = pad_frames(cache.get([examples[i].audio for i in idx]))
            hyps.update(zip(idx, model.generate_from_frames(frames, lengths, max_new_tokens=48)))
            if bar:
                bar[0].advance(bar[1], len(idx))
    finally:
        if bar:
            bar[0].stop()
    refs = [e.text for e in examples]
    langs = [e.language for e in examples]
    hyp_list = [hyps[i] for i in range(len(examples))]
    wer = word_error_rate(refs, hyp_list, langs) if examples else {"all": math.nan}
    predictions = [
        {"audio": str(e.audio), "language": e.language, "reference": e.text, "hypothesis": h}
        for e, h in zip(examples, hyp_list)
    ]
    timings["test_wer"] = time.monotonic() - t0
    con.log(
        "test WER: "
        + ", ".join(f"{k} {wer.get(k, math.nan):.1f}%" for k in ("en", "de", "all"))
        + f" ({len(examples)} utterances, {timings['test_wer']:.0f} s)"
    )

    t1 = time.monotonic()
    adapted = model.core_llm
    forgetting = {}
    for lang in ("en", "de"):
        texts = read_texts(speech[f"heldout_{lang}"], limit=sizes.heldout)
        forgetting[lang] = text_metrics(base, adapted, model.tokenizer, texts, batch_size=16, max_tokens=128)
        f = forgetting[lang]
        con.log(
            f"forgetting ({lang}, {f['texts']} held-out sentences, {f['tokens']} tokens): perplexity "
            f"{f['perplexity_base']:.2f} -> {f['perplexity_adapted']:.2f}, KL {f['kl_to_base']:.4f} nats/token"
        )
    timings["forgetting"] = time.monotonic() - t1
    agreement = None
    if options.agreement_prompts > 0:
        t2 = time.monotonic()
        agreement = greedy_agreement(
            base, adapted, model.tokenizer, DEFAULT_INSTRUCTIONS["en"][: options.agreement_prompts], max_new_tokens=24
        )
        timings["agreement"] = time.monotonic() - t2
        con.log(
            f"greedy agreement on {agreement['prompts']} English instructions: {100 * agreement['agreement']:.1f}% "
            f"of tokens, {100 * agreement['exact']:.0f}% identical answers"
        )
    return {
        "wer": wer,
        "predictions": predictions,
        "forgetting": forgetting,
        "agreement": agreement,
        "timings": timings,
        "adaptor_parameters": sum(p.numel() for p in model.adaptor.parameters()),
    }


# ---------------------------------------------------------------------------------------------- outputs


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_training(metrics_file: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics_file)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], marker="." if len(train) < 30 else None)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (nats/token)")
    ax1.set_title("training loss")
    ax1.grid(alpha=0.3)
    for key, style in (("wer_all", "-o"), ("wer_en", "--s"), ("wer_de", "--^")):
        pts = [(r["step"], r[key]) for r in evals if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if pts:
            ax2.plot(*zip(*pts), style, label=key[4:], markersize=4)
    ax2.set_xlabel("step")
    ax2.set_ylabel("dev WER (%)")
    ax2.set_title("dev WER")
    ax2.grid(alpha=0.3)
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend()
    _save_figure(fig, path)


def plot_kappa(records, selection, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from conditune.selection import parameter_name

    chosen = set(selection.names)
    sel, frozen = [], []
    for r in records:
        if r.status != "ok" or not r.kappa or not math.isfinite(r.kappa):
            continue
        (sel if parameter_name(r.name) in chosen else frozen).append(r.kappa)
    fig, ax = plt.subplots(figsize=(8, 4))
    values = sel + frozen
    if values:
        bins = np.logspace(math.log10(min(values)), math.log10(max(values)) + 1e-9, 40)
        ax.hist(frozen, bins=bins, alpha=0.6, label=f"frozen ({len(frozen)})", color="tab:gray")
        ax.hist(sel, bins=bins, alpha=0.8, label=f"selected, lowest κ ({len(sel)})", color="tab:blue")
    ax.set_xscale("log")
    ax.set_xlabel("condition number κ = σ_max/σ_min (log scale)")
    ax.set_ylabel("tensors")
    ax.set_title("SmolLM2-135M: κ of the trained vs frozen tensors")
    ax.legend()
    ax.grid(alpha=0.3)
    _save_figure(fig, path)


def machine_description() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "nan" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def write_report(
    path: Path,
    metrics: dict[str, Any],
    predictions: list[dict[str, Any]],
    machine: dict[str, Any],
    agreement: dict[str, Any] | None,
) -> None:
    w, f, fd, tr = metrics["wer"], metrics["forgetting"], metrics.get("forgetting_de", {}), metrics["trainable"]
    lines = [
        "# conditune demo report",
        "",
        f"Speech LLM: frozen Whisper base (CTranslate2) → adaptor → SmolLM2-135M-Instruct, training the adaptor and "
        f"the {tr['tensors']} lowest-κ LLM tensors ({tr['parameters']:,} LLM parameters + "
        f"{metrics.get('trainable_adaptor_parameters', 0):,} adaptor parameters) for {metrics['steps']} steps"
        f"{' after ' + str(metrics['align_steps']) + ' CTC alignment steps of the adaptor' if metrics.get('align_steps') else ''}"
        f"{READOUT_NOTE.get(metrics.get('readout'), '')}; "
        f"{metrics['seconds']:.0f} s in all (budget {metrics['budget_seconds']:.0f} s).",
        "",
        "## Results",
        "",
        "| metric | value |",
        "|---|---|",
        f"| test WER, English | {_fmt(w['en'], 1)} % |",
        f"| test WER, German | {_fmt(w['de'], 1)} % |",
        f"| test WER, all | {_fmt(w['all'], 1)} % |",
        f"| held-out English perplexity, base → adapted | {_fmt(f['perplexity_base'])} → {_fmt(f['perplexity_adapted'])} |",
        f"| KL(base ‖ adapted), English, nats/token | {_fmt(f['kl_to_base'], 4)} |",
    ]
    if fd:
        lines += [
            f"| held-out German perplexity, base → adapted | {_fmt(fd['perplexity_base'])} → {_fmt(fd['perplexity_adapted'])} |",
            f"| KL(base ‖ adapted), German, nats/token | {_fmt(fd['kl_to_base'], 4)} |",
        ]
    if agreement:
        lines += [
            f"| greedy agreement with the base on {agreement['prompts']} instructions | "
            f"{100 * agreement['agreement']:.1f} % of tokens, {100 * agreement['exact']:.0f} % identical |"
        ]
    lines += [
        "",
        "WER: percent, Whisper-normalised text, test split (synthetic speech, sentences never trained on). "
        "Perplexity and KL: the LLM alone on held-out sentences that are in no transcript.",
        "",
        "## Timings",
        "",
        "| stage | seconds |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.1f} |" for k, v in metrics["timings"].items()]
    lines += [
        "",
        f"Set-up before training: {metrics['setup_seconds']:.1f} s "
        f"({'cached data, features and scan' if metrics.get('setup_cached') else 'first run'}).",
        "",
        "## Example transcriptions",
        "",
        "| lang | reference | transcription |",
        "|---|---|---|",
    ]
    for p in _examples(predictions, 6):
        lines.append(f"| {p['language']} | {_cell(p['reference'])} | {_cell(p['hypothesis'])} |")
    if agreement and agreement.get("samples"):
        lines += [
            "",
            "## Instruction following, base vs adapted (greedy, 24 tokens)",
            "",
            "| prompt | base | adapted |",
            "|---|---|---|",
        ]
        for s in agreement["samples"][:4]:
            lines.append(f"| {_cell(s['prompt'])} | {_cell(s['base'])} | {_cell(s['adapted'])} |")
    lines += ["", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in machine.items() if v is not None]
    lines += [
        "",
        "Plots: `training.png` (training loss and dev WER over steps), `kappa_selected.png` (κ of the selected "
        "vs frozen tensors). Numbers: `metrics.json`; all test transcriptions: `predictions.jsonl`.",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def _cell(text: str, width: int = 140) -> str:
    text = " ".join((text or "").split())
    if len(text) > width:
        text = text[: width - 1] + "…"
    return text.replace("|", "\\|") or "∅"


def _examples(predictions: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    out = []
    for lang in ("en", "de"):
        out += [p for p in predictions if p["language"] == lang][: n // 2]
    return out


# ---------------------------------------------------------------------------------------------- recipe


def run_demo(options: DemoOptions, log: Callable[[str], None] | None = None) -> DemoResult:
    """Run the demo within ``options.minutes`` of wall-clock time; see the module docstring."""
    from conditune.models import conditune_home, model_path

    start = time.monotonic()
    budget = float(options.minutes) * 60.0
    if budget <= 0:
        raise CondituneError("--minutes must be positive")
    _quiet_libraries()
    output = Path(options.output)
    output.mkdir(parents=True, exist_ok=True)
    con = _Console(options.progress, start, budget)
    timings: dict[str, float] = {}

    def done(stage: str, since: float) -> float:
        timings[stage] = round(time.monotonic() - since, 2)
        return time.monotonic()

    sizes = plan_sizes(budget, options)
    minimum = eval_reserve(sizes, options) + LLM_LOAD_S + 2 * sizes.dev * GENERATE_S_PER_UTT + 15.0 + 10 * STEP_S
    if options.max_steps is None and budget < minimum:
        raise CondituneError(
            f"--minutes {options.minutes:g} is too short: evaluation and model loading alone take about "
            f"{minimum / 60:.1f} minutes on 2 cores (use --minutes 10 or more)"
        )
    t = time.monotonic()
    con.stage(1, "models", "SmolLM2-135M-Instruct (GGUF) and Whisper base (CTranslate2), checksummed")
    stage_models(con)
    t = done("models", t)

    speech_dir = Path(options.speech_dir) if options.speech_dir else conditune_home() / "demo" / "speech"
    con.stage(
        2,
        "data",
        f"English + German synthetic speech, {sizes.train}/{sizes.dev}/{sizes.test} train/dev/test per language",
    )
    speech, data_cached = stage_data(con, speech_dir, sizes, options.progress, options.vocab_size)
    t = done("synthesis", t)
    names_file = output / "selected_names.txt"
    train_dir = output / "train"
    dummy_cfg = train_config(
        options, speech, names_file, train_dir, max_seconds=None, max_steps=1, dev_utterances=2 * sizes.dev
    )
    hits, misses = encode_features(con, dummy_cfg, [speech["train"], speech["dev"], speech["test"]], options.progress)
    t = done("encoding", t)

    con.stage(3, "scan + select", f"κ of every SmolLM2 matrix (cached), the {options.count} lowest-κ tensors train")
    records, selection = stage_scan(con, model_path("smollm2"), options.count, names_file, options.progress)
    t = done("scan_select", t)
    setup_seconds = time.monotonic() - start
    setup_cached = data_cached and misses == 0
    con.log(f"set-up before training: {setup_seconds:.1f} s ({'all cached' if setup_cached else 'first run'})")

    reserve = eval_reserve(sizes, options)
    train_seconds = budget - (time.monotonic() - start) - reserve
    # train() stops at max_seconds, then evaluates dev once more and saves: keep that out of the budget too
    final_dev = 2 * sizes.dev * GENERATE_S_PER_UTT + 15.0
    max_seconds = train_seconds - final_dev
    if max_steps := options.max_steps:
        pass
    else:
        if max_seconds - LLM_LOAD_S < 2 * STEP_S:
            raise CondituneError(
                f"--minutes {options.minutes} leaves no time to train after the set-up "
                f"({setup_seconds:.0f} s) and the evaluation reserve ({reserve:.0f} s)"
            )
        # train() loads the LLM and runs the alignment steps inside its budget
        max_steps = max(2, int((max_seconds - LLM_LOAD_S - options.align_steps * ALIGN_STEP_S) / STEP_S_SAFE))
    con.stage(
        4,
        "train",
        f"adaptor + {len(selection.chosen)} tensors, up to {max_steps} steps / {_clock(max(0, max_seconds))} "
        f"(evaluation reserve {_clock(reserve)})",
    )
    from conditune.training.trainer import train

    config = train_config(
        options,
        speech,
        names_file,
        train_dir,
        max_seconds=max(1.0, max_seconds) if not options.max_steps else None,
        max_steps=max_steps,
        dev_utterances=2 * sizes.dev,
    )
    result = train(config, log=con.log)
    t = done("train", t)

    con.stage(
        5,
        "evaluate",
        f"test WER ({2 * sizes.test} utterances) and forgetting ({sizes.heldout} held-out sentences per language)",
    )
    ev = stage_evaluate(con, result.final_dir, config, speech, sizes, options)
    t = done("evaluate", t)

    con.stage(6, "report", f"metrics.json, report.md, training.png, kappa_selected.png in {output}")
    fe, fd = ev["forgetting"]["en"], ev["forgetting"]["de"]
    keys = ("perplexity_base", "perplexity_adapted", "kl_to_base")
    metrics: dict[str, Any] = {
        "wer": {k: ev["wer"].get(k, math.nan) for k in ("en", "de", "all")},
        "forgetting": {k: fe[k] for k in keys} | {"tokens": fe["tokens"], "texts": fe["texts"]},
        "trainable": {"tensors": len(selection.chosen), "parameters": selection.selected_params},
        "steps": max(0, result.step - options.align_steps),  # main steps (Algorithm 1)
        "align_steps": min(result.step, options.align_steps),
        "readout": options.readout,
        "seconds": 0.0,
        "forgetting_de": {k: fd[k] for k in keys} | {"tokens": fd["tokens"], "texts": fd["texts"]},
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
        "timings": timings,
    }
    atomic_write_text(
        output / "predictions.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in ev["predictions"])
    )
    plot_training(train_dir / "metrics.jsonl", output / "training.png")
    plot_kappa(records, selection, output / "kappa_selected.png")
    metrics["timings"]["evaluate_detail"] = {k: round(v, 2) for k, v in ev["timings"].items()}
    timings["report"] = round(time.monotonic() - t, 2)
    metrics["seconds"] = round(time.monotonic() - start, 2)
    report_timings = {k: v for k, v in timings.items() if isinstance(v, (int, float))}
    write_report(
        output / "report.md",
        {**metrics, "timings": report_timings},
        ev["predictions"],
        machine_description(),
        ev["agreement"],
    )
    atomic_write_json(output / "metrics.json", _finite(metrics))
    con.log(
        f"done in {_clock(metrics['seconds'])}: WER all {_fmt(metrics['wer']['all'], 1)}%, "
        f"perplexity {_fmt(fe['perplexity_base'])} -> {_fmt(fe['perplexity_adapted'])}, KL {_fmt(fe['kl_to_base'], 4)}"
    )
    return DemoResult(output=output, metrics=metrics, timings=timings, setup_seconds=setup_seconds)


def _finite(obj):
    """NaN/inf -> None so that metrics.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
