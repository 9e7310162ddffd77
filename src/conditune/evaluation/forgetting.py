"""Forgetting of the LLM alone: how far a fine-tuned LLM moved from its base on text.

Three measurements, all on text the speech training never saw (``heldout_text.<lang>.txt`` from
:mod:`conditune.data.synth`, or :data:`DEFAULT_INSTRUCTIONS`):

* :func:`text_metrics` — perplexity of base and adapted model on held-out sentences, and the mean
  per-token KL(base ‖ adapted) of their next-token distributions (nats). Each sentence is scored as
  ``[BOS] t_1 … t_m``: the BOS position predicts ``t_1`` and so on (the SpeechLLM's own convention),
  so every text token is predicted exactly once. Both models run in the same batch loop and only one
  batch of full-vocabulary log-probabilities is alive at a time.
* :func:`greedy_agreement` — greedy continuations of short instructions (through the tokenizer's chat
  template when it has one): fraction of token positions where the adapted model emits what the base
  model emits, and fraction of prompts with identical continuations.
* :class:`ForgettingProbe` — both, over held-out texts and instructions per language: the one loop the
  trainer's evaluation hook, the demo and the benchmarks run.

Perplexity is ``exp(total NLL / total predicted tokens)`` over the whole set (token-weighted, not a
mean of per-sentence perplexities).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conditune.errors import CondituneError

DEFAULT_INSTRUCTIONS: dict[str, list[str]] = {
    "en": [
        "What is the capital of France?",
        "How many days are there in a week?",
        "What is 7 plus 5?",
        "What is 12 times 3?",
        "Define the word 'photosynthesis' in one sentence.",
        "What colour is the sky on a clear day?",
        "Name three primary colours.",
        "What is the boiling point of water in degrees Celsius?",
        "Who wrote Romeo and Juliet?",
        "What is the largest planet in our solar system?",
        "Explain what a noun is.",
        "How many legs does a spider have?",
        "What is the opposite of 'hot'?",
        "Translate 'thank you' into German.",
        "What is 100 divided by 4?",
        "What does a thermometer measure?",
        "Give me a synonym for 'happy'.",
        "Which ocean is the largest?",
        "What is the square root of 81?",
        "Write one sentence about cats.",
    ],
    "de": [
        "Was ist die Hauptstadt von Deutschland?",
        "Wie viele Tage hat eine Woche?",
        "Was ist sieben plus fünf?",
        "Was ist zwölf mal drei?",
        "Erkläre das Wort 'Photosynthese' in einem Satz.",
        "Welche Farbe hat der Himmel an einem klaren Tag?",
        "Nenne drei Grundfarben.",
        "Bei wie viel Grad Celsius kocht Wasser?",
        "Wer schrieb Faust?",
        "Was ist der größte Planet in unserem Sonnensystem?",
        "Was ist ein Substantiv?",
        "Wie viele Beine hat eine Spinne?",
        "Was ist das Gegenteil von 'heiß'?",
        "Übersetze 'danke' ins Englische.",
        "Was ist hundert geteilt durch vier?",
        "Was misst ein Thermometer?",
        "Nenne ein anderes Wort für 'glücklich'.",
        "Welcher Ozean ist der größte?",
        "Was ist die Quadratwurzel aus 81?",
        "Schreibe einen Satz über Katzen.",
    ],
}


def read_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """Non-empty lines of a UTF-8 text file (one sentence per line), at most ``limit`` of them."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CondituneError(f"text file {path} not found") from None
    texts = [line.strip() for line in lines if line.strip()]
    return texts[:limit] if limit is not None else texts


# ---------------------------------------------------------------------------------------------- helpers


def _core(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _bos_id(tokenizer, model: nn.Module) -> int | None:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        bos = getattr(_core(model).config, "bos_token_id", None)
    if isinstance(bos, (list, tuple)):
        bos = bos[0] if bos else None
    return None if bos is None else int(bos)


def _pad_id(tokenizer, model: nn.Module) -> int:
    for cand in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
        getattr(_core(model).config, "eos_token_id", None),
    ):
        if isinstance(cand, (list, tuple)):
            cand = cand[0] if cand else None
        if cand is not None:
            return int(cand)
    return 0


