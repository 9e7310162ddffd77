"""Training loop for the speech LLM (adaptor + selected LLM tensors).

``train(config)`` is the whole of ``conditune train``: it reads the manifests, encodes every utterance
once with the frozen encoder (cached on disk), builds length-bucketed batches, and runs AdamW with
warmup + cosine/linear decay, gradient clipping and accumulation under an ``accelerate.Accelerator``
(bf16 autocast on GPU when ``train.mixed_precision: bf16``). Optional ``align_steps`` CTC steps of the
adaptor alone come first. It evaluates WER on the dev manifest every ``eval_every`` main steps, writes
checkpoints every ``save_every`` steps (keeping the last ``keep_last``), logs metrics to ``metrics.jsonl`` (and TensorBoard when installed), and stops at ``max_steps`` or after
``max_seconds`` of wall-clock time, whichever comes first.

Hooks for experiments (``conditune experiment``): ``eval_hook(step, model)`` runs at every evaluation
(``eval_every`` steps and the end) and its metrics join the ``eval`` record in ``metrics.jsonl``; every
``train`` record carries ``data_sha``, a hash chained over the example ids of every batch consumed so
far (kept in checkpoints), so two runs that saw the same batches in the same order have equal hashes.

Resuming (``resume=True``) restores model, optimizer, scheduler, RNG states and the data position
(epoch, batch index) of the latest checkpoint: the losses that follow are the ones an uninterrupted run
would have produced.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from conditune.errors import CondituneError
from conditune.io import atomic_write_json, atomic_write_text
from conditune.training import checkpoint as ckpt
from conditune.training.config import TrainConfig, load_train_config

METRICS_NAME = "metrics.jsonl"
FINAL_DIR = "final"


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path | None
    step: int
    total_steps: int
    stopped: str  # max_steps | max_seconds | stop_after_steps
    losses: dict[int, float] = field(default_factory=dict)  # optimizer step -> mean loss of its micro-batches
    eval: dict[str, Any] | None = None
    elapsed_s: float = 0.0
    seconds_per_step: float = 0.0  # main steps only, evaluations and checkpoints excluded
    align_seconds_per_step: float = 0.0  # alignment (CTC) steps, likewise
    tokens_per_second: float = 0.0  # LLM positions (audio + text) processed per second
    train_utterances: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    trainable_params: int = 0  # adaptor + LLM
    trainable_llm_params: int = 0
    data_sha: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "output_dir": str(self.output_dir),
            "final_dir": str(self.final_dir) if self.final_dir else None,
            "step": self.step,
            "total_steps": self.total_steps,
            "stopped": self.stopped,
            "final_loss": self.losses[max(self.losses)] if self.losses else None,
            "eval": self.eval,
            "elapsed_s": round(self.elapsed_s, 3),
            "seconds_per_step": round(self.seconds_per_step, 4),
            "align_seconds_per_step": round(self.align_seconds_per_step, 4),
            "tokens_per_second": round(self.tokens_per_second, 1),
            "train_utterances": self.train_utterances,
            "skipped": self.skipped,
            "trainable_params": self.trainable_params,
            "trainable_llm_params": self.trainable_llm_params,
            "data_sha": self.data_sha,
        }


@dataclass
class Example:
    audio: Path
    text: str
    language: str
    tokens: list[int]
    frames: int


# ---------------------------------------------------------------------------------------------- data


def read_manifests(paths: str | Sequence[str] | None, strict: bool) -> tuple[list, int]:
    from conditune.data.manifest import read_manifest

    if not paths:
        return [], 0
    if isinstance(paths, (str, Path)):
        paths = [paths]
    utterances, skipped = [], 0
    for path in paths:
        data = read_manifest(path, strict=strict)
        utterances += data.utterances
        skipped += len(data.skipped)
    return utterances, skipped


def balanced_subset(utterances: Sequence, limit: int) -> list:
    """At most ``limit`` utterances, shared evenly between the languages (the first ones of each, in manifest
    order), so a dev subset of a manifest sorted by language still scores every language."""
    by_language: dict[str, list[int]] = {}
    for i, utt in enumerate(utterances):
        by_language.setdefault(getattr(utt, "language", "en") or "en", []).append(i)
    share, extra = divmod(limit, max(1, len(by_language)))
    chosen = {
        i
        for n, group in enumerate(by_language.values())  # an uneven remainder goes to the first languages
        for i in group[: share + (n < extra)]
    }
    return [u for i, u in enumerate(utterances) if i in chosen]


def prepare_examples(
    utterances,
    model,
    cache,
    *,
    strict: bool,
    batch_size: int,
    max_text_tokens: int | None,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[Example], dict[str, int]]:
    """Encode (or find cached) every utterance's audio and tokenise its text; drop what cannot be used."""
    lengths, bad = cache.prepare([u.audio for u in utterances], strict=strict, batch_size=batch_size, progress=progress)
    examples, too_long = [], 0
    for i, utt in enumerate(utterances):
        if i not in lengths:
            continue
        tokens = model.encode_text(utt.text)
        if max_text_tokens and len(tokens) > max_text_tokens:
            too_long += 1
            continue
        examples.append(Example(Path(utt.audio), utt.text, getattr(utt, "language", "en") or "en", tokens, lengths[i]))
    return examples, {"bad_audio": len(bad), "text_too_long": too_long}


