"""transformers ``Trainer`` integration: train only the selection, checkpoint only what was trained.

* :class:`SelectionCallback` freezes the model down to the selection when the Trainer is built (so its
  optimizer only holds the selected tensors) and again at train begin (the model may have been
  replaced by ``model_init``), and writes a delta of the trained tensors into each
  ``checkpoint-N/conditune_delta`` beside whatever the Trainer saves there.
* :class:`DeltaTrainer` goes further: every checkpoint and ``save_model()`` hold only the delta plus
  the config (and tokenizer), and ``resume_from_checkpoint`` loads such a delta into the base model.
  It reads parameters directly, so it suits single-process and DDP training, not FSDP/DeepSpeed
  sharding.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from conditune.selection.apply import SelectionReport, apply_selection
from conditune.selection.delta import META_FILE, load_delta, model_fingerprint, save_delta

logger = logging.getLogger(__name__)

DELTA_SUBDIR = "conditune_delta"


class SelectionCallback(TrainerCallback):
    """Apply a selection (names from ``conditune select``) to the Trainer's model; save deltas."""

    def __init__(
        self,
        names: Iterable[str],
        prefix: str = "",
        strict: bool = True,
        save_delta: bool = True,
        base_reference: str | None = None,
    ):
        self.names = list(names)
        self.prefix = prefix
        self.strict = strict
        self.save_delta = save_delta
        self.base_reference = base_reference
        self.report: SelectionReport | None = None
        self.base_fingerprint: str | None = None

    def apply(self, model: torch.nn.Module) -> SelectionReport:
        self.report = apply_selection(model, self.names, prefix=self.prefix, strict=self.strict)
        if self.base_fingerprint is None:  # taken before any step: the untouched base
            self.base_fingerprint = model_fingerprint(model, exclude=self.report.trainable)
        return self.report

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.apply(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            logger.info("conditune selection\n%s", self.apply(model))

    def on_save(self, args, state, control, model=None, **kwargs):
        if not self.save_delta or model is None or not args.should_save or self.report is None:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        save_delta(
            model,
            checkpoint / DELTA_SUBDIR,
            names=self.report.trainable,
            base_reference=self.base_reference,
            base_fingerprint=self.base_fingerprint,
        )


class DeltaTrainer(Trainer):
    """A ``Trainer`` that trains ``selection`` only and saves deltas instead of full models.

    >>> trainer = DeltaTrainer(model=model, args=args, train_dataset=ds, selection=read_names("names.txt"))
    """

    def __init__(
        self,
        *args,
        selection: Iterable[str] | None = None,
        selection_prefix: str = "",
        base_reference: str | None = None,
        **kwargs,
    ):
        self.selection_callback = None
        if selection is not None:
            self.selection_callback = SelectionCallback(
                selection, prefix=selection_prefix, save_delta=False, base_reference=base_reference
            )
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), self.selection_callback]
        self.base_reference = base_reference
        super().__init__(*args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model)
        fingerprint = self.selection_callback.base_fingerprint if self.selection_callback else None
        save_delta(model, output_dir, base_reference=self.base_reference, base_fingerprint=fingerprint)
        if hasattr(model, "config"):
            model.config.save_pretrained(output_dir)  # so the directory says which architecture it patches
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        if (Path(resume_from_checkpoint) / META_FILE).is_file():
            load_delta(model if model is not None else self.model, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best and (Path(best) / META_FILE).is_file():
            load_delta(self.model, best)
            return
        super()._load_best_model()
