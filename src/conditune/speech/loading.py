"""Loading the parts a speech LLM references by path: the base LLM, its tokenizer, the trainable selection.

``demo:<name>`` paths are the offline demo models (:func:`conditune.models.fetch`, installed on first
use); a ``.gguf`` path is de-quantised by transformers (``gguf_file=``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from conditune.errors import CondituneError
from conditune.speech.configuration import LLMConfig, SpeechLLMConfig


def resolve_path(path: str) -> str:
    """``demo:<name>`` -> the installed demo model's path; anything else unchanged."""
    if isinstance(path, str) and path.startswith("demo:"):
        from conditune import models

        return str(models.fetch(path[len("demo:") :], log=lambda msg: None))
    return path


def split_gguf(path: str, gguf_file: str | None) -> tuple[str, str | None]:
    """(folder or hub id, GGUF file name or None) for transformers' ``from_pretrained(..., gguf_file=)``."""
    path = resolve_path(path)
    p = Path(path)
    if gguf_file is None and p.suffix == ".gguf":
        return str(p.parent), p.name
    if gguf_file is not None and Path(gguf_file).is_absolute():
        return str(Path(gguf_file).parent), Path(gguf_file).name
    return path, gguf_file


def llm_source(cfg: LLMConfig) -> str:
    """One path naming the LLM's weights (the GGUF file itself when there is one): what a scan reads."""
    path, gguf = split_gguf(cfg.path, cfg.gguf_file)
    return str(Path(path) / gguf) if gguf else path


def load_llm(cfg: LLMConfig) -> nn.Module:
    from transformers import AutoModelForCausalLM

    path, gguf = split_gguf(cfg.path, cfg.gguf_file)
    if not Path(path).exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise CondituneError(f"LLM path {cfg.path} does not exist")
    try:
        dtype = getattr(torch, cfg.dtype)
    except AttributeError:
        raise CondituneError(f"unknown dtype {cfg.dtype!r} for model.llm.dtype") from None
    kwargs = {"dtype": dtype}
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        where = f"{cfg.path}{' / ' + gguf if gguf else ''}"
        raise CondituneError(f"cannot load LLM from {where}: {str(exc).splitlines()[0]}") from None


def load_tokenizer(cfg: LLMConfig):
    from transformers import AutoTokenizer

    path, gguf = split_gguf(cfg.tokenizer, None) if cfg.tokenizer else split_gguf(cfg.path, cfg.gguf_file)
    try:
        return AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError) as exc:
        raise CondituneError(f"cannot load tokenizer from {path}: {str(exc).splitlines()[0]}") from None


def base_reference(cfg: LLMConfig) -> str:
    """What a saved LLM delta records as its base (``demo:<name>`` stays symbolic, paths are made absolute)."""
    if cfg.path.startswith("demo:"):
        return cfg.path
    path, gguf = split_gguf(cfg.path, cfg.gguf_file)
    if Path(path).exists():
        path = str(Path(path).resolve())
    return f"{path}/{gguf}" if gguf else path


def core_model(llm: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside a possible PEFT wrapper (LoRA layers are injected in place)."""
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


def apply_trainable(llm: nn.Module, config: SpeechLLMConfig, *, for_training: bool = True) -> nn.Module:
    """Freeze the LLM, then unfreeze what ``config.trainable`` selects. Returns the (maybe PEFT-wrapped) LLM.

    Modes: ``none``, ``all``, ``names`` (the listed tensors), ``lora`` (PEFT LoRA, any ``lora.init``: PiSSA
    rewrites each target's base weight into its residual), ``osf`` (PEFT orthogonal subspace fine-tuning)."""
    llm.requires_grad_(False)
    mode = config.trainable.mode
    if mode == "none":
        return llm
    if mode == "all":
        llm.requires_grad_(True)
        return llm
    if mode == "lora":
        return _wrap_lora(llm, config)
    if mode == "osf":
        return _wrap_osf(llm, config)
    if mode == "names":
        if not for_training:
            return llm  # inference: the delta carries the trained values; nothing needs gradients
        from conditune.selection import apply_selection, read_names

        names = list(config.trainable.names or [])
        if config.trainable.names_file:
            names += read_names(config.trainable.names_file)
        apply_selection(llm, names, prefix="", strict=True)
        return llm
    raise CondituneError(f"unknown trainable mode {mode!r}")


# Initialisations that read the base weights through a randomized SVD (PiSSA's fast variant) draw their random
# numbers from this fixed seed inside a forked RNG: a saved model (whose delta holds only the adapter matrices)
# rebuilds the same residual base weights when it is loaded, and the run's own RNG stream is untouched.
INIT_SEED = 1234


def _wrap_lora(llm: nn.Module, config: SpeechLLMConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    from conditune.speech.configuration import lora_init_option

    lc = config.trainable.lora
    init = lora_init_option(lc.init)
    peft_cfg = LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=list(lc.target_modules),
        task_type="CAUSAL_LM",
        bias="none",
        rank_pattern=dict(lc.rank_pattern or {}),
        alpha_pattern=dict(lc.alpha_pattern or {}),
        **({} if init is True else {"init_lora_weights": init}),
    )
    try:
        # LoRA's own initialisation must not shift the global RNG: the adaptor built next (and the dropout
        # masks of training) then start from the same state whatever the trainable mode, which
        # `conditune experiment` relies on to compare modes on an identical footing.
        with torch.random.fork_rng(devices=[]):
            if init is not True:
                torch.manual_seed(INIT_SEED)
            return get_peft_model(llm, peft_cfg)
    except ValueError as exc:
        raise CondituneError(f"LoRA: {str(exc).splitlines()[0]}") from None


def _wrap_osf(llm: nn.Module, config: SpeechLLMConfig) -> nn.Module:
    """PEFT OSF on ``trainable.osf.target_modules``: a deterministic SVD per matrix, in a forked RNG like LoRA."""
    from peft import OSFConfig, get_peft_model

    oc = config.trainable.osf
    peft_cfg = OSFConfig(
        effective_rank=oc.effective_rank,
        target_modules=list(oc.target_modules),
        rank_pattern=dict(oc.rank_pattern or {}) or None,
        task_type="CAUSAL_LM",
    )
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED)
            return get_peft_model(llm, peft_cfg)
    except ValueError as exc:
        raise CondituneError(f"OSF: {str(exc).splitlines()[0]}") from None