def make_cache(config: TrainConfig, encoder):
    from conditune.models import conditune_home
    from conditune.speech.features import FeatureCache

    root = config.data.feature_cache or (conditune_home() / "features")
    return FeatureCache(encoder, root, memory=config.data.memory_cache)


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate_examples(
    model,
    examples: Sequence[Example],
    cache,
    *,
    batch_size: int = 8,
    num_beams: int = 1,
    max_new_tokens: int = 64,
    autocast=None,
) -> dict[str, Any]:
    """Greedy/beam transcription of ``examples`` and WER per language (+ ``all``)."""
    from conditune.evaluation.wer import word_error_rate
    from conditune.speech.features import pad_frames

    hyps: list[str] = []
    order = sorted(range(len(examples)), key=lambda i: examples[i].frames)  # little padding
    by_index: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        frames, lengths = pad_frames(cache.get([examples[i].audio for i in idx]))
        ctx = autocast() if autocast is not None else _null()
        with ctx:
            texts = model.generate_from_frames(frames, lengths, num_beams=num_beams, max_new_tokens=max_new_tokens)
        by_index.update(zip(idx, texts))
    hyps = [by_index[i] for i in range(len(examples))]
    refs = [e.text for e in examples]
    langs = [e.language for e in examples]
    wer = word_error_rate(refs, hyps, langs) if examples else {"all": math.nan}
    return {
        "wer": wer,
        "predictions": [
            {"audio": str(e.audio), "reference": e.text, "hypothesis": h, "language": e.language}
            for e, h in zip(examples, hyps)
        ],
    }


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------- optimisation


