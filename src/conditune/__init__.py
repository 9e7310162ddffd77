"""conditune: condition-number guided fine-tuning of pretrained LLMs for new modalities.

The public API, imported lazily (``import conditune`` stays cheap for the CLI)::

    records, meta = conditune.scan_source("model-folder")            # scan
    names = conditune.select(records, policy="lowest", count=100)     # choose
    report = conditune.apply_selection(model, names)                  # freeze the rest
    optimizer = torch.optim.AdamW(conditune.trainable_parameters(model))
    conditune.save_delta(model, "delta/")                             # only what trained
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "scan_source": "conditune.scanning",
    "analyse_matrix": "conditune.scanning",
    "read_records": "conditune.scanning",
    "write_records": "conditune.scanning",
    "select": "conditune.selection",
    "apply_selection": "conditune.selection",
    "trainable_parameters": "conditune.selection",
    "read_names": "conditune.selection",
    "save_delta": "conditune.selection",
    "load_delta": "conditune.selection",
    "merge_delta": "conditune.selection",
    "SpeechLLM": "conditune.speech",
    "SpeechLLMConfig": "conditune.speech",
    "CondituneError": "conditune.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name == "ConditumeError":  # the first, misspelt name: deprecated
        from conditune import errors

        return errors.ConditumeError
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'conditune' has no attribute {name!r}")
