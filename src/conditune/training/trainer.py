"""The speech LLM trainer (adaptor + selected LLM tensors), under an ``accelerate.Accelerator``.

:class:`Trainer` reads the manifests, encodes every utterance once with the frozen encoder (cached on
disk), builds length-bucketed batches, and runs AdamW with warmup + cosine/linear decay, gradient
clipping and accumulation (bf16 autocast on GPU with ``training.mixed_precision: bf16``). Optional
``training.align_steps`` CTC steps of the adaptor alone come first. It evaluates dev WER every
``evaluation.every`` main steps, writes checkpoints every ``output.save_every`` steps (keeping the last
``output.keep_last``), logs to ``metrics.jsonl`` (and TensorBoard when installed), and stops at
``training.max_steps`` or after ``training.max_seconds`` of wall-clock time, whichever comes first.

Each stage is a method: :meth:`~Trainer.setup` (output folder, model, data, optimiser and schedule,
resume), :meth:`~Trainer.train_step`, :meth:`~Trainer.evaluate`, :meth:`~Trainer.save_checkpoint`,
:meth:`~Trainer.save_final`; :meth:`~Trainer.fit` runs the loop. :func:`train` is the whole of
``conditune train``.

For experiments: ``eval_hook(step, model, processor)`` runs at every evaluation and its metrics join the
``eval`` record; every ``train`` record carries ``data_sha``, a hash chained over the example ids of every batch
consumed so far (kept in checkpoints), so two runs that saw the same batches in the same order have
equal hashes. Resuming restores model, optimizer, scheduler, RNG states and the data position: the losses
that follow are the ones an uninterrupted run would have produced.

Sharing an alignment stage: ``fit(stop_at=align_steps)`` ends a run right after its alignment stage with a
checkpoint; another run with ``training.init_from: <that checkpoint>`` starts its main phase from it (the
adaptor and CTC head, their optimizer state, the RNG states, the data position and the step counter) with its own
trainable LLM tensors, which get no gradient in the alignment stage and so have no optimizer state there: its
losses are those of the same run with its own alignment stage. Every run logs a ``main_start`` record with
hashes of the adaptor state and of its optimizer state its main phase starts from, so runs that share an
alignment stage can be checked to have started from the same one.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from conditune.errors import CondituneError
from conditune.io import atomic_write_json, atomic_write_text
from conditune.training import checkpoint as ckpt
from conditune.training.config import TrainConfig, load_train_config
from conditune.training.optim import adaptor_groups, build_optimizer, build_scheduler, learning_rates, scheduler_at
from conditune.training.progress import METRICS_NAME, MetricsLog, ProgressBar

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
    trainable_params: int = 0  # adaptor + CTC head + LLM
    trainable_llm_params: int = 0
    data_sha: str = ""
    main_start: dict[str, Any] = field(default_factory=dict)  # the adaptor hashes the main phase started from

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
            "main_start": self.main_start,
        }


@dataclass
class TrainerState:
    """Where a run stands; saved in every checkpoint's ``trainer_state.json``."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0
    tokens_seen: int = 0
    prior_elapsed: float = 0.0  # wall-clock seconds of the invocations before a resume
    data_sha: str = ""


def chain_data_sha(previous: str, ids: Sequence[str]) -> str:
    """The data hash after one more batch: sha256 over the previous hash and the batch's example ids."""
    return hashlib.sha256((previous + "\n" + "\t".join(ids)).encode()).hexdigest()


