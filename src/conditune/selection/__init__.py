"""Selecting the tensors to fine-tune, applying the selection to a model, and delta checkpoints.

>>> from conditune.scanning.records import read_records
>>> from conditune.selection import select, write_selection, read_names, apply_selection
>>> records, meta = read_records("scan.csv")
>>> write_selection(select(records, "lowest", count=100, meta=meta), "names.txt")
>>> report = apply_selection(model, read_names("names.txt"))
>>> optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-5)

The Trainer helpers (:class:`SelectionCallback`, :class:`DeltaTrainer`) import transformers, so they
are loaded on first use.
"""

from conditune.selection.apply import SelectionReport, apply_selection, trainable_parameters
from conditune.selection.delta import load_delta, merge_delta, model_fingerprint, read_delta_meta, save_delta
from conditune.selection.formats import (
    FORMATS,
    axolotl_patterns,
    format_for,
    peft_targets,
    read_names,
    render,
    write_selection,
)
from conditune.selection.policies import (
    DEFAULT_COUNT,
    POLICIES,
    SCORES,
    Candidate,
    Selection,
    format_params,
    parameter_name,
    parse_params,
    score_of,
    select,
    spectrum_snr,
)

_LAZY = {"SelectionCallback", "DeltaTrainer"}

__all__ = [
    "DEFAULT_COUNT",
    "FORMATS",
    "POLICIES",
    "SCORES",
    "Candidate",
    "DeltaTrainer",
    "Selection",
    "SelectionCallback",
    "SelectionReport",
    "apply_selection",
    "axolotl_patterns",
    "format_for",
    "format_params",
    "load_delta",
    "merge_delta",
    "model_fingerprint",
    "parameter_name",
    "parse_params",
    "peft_targets",
    "read_delta_meta",
    "read_names",
    "render",
    "save_delta",
    "score_of",
    "select",
    "spectrum_snr",
    "trainable_parameters",
    "write_selection",
]


def __getattr__(name: str):
    if name in _LAZY:
        from conditune.selection import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