def build_optimizer(model, config: TrainConfig) -> torch.optim.Optimizer:
    t = config.train
    groups: dict[tuple[str, float, float], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "adaptor" if name.startswith("adaptor.") else "llm"
        lr = t.lr if part == "adaptor" or t.llm_lr is None else t.llm_lr
        decay = t.weight_decay if param.ndim >= 2 else 0.0
        groups.setdefault((part, lr, decay), []).append(param)
    if not groups:
        raise CondituneError("nothing to train: no trainable parameters")
    params = [{"params": p, "lr": lr, "weight_decay": wd, "name": part} for (part, lr, wd), p in sorted(groups.items())]
    return torch.optim.AdamW(params, lr=t.lr, betas=(t.beta1, t.beta2))


def schedule_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Learning-rate multiplier after ``step`` scheduler steps: linear warmup, then cosine/linear decay or constant
    (the shapes of transformers' ``get_*_schedule_with_warmup``)."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return max(0.0, 1.0 - progress)


def build_scheduler(optimizer, config: TrainConfig, total_steps: int):
    """Two phases: ``align_steps`` at a constant (warmed-up) adaptor rate, then the main schedule over the rest."""
    t = config.train
    align = min(t.align_steps, total_steps)
    main = total_steps - align
    align_ratio = (t.align_lr / t.lr) if t.align_lr else 1.0

    def main_factor(step: int) -> float:
        if step < align:
            return schedule_factor(step, min(t.warmup_steps, align), align, "constant")
        return schedule_factor(step - align, min(t.warmup_steps, main), main, t.schedule)

    def adaptor_factor(step: int) -> float:
        return main_factor(step) * (align_ratio if step < align else 1.0)

    lambdas = [adaptor_factor if group.get("name") == "adaptor" else main_factor for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


# ---------------------------------------------------------------------------------------------- logging


class MetricsLog:
    def __init__(self, output_dir: Path, tensorboard: bool):
        self.path = output_dir / METRICS_NAME
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(output_dir / "tensorboard"))
            except Exception:  # noqa: BLE001 - tensorboard not installed: skip quietly
                self.writer = None

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (a resumed run re-creates them)."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step",) and math.isfinite(value):
                    self.writer.add_scalar(f"{record.get('kind', 'train')}/{key}", value, record.get("step", 0))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _progress(enabled: bool, total: int, start: int):
    if not enabled:
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    progress.start()
    task = progress.add_task("train", total=total, completed=start, loss="-")
    return progress, task


class _encode_progress:
    """Context manager yielding ``advance(n)`` for a rich bar over the encoding pass (no-op when disabled)."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.progress = enabled, total, None

    def __enter__(self) -> Callable[[int], None] | None:
        if not self.enabled or not self.total:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]encode"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        self.progress.start()
        task = self.progress.add_task("encode", total=self.total)
        return lambda n: self.progress.update(task, advance=n)

    def __exit__(self, *exc) -> bool:
        if self.progress is not None:
            self.progress.stop()
        return False


# ---------------------------------------------------------------------------------------------- train


def chain_data_sha(previous: str, ids: Sequence[str]) -> str:
    """The data hash after one more batch: sha256 over the previous hash and the batch's example ids."""
    return hashlib.sha256((previous + "\n" + "\t".join(ids)).encode()).hexdigest()


def train(
    config: TrainConfig | dict | str | Path,
    *,
    resume: bool | str | Path = False,
    stop_after_steps: int | None = None,
    log: Callable[[str], None] | None = None,
    eval_hook: Callable[[int, Any], dict[str, Any] | None] | None = None,
) -> TrainResult:
    """Train (or resume training) a speech LLM as ``config`` says; see the module docstring.

    ``resume``: True for the latest checkpoint in ``train.output_dir``, or a checkpoint folder.
    ``stop_after_steps``: end the process-like run after this many optimizer steps *without* saving
    anything (used to simulate a kill in tests); the schedule still spans ``max_steps``.
    ``eval_hook(step, model)``: extra metrics (a flat dict of numbers) at every evaluation, written into
    the same ``eval`` record of ``metrics.jsonl`` (the model is the unwrapped :class:`SpeechLLM`).
    """
    from accelerate.utils import set_seed

    from conditune.speech.features import pad_frames
    from conditune.speech.modeling import SpeechLLM

    if isinstance(config, (str, Path)):
        config = load_train_config(config)
    elif isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    config.validate()
    t = config.train
    log = log or (lambda msg: None)
    wall_start = time.monotonic()
    out = Path(t.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    resume_from: Path | None = None
    if resume:
        resume_from = ckpt.latest_checkpoint(out) if resume is True else Path(resume)
        if resume_from is None:
            log(f"no checkpoint in {out / 'checkpoints'}: starting from scratch")
    if resume_from is None and (ckpt.list_checkpoints(out) or (out / FINAL_DIR).exists()):
        if not t.overwrite:
            raise CondituneError(
                f"{out} already holds a training run: resume it (--resume), "
                "choose another train.output_dir, or set train.overwrite=true"
            )
        import shutil

        shutil.rmtree(ckpt.checkpoints_root(out), ignore_errors=True)
        shutil.rmtree(out / FINAL_DIR, ignore_errors=True)

    set_seed(t.seed)
    # Under DDP the LLM's trainable tensors get no gradient in alignment steps: DDP must then expect unused ones.
    accelerator = _make_accelerator(t.mixed_precision, cpu=(t.device == "cpu"), find_unused=t.align_steps > 0)
    model = SpeechLLM.build(config.model, for_training=True)
    if t.device not in (None, "cpu"):
        model.to(t.device)
    cache = make_cache(config, model.encoder)

    # --- data: every utterance encoded once (cached), tokenised once
    train_utts, train_bad_rows = read_manifests(config.data.train, config.data.strict)
    dev_utts, dev_bad_rows = read_manifests(config.data.dev, config.data.strict)
    if t.eval_max_utterances:
        dev_utts = balanced_subset(dev_utts, t.eval_max_utterances)
    log(
        f"encoding {len(train_utts) + len(dev_utts)} utterances with the frozen {model.encoder.backend} encoder (cached)"
    )
    with _encode_progress(t.progress, len(train_utts) + len(dev_utts)) as advance:
        train_ex, train_skip = prepare_examples(
            train_utts,
            model,
            cache,
            strict=config.data.strict,
            progress=advance,
            batch_size=config.data.encode_batch,
            max_text_tokens=config.data.max_text_tokens,
        )
        dev_ex, dev_skip = prepare_examples(
            dev_utts,
            model,
            cache,
            strict=config.data.strict,
            progress=advance,
            batch_size=config.data.encode_batch,
            max_text_tokens=config.data.max_text_tokens,
        )
    skipped = {
        "train_rows": train_bad_rows,
        "train_bad_audio": train_skip["bad_audio"],
        "train_text_too_long": train_skip["text_too_long"],
        "dev_rows": dev_bad_rows,
        "dev_bad_audio": dev_skip["bad_audio"],
        "dev_text_too_long": dev_skip["text_too_long"],
    }
    if any(skipped.values()):
        log("skipped: " + ", ".join(f"{k}={v}" for k, v in skipped.items() if v))
    if not train_ex:
        raise CondituneError("no usable training utterances (all skipped)")

    from conditune.data.batching import length_bucketed_batches

    k = config.model.adaptor.subsample
    seq_lengths = [math.ceil(e.frames / k) + len(e.tokens) + 2 for e in train_ex]

    def epoch_batches(epoch: int) -> list[list[int]]:
        return length_bucketed_batches(seq_lengths, config.data.max_batch, t.seed, epoch)

    if t.align_steps or t.ctc_weight:
        model.set_ctc_vocabulary([tok for e in train_ex for tok in e.tokens])
    else:  # no CTC loss in this run: its head gets no gradient, so it is no optimizer (or DDP) parameter
        model.adaptor.ctc_blank.requires_grad_(False)
        model.adaptor.ctc_log_scale.requires_grad_(False)
    batches_per_epoch = len(epoch_batches(0))
    world, rank, is_main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    # Under DDP every rank takes its own batch of each group of `world` consecutive batches: the global order is
    # the single-process one, and N processes x grad_accum k see exactly what 1 process x grad_accum N*k sees.
    main_steps = t.max_steps or max(1, math.ceil(t.epochs * batches_per_epoch / (t.grad_accum * world)))
    total_steps = t.align_steps + main_steps

    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)

    metrics = MetricsLog(out, t.tensorboard and is_main)
    step, epoch, batch_index, tokens_seen, prior_elapsed, data_sha = 0, 0, 0, 0, 0.0, ""
    if resume_from is not None:
        state = ckpt.read_trainer_state(resume_from)
        core.load_trained_state(resume_from)
        optimizer.load_state_dict(ckpt.load_torch(resume_from / "optimizer.pt"))
        scheduler.load_state_dict(ckpt.load_torch(resume_from / "scheduler.pt"))
        step, epoch, batch_index = int(state["step"]), int(state["epoch"]), int(state["batch_index"])
        tokens_seen, prior_elapsed = int(state.get("tokens_seen", 0)), float(state.get("elapsed_s", 0.0))
        data_sha = str(state.get("data_sha", ""))
        if is_main:
            metrics.truncate_after(step)
        ckpt.set_rng_state(ckpt.load_torch(resume_from / "rng.pt"))
        log(f"resumed from {resume_from} at step {step} (epoch {epoch}, batch {batch_index})")
    elif is_main and (out / METRICS_NAME).exists():
        metrics.truncate_after(0)

    config_yaml = config.to_yaml()
    if is_main:
        atomic_write_text(out / "train_config.yaml", config_yaml)

    def trainer_state() -> dict[str, Any]:
        return {
            "step": step,
            "epoch": epoch,
            "batch_index": batch_index,
            "total_steps": total_steps,
            "align_steps": t.align_steps,
            "tokens_seen": tokens_seen,
            "elapsed_s": prior_elapsed + (time.monotonic() - wall_start),
            "batches_per_epoch": batches_per_epoch,
            "data_sha": data_sha,
            "world_size": world,
        }

    def save() -> None:
        if is_main:
            ckpt.save_checkpoint(out, step, core, optimizer, scheduler, trainer_state(), config_yaml, t.keep_last)
        accelerator.wait_for_everyone()

    def run_eval() -> dict[str, Any] | None:
        """Dev WER (+ the hook's metrics) on the main process; the others wait."""
        wer_result = None
        if is_main and (dev_ex or eval_hook is not None):
            record: dict[str, Any] = {"kind": "eval", "step": step}
            if dev_ex:
                res = evaluate_examples(
                    core,
                    dev_ex,
                    cache,
                    batch_size=t.eval_batch,
                    num_beams=t.num_beams,
                    max_new_tokens=t.max_new_tokens,
                    autocast=accelerator.autocast,
                )
                wer = {k: v for k, v in res["wer"].items() if k != "counts"}
                record.update({f"wer_{k}": v for k, v in wer.items()})
                atomic_write_text(
                    out / "eval_predictions.jsonl", "".join(json.dumps(p) + "\n" for p in res["predictions"])
                )
                log(f"step {step}: dev WER " + ", ".join(f"{k} {v:.2f}" for k, v in wer.items()))
                wer_result = res["wer"]
            if eval_hook is not None:
                with accelerator.autocast():
                    extra = eval_hook(step, core) or {}
                record.update(extra)
            metrics.write(record)
        accelerator.wait_for_everyone()
        return wer_result

    def next_batch() -> list[int]:
        """This rank's batch of the next `world` batches; the data hash chains over all of them."""
        nonlocal epoch, batch_index, batches, data_sha
        group = []
        for _ in range(world):
            if batch_index >= len(batches):
                epoch, batch_index = epoch + 1, 0
                batches = epoch_batches(epoch)
            group.append(batches[batch_index])
            batch_index += 1
            data_sha = chain_data_sha(data_sha, [str(train_ex[i].audio) for i in group[-1]])
        return group[rank]

    def out_of_time() -> bool:
        if t.max_seconds is None:
            return False
        late = torch.tensor([float(time.monotonic() - wall_start >= t.max_seconds)], device=accelerator.device)
        return bool(accelerator.reduce(late, "max").item()) if world > 1 else bool(late.item())  # all ranks agree

    result = TrainResult(
        out,
        None,
        step,
        total_steps,
        "max_steps",
        train_utterances=len(train_ex),
        skipped=skipped,
        trainable_params=sum(p.numel() for p in core.parameters() if p.requires_grad),
        trainable_llm_params=sum(p.numel() for p in core.llm.parameters() if p.requires_grad),
    )
    bar = _progress(t.progress and is_main, total_steps, step)
    model.train()
    batches = epoch_batches(epoch)
    window_loss, window_steps = 0.0, 0
    run_steps, run_tokens, loop_start = 0, 0, time.monotonic()
    phase_seconds, phase_steps = {True: 0.0, False: 0.0}, {True: 0, False: 0}  # keyed by "aligning"
    eval_result = None
    last_saved = step if resume_from is not None else -1
    try:
        while step < total_steps:
            aligning = step < t.align_steps
            step_start = time.monotonic()
            step_loss, step_tokens = torch.zeros((), device=accelerator.device), 0
            for micro in range(t.grad_accum):
                idx = next_batch()
                frames, lengths = pad_frames(cache.get([train_ex[i].audio for i in idx]))
                # gradients are all-reduced on the last micro-batch only
                sync = micro == t.grad_accum - 1 or world == 1
                with _null() if sync else accelerator.no_sync(model):
                    out_ = model(
                        frames,
                        lengths,
                        [train_ex[i].tokens for i in idx],
                        ctc_weight=t.ctc_weight,
                        run_llm=not aligning,
                    )
                    accelerator.backward(out_.loss / t.grad_accum)
                step_loss += out_.loss.detach() / t.grad_accum
                step_tokens += int(sum(math.ceil(int(n) / k) for n in lengths)) + sum(
                    len(train_ex[i].tokens) + 2 for i in idx
                )
            if t.clip_norm:
                accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], t.clip_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            run_steps += 1
            phase_seconds[aligning] += time.monotonic() - step_start
            phase_steps[aligning] += 1
            step_loss = float(accelerator.reduce(step_loss, "mean")) if world > 1 else float(step_loss)
            tokens_seen += step_tokens * world
            run_tokens += step_tokens * world
            result.losses[step] = step_loss
            window_loss += step_loss
            window_steps += 1
            if bar:
                bar[0].update(bar[1], completed=step, loss=f"{step_loss:.4f}" + (" (align)" if aligning else ""))
            if is_main and (step % max(1, t.log_every) == 0 or step == total_steps or step == t.align_steps):
                elapsed = time.monotonic() - loop_start
                metrics.write(
                    {
                        "kind": "train",
                        "step": step,
                        "epoch": epoch,
                        "phase": "align" if aligning else "main",
                        "loss": window_loss / window_steps,
                        **_learning_rates(optimizer),
                        "data_sha": data_sha,
                        "tokens_per_s": run_tokens / max(elapsed, 1e-9),
                        "elapsed_s": round(prior_elapsed + time.monotonic() - wall_start, 3),
                    }
                )
            if step % max(1, t.log_every) == 0 or step == total_steps or step == t.align_steps:
                window_loss, window_steps = 0.0, 0
            if stop_after_steps is not None and run_steps >= stop_after_steps and step < total_steps:
                result.stopped = "stop_after_steps"
                break
            # evaluations count main steps: in the alignment stage the LLM has not changed and cannot read yet
            if (
                t.eval_every
                and step > t.align_steps
                and (step - t.align_steps) % t.eval_every == 0
                and step < total_steps
            ):
                eval_result = run_eval()
                model.train()
            if t.save_every and step % t.save_every == 0 and step < total_steps:
                save()
                last_saved = step
            if out_of_time() and step < total_steps:
                result.stopped = "max_seconds"
                break
    finally:
        if bar:
            bar[0].stop()

    loop_elapsed = time.monotonic() - loop_start
    result.step = step
    result.data_sha = data_sha
    result.seconds_per_step = phase_seconds[False] / max(phase_steps[False], 1)
    result.align_seconds_per_step = phase_seconds[True] / max(phase_steps[True], 1)
    result.tokens_per_second = run_tokens / max(loop_elapsed, 1e-9)
    if result.stopped == "stop_after_steps":  # a simulated kill: nothing more is written
        metrics.close()
        result.elapsed_s = time.monotonic() - wall_start
        return result

    eval_result = run_eval() or eval_result
    result.eval = eval_result
    if last_saved != step:
        save()
    final = out / FINAL_DIR
    if is_main:
        _save_final(core, final)
    accelerator.wait_for_everyone()
    result.final_dir = final
    result.elapsed_s = time.monotonic() - wall_start
    if is_main:
        atomic_write_json(out / "result.json", result.to_dict())
    metrics.close()
    log(f"stopped at step {step}/{total_steps} ({result.stopped}); model in {final}")
    return result


def _learning_rates(optimizer) -> dict[str, float]:
    rates: dict[str, float] = {}
    for group in optimizer.param_groups:
        rates.setdefault("lr" if group.get("name") == "adaptor" else "llm_lr", group["lr"])
    return rates


def _make_accelerator(mixed_precision: str, cpu: bool, find_unused: bool = False):
    """An Accelerator; in a single process a later ``train()`` may use other settings than an earlier one."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedDataParallelKwargs

    kwargs = {
        "mixed_precision": mixed_precision,
        "cpu": cpu,
        "kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
    }
    try:
        return Accelerator(**kwargs)
    except ValueError as exc:
        if "already been initialized" not in str(exc) or PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(**kwargs)


def _save_final(model, final: Path) -> None:
    import os
    import shutil
    import tempfile

    staging = Path(tempfile.mkdtemp(prefix=".final-", dir=final.parent))
    try:
        model.save_pretrained(staging)
        old = None
        if final.exists():
            old = final.with_name(f".final-old-{os.getpid()}")
            os.replace(final, old)
        os.replace(staging, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
