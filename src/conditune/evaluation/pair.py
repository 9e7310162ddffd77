"""The one base/adapted pair loader: a trained speech model and the untouched base LLM it was adapted from.

The base LLM is loaded once per process (:func:`load_base_llm`, cached on its config) and never changed;
the adapted model starts from a copy of it, so a GGUF file is de-quantised once, not twice. The
trainer's forgetting hook, the demo, the experiment and the benchmarks all take their pair from here.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conditune.speech.configuration import LLMConfig

_BASE: dict[str, Any] = {"key": None, "model": None}


def load_base_llm(config: LLMConfig, device: str | torch.device | None = None) -> nn.Module:
    """The base LLM ``config`` names, frozen and in eval mode; one copy per process (the last one asked for)."""
    from conditune.speech.loading import load_llm

    key = json.dumps(asdict(config), sort_keys=True)
    if _BASE["key"] != key:
        _BASE["model"] = None  # free the previous one first
        model = load_llm(config)
        model.requires_grad_(False)
        model.eval()
        _BASE.update(key=key, model=model)
    model = _BASE["model"]
    if device is not None and next(model.parameters()).device != torch.device(device):
        model.to(device)
    return model


@dataclass
class TrainedPair:
    base: nn.Module  # the untouched base LLM
    model: Any  # the trained SpeechLLM (its .core_llm is the adapted LLM)
    processor: Any  # SpeechProcessor (encoder only when asked for)

    @property
    def adapted(self) -> nn.Module:
        return self.model.core_llm


def load_trained_pair(
    model_dir: str | Path,
    *,
    load_encoder: bool = False,
    device: str | torch.device | None = None,
    overrides: dict[str, Any] | None = None,
    cache_dir: str | Path | None = None,
) -> TrainedPair:
    """A saved speech model (``final/`` or a checkpoint), its base LLM and its processor."""
    from conditune.speech.configuration import SpeechLLMConfig
    from conditune.speech.modeling import SpeechLLM
    from conditune.speech.processing import SpeechProcessor

    config = SpeechLLMConfig.from_pretrained(model_dir, overrides)
    processor = SpeechProcessor.from_config(config, load_encoder=load_encoder, cache_dir=cache_dir)
    base = load_base_llm(config.llm, device)
    model = SpeechLLM.from_pretrained(model_dir, overrides=overrides, llm=copy.deepcopy(base), device=device)
    model.eval()
    model.requires_grad_(False)
    return TrainedPair(base, model, processor)