class Trainer:
    def __init__(
        self,
        config: TrainConfig | Mapping[str, Any] | str | Path,
        *,
        log: Callable[[str], None] | None = None,
        eval_hook: Callable[[int, Any, Any], dict[str, Any] | None] | None = None,
        llm=None,
    ):
        """``llm``: an already loaded copy of ``model.llm`` to train (it is changed), instead of loading it."""
        if not isinstance(config, TrainConfig):
            config = load_train_config(config)
        config.validate()
        self.config = config
        self.log = log or (lambda msg: None)
        self.eval_hook = eval_hook
        self.preloaded_llm = llm
        self.out = Path(config.output.dir)
        self.state = TrainerState()
        self.losses: dict[int, float] = {}

    # ------------------------------------------------------------------ set-up

    def setup(self, resume: bool | str | Path = False) -> None:
        """Output folder, seed, accelerator, model, data, optimiser and schedule; then the checkpoint to resume."""
        from accelerate.utils import set_seed

        self.wall_start = time.monotonic()
        resume_from = self.prepare_output(resume)
        t = self.config.training
        set_seed(t.seed)
        # Under DDP the LLM's trainable tensors get no gradient in alignment steps: DDP must then expect unused ones.
        self.accelerator = make_accelerator(t.mixed_precision, cpu=(t.device == "cpu"), find_unused=t.align_steps > 0)
        self.world = self.accelerator.num_processes
        self.rank, self.is_main = self.accelerator.process_index, self.accelerator.is_main_process
        self.setup_model()
        self.setup_data()
        self.setup_optimizer()
        self.metrics = MetricsLog(self.out, self.config.output.tensorboard and self.is_main)
        self.resumed = resume_from is not None
        if resume_from is not None:
            self.resume(resume_from)
        elif self.is_main and (self.out / METRICS_NAME).exists():
            self.metrics.truncate_after(0)
        if resume_from is None and t.init_from is not None:
            self.init_from(Path(t.init_from))
        self.config_yaml = self.config.to_yaml()
        if self.is_main:
            atomic_write_text(self.out / "train_config.yaml", self.config_yaml)

    def prepare_output(self, resume: bool | str | Path) -> Path | None:
        """The checkpoint to resume from (None: a fresh run); a fresh run refuses a folder that holds one."""
        from conditune.io import check_writable

        check_writable(self.out, folder=True)  # before minutes of model loading
        self.out.mkdir(parents=True, exist_ok=True)
        resume_from = None
        if resume:
            resume_from = ckpt.latest_intact_checkpoint(self.out, self.log) if resume is True else Path(resume)
            if resume_from is None:
                self.log(f"no checkpoint in {self.out / 'checkpoints'}: starting from scratch")
        if resume_from is None and (ckpt.list_checkpoints(self.out) or (self.out / FINAL_DIR).exists()):
            if not self.config.output.overwrite:
                raise CondituneError(
                    f"{self.out} already holds a training run: resume it (--resume), "
                    "choose another output.dir, or set output.overwrite=true"
                )
            import shutil

            shutil.rmtree(ckpt.checkpoints_root(self.out), ignore_errors=True)
            shutil.rmtree(self.out / FINAL_DIR, ignore_errors=True)
        return resume_from

    def setup_model(self) -> None:
        from conditune.models import conditune_home
        from conditune.speech.modeling import SpeechLLM
        from conditune.speech.processing import SpeechProcessor

        cfg = self.config
        cache_dir = cfg.data.feature_cache or (conditune_home() / "features")
        self.processor = SpeechProcessor.from_config(cfg.model, cache_dir=cache_dir, memory_cache=cfg.data.memory_cache)
        self.model = SpeechLLM.build(
            cfg.model, encoder_dim=self.processor.encoder.dim, tokenizer=self.processor.tokenizer, for_training=True,
            llm=self.preloaded_llm,
        )  # fmt: skip
        self.preloaded_llm = None
        if cfg.training.device not in (None, "cpu"):
            self.model.to(cfg.training.device)

    def setup_data(self) -> None:
        """Every utterance encoded once (cached) and tokenised once; batches are a pure function of the seed."""
        from conditune.data.examples import balanced_subset, prepare_examples, read_manifests

        d, e = self.config.data, self.config.evaluation
        train_utts, train_rows = read_manifests(d.manifests("train"), strict=d.strict)
        dev_utts, dev_rows = read_manifests(d.manifests("dev"), strict=d.strict)
        if e.max_utterances:
            dev_utts = balanced_subset(dev_utts, e.max_utterances)
        self.log(f"encoding {len(train_utts) + len(dev_utts)} utterances with the frozen encoder (cached)")
        common = {"strict": d.strict, "batch_size": d.encode_batch, "max_text_tokens": d.max_text_tokens}
        with ProgressBar(self.config.output.progress, "encode", len(train_utts) + len(dev_utts)) as bar:
            train = prepare_examples(train_utts, self.processor, progress=bar.callback, **common)
            dev = prepare_examples(dev_utts, self.processor, progress=bar.callback, **common)
        self.train_examples, self.dev_examples = train.examples, dev.examples
        self.skipped = {"train_rows": train_rows, "dev_rows": dev_rows}
        self.skipped.update({f"train_{k}": v for k, v in train.skipped.items()})
        self.skipped.update({f"dev_{k}": v for k, v in dev.skipped.items()})
        if d.augment is not None and self.train_examples:
            self.train_examples = self.augmented(self.train_examples)
        if any(self.skipped.values()):
            self.log("skipped: " + ", ".join(f"{k}={v}" for k, v in self.skipped.items() if v))
        if not self.train_examples:
            raise CondituneError("no usable training utterances (all skipped)")
        k = self.config.model.adaptor.subsample
        self.sequence_lengths = [math.ceil(x.frames / k) + len(x.tokens) + 2 for x in self.train_examples]
        t = self.config.training
        if t.align_steps or t.ctc_weight:
            self.model.set_ctc_vocabulary([tok for x in self.train_examples for tok in x.tokens])
        else:  # no CTC loss in this run: its head gets no gradient, so it is no optimizer (or DDP) parameter
            self.model.ctc_head.requires_grad_(False)

    def augmented(self, examples: list) -> list:
        """The training examples with ``data.augment``'s copies (encoded once, cached on the augmented audio)."""
        from conditune.data.examples import augment_examples

        d = self.config.data
        self.log(f"augmenting {len(examples)} training utterances ({d.augment.copies} copies each, cached)")
        with ProgressBar(self.config.output.progress, "augment", len(examples) * d.augment.copies) as bar:
            copies = augment_examples(examples, self.processor, d.augment, seed=self.config.training.seed,
                                      batch_size=d.encode_batch, progress=bar.callback)  # fmt: skip
        self.skipped.update(copies.skipped)
        return copies.examples

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        from conditune.data.batching import length_bucketed_batches

        return length_bucketed_batches(
            self.sequence_lengths, self.config.data.max_batch, self.config.training.seed, epoch
        )

    def setup_optimizer(self) -> None:
        t = self.config.training
        self.batches_per_epoch = len(self.epoch_batches(0))
        # Under DDP every rank takes its own batch of each group of `world` consecutive batches: the global order
        # is the single-process one, and N processes x grad_accum k see what 1 process x grad_accum N*k sees.
        main_steps = t.max_steps or max(1, math.ceil(t.epochs * self.batches_per_epoch / (t.grad_accum * self.world)))
        self.total_steps = t.align_steps + main_steps
        optimizer = build_optimizer(self.model, self.config)
        self.scheduler = build_scheduler(optimizer, self.config, self.total_steps)
        self.wrapped, self.optimizer = self.accelerator.prepare(self.model, optimizer)

    def resume(self, checkpoint: Path) -> None:
        """Model, optimizer, scheduler, RNG states and the data position of ``checkpoint``."""
        saved = ckpt.read_trainer_state(checkpoint)
        self.model.load_trained_state(checkpoint)
        self.optimizer.load_state_dict(ckpt.load_torch(checkpoint / "optimizer.pt"))
        self.scheduler.load_state_dict(ckpt.load_torch(checkpoint / "scheduler.pt"))
        self.state = TrainerState(
            step=int(saved["step"]),
            epoch=int(saved["epoch"]),
            batch_index=int(saved["batch_index"]),
            tokens_seen=int(saved.get("tokens_seen", 0)),
            prior_elapsed=float(saved.get("elapsed_s", 0.0)),
            data_sha=str(saved.get("data_sha", "")),
        )
        if self.is_main:
            self.metrics.truncate_after(self.state.step)
        ckpt.set_rng_state(ckpt.load_torch(checkpoint / "rng.pt"))
        self.log(f"resumed from {checkpoint} at step {self.state.step} (epoch {self.state.epoch}, "
                 f"batch {self.state.batch_index})")  # fmt: skip

    def init_from(self, checkpoint: Path) -> None:
        """Start the main phase from another run's alignment-stage checkpoint (``training.init_from``): its adaptor
        and CTC head, their optimizer state, the RNG states, the data position and the step; this run's own
        trainable LLM tensors (untouched by an alignment stage) stay as built."""
        saved = ckpt.read_trainer_state(checkpoint)
        check_shared_alignment(checkpoint, saved, self.config)
        self.model.load_trained_state(checkpoint)
        self.load_adaptor_optimizer(ckpt.load_torch(checkpoint / "optimizer.pt"), checkpoint)
        step = int(saved["step"])
        scheduler_at(self.scheduler, self.optimizer, step)
        self.state = TrainerState(
            step=step,
            epoch=int(saved["epoch"]),
            batch_index=int(saved["batch_index"]),
            tokens_seen=int(saved.get("tokens_seen", 0)),
            data_sha=str(saved.get("data_sha", "")),
        )
        ckpt.set_rng_state(ckpt.load_torch(checkpoint / "rng.pt"))
        self.init_source = str(checkpoint)
        self.log(f"main phase starts from the alignment stage in {checkpoint} (step {step})")

    def load_adaptor_optimizer(self, saved: dict[str, Any], checkpoint: Path) -> None:
        """The saved optimizer's groups (all adaptor groups, an LLM-frozen run) into this optimizer's adaptor
        groups, in order; the LLM groups keep their empty state."""
        current = self.optimizer.state_dict()
        mine = adaptor_groups(self.optimizer)
        theirs = saved["param_groups"]
        if [g.get("name") for g in theirs] != ["adaptor"] * len(theirs) or len(theirs) != len(mine):
            raise CondituneError(
                f"training.init_from: {checkpoint} is not an alignment-stage checkpoint of this recipe "
                "(its optimizer holds other parameter groups than this run's adaptor)"
            )
        state = {}
        for group_index, group in zip(mine, theirs):
            ours = current["param_groups"][group_index]["params"]
            params = self.optimizer.param_groups[group_index]["params"]
            if len(ours) != len(group["params"]):
                raise CondituneError(
                    f"training.init_from: {checkpoint}: the adaptor's parameters differ from this run's"
                )
            for k, (own, other) in enumerate(zip(ours, group["params"])):
                entry = saved["state"].get(other)
                if entry is None:
                    continue
                if "exp_avg" in entry and tuple(entry["exp_avg"].shape) != tuple(params[k].shape):
                    raise CondituneError(
                        f"training.init_from: {checkpoint}: the adaptor's shapes differ from this run's"
                    )
                state[own] = entry
        self.optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})

    def main_start_record(self) -> dict[str, Any]:
        """Hashes of the adaptor (with its CTC head) and of its optimizer state as the main phase starts."""
        opt = getattr(self.optimizer, "optimizer", self.optimizer)
        adaptor = {n: p for n, p in self.model.named_parameters() if n.startswith("adaptor.") and p.requires_grad}
        moments = {f"{n}/{k}": v for n, p in adaptor.items() for k, v in opt.state.get(p, {}).items()}
        return {
            "kind": "main_start",
            "step": self.state.step,
            "adaptor_sha": ckpt.tensors_sha(self.model.adaptor.state_dict()),
            "adaptor_optimizer_sha": ckpt.tensors_sha(moments),
            "data_sha": self.state.data_sha,
            "init_from": getattr(self, "init_source", None),
        }

    # ------------------------------------------------------------------ one step

    def next_batch(self) -> list[int]:
        """This rank's batch of the next ``world`` batches; the data hash chains over all of them."""
        s, group = self.state, []
        for _ in range(self.world):
            if s.batch_index >= len(self.batches):
                s.epoch, s.batch_index = s.epoch + 1, 0
                self.batches = self.epoch_batches(s.epoch)
            group.append(self.batches[s.batch_index])
            s.batch_index += 1
            s.data_sha = chain_data_sha(s.data_sha, [str(self.train_examples[i].audio) for i in group[-1]])
        return group[self.rank]

    def train_step(self) -> tuple[float, int]:
        """One optimizer step (``grad_accum`` micro-batches): its mean loss and the LLM positions it processed."""
        from conditune.speech.features import pad_frames

        t, acc = self.config.training, self.accelerator
        aligning = self.state.step < t.align_steps
        step_loss, step_tokens = torch.zeros((), device=acc.device), 0
        k = self.config.model.adaptor.subsample
        for micro in range(t.grad_accum):
            idx = self.next_batch()
            examples = [self.train_examples[i] for i in idx]
            frames, lengths = pad_frames(self.processor.cache.get([x.audio for x in examples]))
            sync = micro == t.grad_accum - 1 or self.world == 1  # gradients are all-reduced on the last one only
            with contextlib.nullcontext() if sync else acc.no_sync(self.wrapped):
                out = self.wrapped(
                    frames, lengths, [x.tokens for x in examples], ctc_weight=t.ctc_weight, run_llm=not aligning
                )
                acc.backward(out.loss / t.grad_accum)
            step_loss += out.loss.detach() / t.grad_accum
            step_tokens += int(sum(math.ceil(int(n) / k) for n in lengths)) + sum(len(x.tokens) + 2 for x in examples)
        clip = self.config.optimizer.clip_norm
        if clip:
            acc.clip_grad_norm_([p for p in self.wrapped.parameters() if p.requires_grad], clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        loss = float(acc.reduce(step_loss, "mean")) if self.world > 1 else float(step_loss)
        self.state.tokens_seen += step_tokens * self.world
        self.losses[self.state.step] = loss
        return loss, step_tokens * self.world

    # ------------------------------------------------------------------ evaluation and saving

    def evaluate(self) -> dict[str, Any] | None:
        """Dev WER (+ the hook's metrics) on the main process, written as an ``eval`` record; the others wait."""
        import json

        from conditune.evaluation.transcription import evaluate_examples

        wer = None
        if self.is_main and (self.dev_examples or self.eval_hook is not None):
            record: dict[str, Any] = {"kind": "eval", "step": self.state.step}
            e = self.config.evaluation
            if self.dev_examples:
                result = evaluate_examples(
                    self.model,
                    self.processor,
                    self.dev_examples,
                    batch_size=e.batch_size,
                    num_beams=e.num_beams,
                    max_new_tokens=e.max_new_tokens,
                    autocast=self.accelerator.autocast,
                )
                record.update({f"wer_{k}": v for k, v in result.summary().items()})
                lines = "".join(json.dumps(p) + "\n" for p in result.predictions)
                atomic_write_text(self.out / "eval_predictions.jsonl", lines)
                self.log(
                    f"step {self.state.step}: dev WER " + ", ".join(f"{k} {v:.2f}" for k, v in result.summary().items())
                )
                wer = result.wer
            if self.eval_hook is not None:
                with self.accelerator.autocast():
                    record.update(self.eval_hook(self.state.step, self.model, self.processor) or {})
            self.metrics.write(record)
        self.accelerator.wait_for_everyone()
        return wer

    def trainer_state(self) -> dict[str, Any]:
        s = self.state
        return {
            "step": s.step,
            "epoch": s.epoch,
            "batch_index": s.batch_index,
            "total_steps": self.total_steps,
            "align_steps": self.config.training.align_steps,
            "tokens_seen": s.tokens_seen,
            "elapsed_s": s.prior_elapsed + (time.monotonic() - self.wall_start),
            "batches_per_epoch": self.batches_per_epoch,
            "data_sha": s.data_sha,
            "world_size": self.world,
        }

    def save_checkpoint(self) -> None:
        if self.is_main:
            o = self.config.output
            ckpt.save_checkpoint(
                self.out, self.state.step, self.model, self.optimizer, self.scheduler, self.trainer_state(),
                self.config_yaml, o.keep_last,
            )  # fmt: skip
        self.accelerator.wait_for_everyone()

    def save_final(self) -> Path:
        final = self.out / FINAL_DIR
        if self.is_main:
            ckpt.replace_folder(final, self.model.save_pretrained)
        self.accelerator.wait_for_everyone()
        return final

    def out_of_time(self) -> bool:
        limit = self.config.training.max_seconds
        if limit is None:
            return False
        late = torch.tensor([float(time.monotonic() - self.wall_start >= limit)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(late, "max").item()) if self.world > 1 else bool(late.item())

    # ------------------------------------------------------------------ the loop

    def fit(self, *, stop_after_steps: int | None = None, stop_at: int | None = None) -> TrainResult:
        """Train to ``training.max_steps`` (or the time budget), then evaluate, checkpoint and save ``final/``.

        ``stop_after_steps``: end after this many steps of this invocation *without* saving anything (a
        simulated kill, for tests); the schedule still spans ``max_steps``. ``stop_at``: end once the run has
        reached this step, with a checkpoint there and no evaluation or ``final/`` (``stop_at=align_steps``: an
        alignment stage other runs start from through ``training.init_from``)."""
        result = self._new_result()
        self.batches = self.epoch_batches(self.state.epoch)
        self.wrapped.train()
        timer = _StepTimer()
        last_saved = self.state.step if self.resumed else -1
        self._end = self.total_steps if stop_at is None else min(self.total_steps, stop_at)
        with ProgressBar(self.config.output.progress and self.is_main, "train", self._end,
                         completed=self.state.step, fields={"loss": "-"}) as bar:  # fmt: skip
            while self.state.step < self._end:
                aligning = self.state.step < self.config.training.align_steps
                if self.state.step == self.config.training.align_steps and not result.main_start:
                    self._log_main_start(result)  # the state the main phase starts from
                with timer.step(aligning):
                    loss, tokens = self.train_step()
                self._after_step(loss, tokens, aligning, timer, bar)
                stop = self._stop_or_checkpoint(timer.run_steps, stop_after_steps, result)
                if stop:
                    break
                if self._saved_now:
                    last_saved = self.state.step
        timer.fill(result)
        result.step, result.data_sha = self.state.step, self.state.data_sha
        if result.stopped == "max_steps" and self._end < self.total_steps:
            result.stopped = "stop_at"
        if result.stopped in ("stop_after_steps", "stop_at"):  # a simulated kill writes nothing more
            if result.stopped == "stop_at" and last_saved != self.state.step:
                self.save_checkpoint()
            self.metrics.close()
            result.elapsed_s = time.monotonic() - self.wall_start
            return result
        result.eval = self.evaluate() or self._last_eval
        if last_saved != self.state.step:
            self.save_checkpoint()
        result.final_dir = self.save_final()
        result.elapsed_s = time.monotonic() - self.wall_start
        if self.is_main:
            atomic_write_json(self.out / "result.json", result.to_dict())
        self.metrics.close()
        self.log(
            f"stopped at step {self.state.step}/{self.total_steps} ({result.stopped}); model in {result.final_dir}"
        )
        return result

    def _log_main_start(self, result: TrainResult) -> None:
        record = self.main_start_record()
        result.main_start = {k: v for k, v in record.items() if k != "kind"}
        if self.is_main:
            self.metrics.write(record)

    def _new_result(self) -> TrainResult:
        self._last_eval, self._saved_now, self._window = None, False, [0.0, 0]
        return TrainResult(
            self.out,
            None,
            self.state.step,
            self.total_steps,
            "max_steps",
            losses=self.losses,
            train_utterances=len(self.train_examples),
            skipped=self.skipped,
            trainable_params=sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            trainable_llm_params=sum(p.numel() for p in self.model.llm.parameters() if p.requires_grad),
        )

    def _after_step(self, loss: float, tokens: int, aligning: bool, timer: _StepTimer, bar: ProgressBar) -> None:
        """Progress bar and the ``train`` record of the metrics log (a mean over the last ``log_every`` steps)."""
        s, o = self.state, self.config.output
        timer.tokens += tokens
        self._window[0] += loss
        self._window[1] += 1
        bar.update(completed=s.step, loss=f"{loss:.4f}" + (" (align)" if aligning else ""))
        boundary = s.step % max(1, o.log_every) == 0 or s.step in (self.total_steps, self.config.training.align_steps)
        if self.is_main and boundary:
            self.metrics.write({
                "kind": "train",
                "step": s.step,
                "epoch": s.epoch,
                "phase": "align" if aligning else "main",
                "loss": self._window[0] / self._window[1],
                **learning_rates(self.optimizer),
                "data_sha": s.data_sha,
                "tokens_per_s": timer.tokens / max(time.monotonic() - timer.start, 1e-9),
                "elapsed_s": round(s.prior_elapsed + time.monotonic() - self.wall_start, 3),
            })  # fmt: skip
        if boundary:
            self._window = [0.0, 0]

    def _stop_or_checkpoint(self, run_steps: int, stop_after_steps: int | None, result: TrainResult) -> bool:
        """Evaluate / checkpoint on schedule; True when the run ends here before ``total_steps``."""
        step, t, o = self.state.step, self.config.training, self.config.output
        self._saved_now = False
        if step >= self._end:
            return False
        if stop_after_steps is not None and run_steps >= stop_after_steps:
            result.stopped = "stop_after_steps"
            return True
        every = self.config.evaluation.every
        # evaluations count main steps: in the alignment stage the LLM has not changed and cannot read yet
        if every and step > t.align_steps and (step - t.align_steps) % every == 0:
            self._last_eval = self.evaluate()
            self.wrapped.train()
        if o.save_every and step % o.save_every == 0:
            self.save_checkpoint()
            self._saved_now = True
        if self.out_of_time():
            result.stopped = "max_seconds"
            return True
        return False


class _StepTimer:
    """Seconds per step of each phase (alignment / main), evaluations and checkpoints left out."""

    def __init__(self):
        self.start = time.monotonic()
        self.seconds = {True: 0.0, False: 0.0}
        self.steps = {True: 0, False: 0}
        self.run_steps = self.tokens = 0

    @contextlib.contextmanager
    def step(self, aligning: bool):
        began = time.monotonic()
        yield
        self.seconds[aligning] += time.monotonic() - began
        self.steps[aligning] += 1
        self.run_steps += 1

    def fill(self, result: TrainResult) -> None:
        result.seconds_per_step = self.seconds[False] / max(self.steps[False], 1)
        result.align_seconds_per_step = self.seconds[True] / max(self.steps[True], 1)
        result.tokens_per_second = self.tokens / max(time.monotonic() - self.start, 1e-9)


def train(
    config: TrainConfig | Mapping[str, Any] | str | Path,
    *,
    resume: bool | str | Path = False,
    stop_after_steps: int | None = None,
    stop_at: int | None = None,
    log: Callable[[str], None] | None = None,
    eval_hook: Callable[[int, Any, Any], dict[str, Any] | None] | None = None,
    llm=None,
) -> TrainResult:
    """Train (or resume training) a speech LLM as ``config`` says; see the module docstring.

    ``resume``: True for the latest checkpoint in ``output.dir``, or a checkpoint folder. ``stop_at``: end at that
    step with a checkpoint (see :meth:`Trainer.fit`).
    ``eval_hook(step, model, processor)``: extra metrics (a flat dict of numbers) at every evaluation, written into
    the same ``eval`` record of ``metrics.jsonl`` (``model``: the unwrapped :class:`~conditune.speech.modeling.SpeechLLM`).
    """
    from conditune.io import cleaned_up_on_failure

    trainer = Trainer(config, log=log, eval_hook=eval_hook, llm=llm)
    with cleaned_up_on_failure(trainer.out):
        trainer.setup(resume=resume)
        return trainer.fit(stop_after_steps=stop_after_steps, stop_at=stop_at)


# What may differ between a run and the alignment stage it starts from (training.init_from): nothing the alignment
# stage computes with. Everything else in the recipe must be equal.
SHARED_ALIGNMENT_FREE = ("model.trainable", "training.max_steps", "training.max_seconds", "training.init_from",
                         "training.device", "training.ctc_weight", "optimizer.llm_lr", "evaluation", "output")  # fmt: skip


def check_shared_alignment(checkpoint: Path, saved: Mapping[str, Any], config: TrainConfig) -> None:
    """One error line unless ``checkpoint`` ends the alignment stage of a run with this run's recipe."""
    from conditune.config import read_yaml

    if int(saved.get("step", -1)) != config.training.align_steps or not config.training.align_steps:
        raise CondituneError(
            f"training.init_from: {checkpoint} is at step {saved.get('step')}, not at the end of this run's "
            f"alignment stage (training.align_steps = {config.training.align_steps})"
        )
    if (Path(checkpoint) / "llm_delta").exists():
        raise CondituneError(f"training.init_from: {checkpoint} holds trained LLM tensors (share only a run of "
                             "model.trainable.mode none)")  # fmt: skip
    theirs = flat_keys(load_train_config(read_yaml(Path(checkpoint) / "train_config.yaml")).to_dict())
    ours = flat_keys(config.to_dict())
    for key in sorted(set(theirs) | set(ours)):
        if any(key == free or key.startswith(free + ".") for free in SHARED_ALIGNMENT_FREE):
            continue
        if theirs.get(key) != ours.get(key):
            raise CondituneError(
                f"training.init_from: {checkpoint} was trained with {key} = {theirs.get(key)!r}, this run has "
                f"{ours.get(key)!r}: its alignment stage is not this run's"
            )


def flat_keys(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and other values kept whole)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def make_accelerator(mixed_precision: str, cpu: bool, find_unused: bool = False):
    """An Accelerator; in a single process a later run may use other settings than an earlier one."""
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