def tokenize_texts(tokenizer, texts: Sequence[str], bos: int | None, max_tokens: int) -> list[list[int]]:
    """``[BOS] + tokens`` per text (no other special tokens), cut to ``max_tokens`` ids in all."""
    rows = []
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if bos is not None:
            ids = [bos] + ids
        rows.append(ids[:max_tokens])
    return rows


def _log_probs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    return torch.log_softmax(out.logits.float(), dim=-1)


# ---------------------------------------------------------------------------------------------- metrics


@torch.no_grad()
def text_metrics(
    base_llm: nn.Module,
    adapted_llm: nn.Module,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 8,
    max_tokens: int = 128,
) -> dict[str, Any]:
    """Perplexity of both models and mean per-token KL(base ‖ adapted) in nats on ``texts``.

    Returns ``{"perplexity_base", "perplexity_adapted", "kl_to_base", "tokens", "texts"}``; ``tokens``
    is the number of predicted tokens (all text tokens after the BOS).
    """
    was = (base_llm.training, adapted_llm.training)
    base_llm.eval()
    adapted_llm.eval()
    device_b, device_a = _device(base_llm), _device(adapted_llm)
    bos = _bos_id(tokenizer, base_llm)
    pad = _pad_id(tokenizer, base_llm)
    rows = [r for r in tokenize_texts(tokenizer, texts, bos, max_tokens) if len(r) >= 2]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths share a batch
    nll_base = nll_adapted = kl_sum = 0.0
    count = 0
    try:
        for start in range(0, len(order), batch_size):
            batch = [rows[i] for i in order[start : start + batch_size]]
            width = max(len(r) for r in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for b, r in enumerate(batch):  # right padding
                ids[b, : len(r)] = torch.tensor(r)
                mask[b, : len(r)] = 1
            lp_base = _log_probs(base_llm, ids.to(device_b), mask.to(device_b))[:, :-1]
            lp_adapt = _log_probs(adapted_llm, ids.to(device_a), mask.to(device_a))[:, :-1].to(lp_base.device)
            targets = ids[:, 1:].to(lp_base.device)
            valid = mask[:, 1:].bool().to(lp_base.device)  # position p predicts p+1 when p+1 is real
            tb = lp_base.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            ta = lp_adapt.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            nll_base -= float(tb[valid].double().sum())
            nll_adapted -= float(ta[valid].double().sum())
            sel_b, sel_a = lp_base[valid], lp_adapt[valid]  # [n, V]
            kl = (sel_b.exp() * (sel_b - sel_a)).sum(-1)
            kl_sum += float(kl.double().sum())
            count += int(valid.sum())
            del lp_base, lp_adapt, sel_b, sel_a
    finally:
        base_llm.train(was[0])
        adapted_llm.train(was[1])
    if count == 0:
        nan = float("nan")
        return {"perplexity_base": nan, "perplexity_adapted": nan, "kl_to_base": nan, "tokens": 0, "texts": len(rows)}
    return {
        "perplexity_base": math.exp(nll_base / count),
        "perplexity_adapted": math.exp(nll_adapted / count),
        "kl_to_base": max(0.0, kl_sum / count),
        "tokens": count,
        "texts": len(rows),
    }


def prompt_ids(tokenizer, prompt: str, bos: int | None) -> list[int]:
    """A user turn through the chat template (with the generation prompt) when there is one, else BOS + text."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return [int(i) for i in ids]
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return ([bos] if bos is not None else []) + ids


@torch.no_grad()
def _greedy(model: nn.Module, ids: list[int], max_new_tokens: int, stop: set[int]) -> list[int]:
    """Plain greedy decoding with a KV cache, one prompt at a time (no sampling, no generation config)."""
    device = _device(model)
    inp = torch.tensor([ids], dtype=torch.long, device=device)
    out = model(input_ids=inp, use_cache=True)
    past = out.past_key_values
    new: list[int] = []
    for _ in range(max_new_tokens):
        tok = int(out.logits[0, -1].argmax())
        if tok in stop:
            break
        new.append(tok)
        out = model(input_ids=torch.tensor([[tok]], device=device), past_key_values=past, use_cache=True)
        past = out.past_key_values
    return new


@torch.no_grad()
def greedy_agreement(
    base_llm: nn.Module, adapted_llm: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 24
) -> dict[str, Any]:
    """How often the adapted model's greedy continuation equals the base model's.

    ``agreement``: mean over prompts of the fraction of the base continuation's positions where the
    adapted model has the same token (a base continuation that is empty counts as agreeing when the
    adapted one is empty too); ``exact``: fraction of prompts with identical continuations. Decoding
    stops at EOS (and the chat template's end-of-turn token) or ``max_new_tokens``.
    """
    was = (base_llm.training, adapted_llm.training)
    base_llm.eval()
    adapted_llm.eval()
    bos = _bos_id(tokenizer, base_llm)
    stop = set()
    for cand in (getattr(tokenizer, "eos_token_id", None), getattr(_core(base_llm).config, "eos_token_id", None)):
        if isinstance(cand, (list, tuple)):
            stop.update(int(c) for c in cand)
        elif cand is not None:
            stop.add(int(cand))
    fractions, exact, samples = [], 0, []
    try:
        for prompt in prompts:
            ids = prompt_ids(tokenizer, prompt, bos)
            a = _greedy(base_llm, ids, max_new_tokens, stop)
            b = _greedy(adapted_llm, ids, max_new_tokens, stop)
            if a:
                fractions.append(sum(1 for i, t in enumerate(a) if i < len(b) and b[i] == t) / len(a))
            else:
                fractions.append(1.0 if not b else 0.0)
            exact += int(a == b)
            samples.append(
                {
                    "prompt": prompt,
                    "base": tokenizer.decode(a, skip_special_tokens=True),
                    "adapted": tokenizer.decode(b, skip_special_tokens=True),
                }
            )
    finally:
        base_llm.train(was[0])
        adapted_llm.train(was[1])
    n = len(fractions)
    return {
        "agreement": sum(fractions) / n if n else float("nan"),
        "exact": exact / n if n else float("nan"),
        "prompts": n,
        "samples": samples,
    }


# ---------------------------------------------------------------------------------------------- the probe


@dataclass
class ForgettingResult:
    text: dict[str, dict[str, Any]] = field(default_factory=dict)  # language -> text_metrics(...)
    agreement: dict[str, dict[str, Any]] = field(default_factory=dict)  # language -> greedy_agreement(...)
    seconds: float = 0.0

    def flat(self) -> dict[str, float]:
        """One level of numbers (``kl_en``, ``ppl_change_de``, ..., and their means ``kl``, ``ppl_change``,
        ``agreement``), as the metrics log and the experiment's results.csv hold them."""
        out: dict[str, float] = {}
        for lang, m in self.text.items():
            out.update(
                {
                    f"ppl_base_{lang}": m["perplexity_base"],
                    f"ppl_adapted_{lang}": m["perplexity_adapted"],
                    f"ppl_change_{lang}": m["perplexity_adapted"] / m["perplexity_base"] - 1.0,
                    f"kl_{lang}": m["kl_to_base"],
                }
            )
        for lang, a in self.agreement.items():
            out.update({f"agreement_{lang}": a["agreement"], f"exact_{lang}": a["exact"]})
        langs = list(self.text)
        if langs:
            out["ppl_change"] = sum(out[f"ppl_change_{lang}"] for lang in langs) / len(langs)
            out["kl"] = sum(out[f"kl_{lang}"] for lang in langs) / len(langs)
        if self.agreement:
            out["agreement"] = sum(a["agreement"] for a in self.agreement.values()) / len(self.agreement)
        out["forgetting_s"] = round(self.seconds, 3)
        return out


@dataclass
class ForgettingProbe:
    """Held-out texts and instructions per language, measured on a base/adapted LLM pair."""

    texts: dict[str, list[str]] = field(default_factory=dict)
    prompts: dict[str, list[str]] = field(default_factory=dict)
    batch_size: int = 8
    max_tokens: int = 128
    agreement_new_tokens: int = 24

    def measure(self, base_llm: nn.Module, adapted_llm: nn.Module, tokenizer) -> ForgettingResult:
        import time

        started = time.monotonic()
        result = ForgettingResult()
        for lang, rows in self.texts.items():
            result.text[lang] = text_metrics(
                base_llm, adapted_llm, tokenizer, rows, batch_size=self.batch_size, max_tokens=self.max_tokens
            )
        for lang, rows in self.prompts.items():
            result.agreement[lang] = greedy_agreement(
                base_llm, adapted_llm, tokenizer, rows, max_new_tokens=self.agreement_new_tokens
            )
        result.seconds = time.monotonic() - started
        return result
