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
* :func:`knowledge_metrics` — a multiple-choice knowledge probe (MMLU questions, :func:`read_knowledge_questions`):
  each choice is scored by its total log-likelihood as a continuation of ``"Question: <q>\nAnswer:"``
  (``" <choice>"``, its tokens after the question's), the highest wins, and accuracy of base and adapted model
  are compared on the same questions. The total is not normalised by length (lm-evaluation-harness's ``acc``;
  its ``acc_norm`` divides by the answer's characters): the probe measures how far the adapted model moved from
  its base on identical questions, for which the plain likelihood of each answer serves.
* :class:`ForgettingProbe` — all three, over held-out texts and instructions per language and the knowledge
  questions: the one loop the trainer's evaluation hook, the demo and the benchmarks run. Its result keeps the
  per-item numbers (per sentence: NLL of base and adapted, KL sum and tokens; per prompt: agreement; per question:
  base / adapted correct) for paired bootstrap intervals across runs (:mod:`conditune.evaluation.stats`).

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

    Returns ``{"perplexity_base", "perplexity_adapted", "kl_to_base", "tokens", "texts", "items"}``; ``tokens``
    is the number of predicted tokens (all text tokens after the BOS); ``items`` per scored sentence (those with
    at least one token, in input order): ``[NLL base, NLL adapted, KL sum, tokens]`` in nats.
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
    items: list[list[float]] = [[0.0, 0.0, 0.0, 0] for _ in rows]  # per sentence: NLL base, NLL adapted, KL, tokens
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
            sel_b, sel_a = lp_base[valid], lp_adapt[valid]  # [n, V], rows in (sentence, position) order
            kl = (sel_b.exp() * (sel_b - sel_a)).sum(-1)
            kl_sum += float(kl.double().sum())
            count += int(valid.sum())
            per_row = [int(n) for n in valid.sum(1)]
            pieces = zip(tb[valid].split(per_row), ta[valid].split(per_row), kl.split(per_row), per_row)
            for index, (nb, na, k, n) in zip(order[start : start + batch_size], pieces):
                items[index] = [-float(nb.double().sum()), -float(na.double().sum()), float(k.double().sum()), n]
            del lp_base, lp_adapt, sel_b, sel_a
    finally:
        base_llm.train(was[0])
        adapted_llm.train(was[1])
    if count == 0:
        nan = float("nan")
        return {"perplexity_base": nan, "perplexity_adapted": nan, "kl_to_base": nan, "tokens": 0, "texts": len(rows),
                "items": items}  # fmt: skip
    return {
        "perplexity_base": math.exp(nll_base / count),
        "perplexity_adapted": math.exp(nll_adapted / count),
        "kl_to_base": max(0.0, kl_sum / count),
        "tokens": count,
        "texts": len(rows),
        "items": items,
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
    base_llm: nn.Module,
    adapted_llm: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 24,
    *,
    base_ids: list[list[int]] | None = None,
) -> dict[str, Any]:
    """How often the adapted model's greedy continuation equals the base model's.

    ``agreement``: mean over prompts of the fraction of the base continuation's positions where the
    adapted model has the same token (a base continuation that is empty counts as agreeing when the
    adapted one is empty too); ``exact``: fraction of prompts with identical continuations. Decoding
    stops at EOS (and the chat template's end-of-turn token) or ``max_new_tokens``. ``base_ids``: the base's
    continuations (token ids) of an earlier call on the same prompts, reused (the base never changes); the
    result's ``base_ids`` are this call's.
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
    if base_ids is not None and len(base_ids) != len(prompts):
        raise ValueError(f"base_ids holds {len(base_ids)} continuations for {len(prompts)} prompts")
    fractions, exact, samples, continuations = [], 0, [], []
    try:
        for k, prompt in enumerate(prompts):
            ids = prompt_ids(tokenizer, prompt, bos)
            a = list(base_ids[k]) if base_ids is not None else _greedy(base_llm, ids, max_new_tokens, stop)
            continuations.append(a)
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
        "items": [[f, int(x["base"] == x["adapted"])] for f, x in zip(fractions, samples)],
        "base_ids": continuations,
    }


# ---------------------------------------------------------------------------------------------- knowledge

MMLU_LETTERS = "ABCD"


@dataclass(frozen=True)
class KnowledgeQuestion:
    """One multiple-choice question: ``choices[answer]`` is right."""

    question: str
    choices: tuple[str, ...]
    answer: int
    topic: str = ""


def read_knowledge_questions(path: str | Path) -> list[KnowledgeQuestion]:
    """Questions of an ``mmlu.jsonl``-format file (one JSON object a line: ``question``, ``answer_a`` … ``answer_d``,
    ``correct_answer`` one of A–D, ``topic``), in file order. Rows whose answer is not a letter A–D (the header
    rows some copies carry) are left out; a line that is not such an object is one error naming it."""
    import json

    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CondituneError(f"knowledge questions: {path} not found") from None
    questions = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            choices = tuple(str(row[f"answer_{c.lower()}"]) for c in MMLU_LETTERS)
            letter, question = str(row["correct_answer"]).strip().upper(), str(row["question"])
        except (ValueError, KeyError, TypeError):
            raise CondituneError(f"{path}: line {number} is not an MMLU question (question, answer_a..d, "
                                 "correct_answer)") from None  # fmt: skip
        if letter in MMLU_LETTERS and len(letter) == 1:
            questions.append(
                KnowledgeQuestion(question, choices, MMLU_LETTERS.index(letter), str(row.get("topic", "")))
            )
    return questions


def knowledge_prompt(question: KnowledgeQuestion) -> tuple[str, list[str]]:
    """The context and the continuations scored: ``"Question: <q>\nAnswer:"`` and ``" <choice>"`` each."""
    return f"Question: {question.question.strip()}\nAnswer:", [" " + c.strip() for c in question.choices]


def knowledge_ids(tokenizer, question: KnowledgeQuestion, bos: int | None) -> tuple[list[int], list[list[int]]]:
    """Token ids of the context (after BOS) and of each continuation, tokenised separately."""
    context, continuations = knowledge_prompt(question)
    ids = list(tokenizer(context, add_special_tokens=False)["input_ids"])
    return ([bos] if bos is not None else []) + ids, [
        list(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in continuations
    ]


def knowledge_subset(
    questions: Sequence[KnowledgeQuestion], tokenizer, *, count: int | None, seed: int, max_tokens: int
) -> list[KnowledgeQuestion]:
    """A fixed subset: the questions in a seeded shuffle, those whose context plus longest answer fit in
    ``max_tokens`` taken until ``count`` (None: all that fit), returned in the shuffled order."""
    import random

    order = list(range(len(questions)))
    random.Random(seed).shuffle(order)
    bos = getattr(tokenizer, "bos_token_id", None)
    chosen = []
    for i in order:
        context, continuations = knowledge_ids(tokenizer, questions[i], bos)
        if len(context) + max(len(c) for c in continuations) <= max_tokens and all(continuations):
            chosen.append(questions[i])
            if count is not None and len(chosen) == count:
                break
    return chosen


@torch.no_grad()
def choice_loglikelihoods(
    model: nn.Module, tokenizer, questions: Sequence[KnowledgeQuestion], batch_size: int = 8
) -> list[list[float]]:
    """Per question, the total log-likelihood (nats) of each choice's tokens after the context.

    The context is run once per question (``batch_size`` questions at a time, similar lengths together) and its
    key/value cache is shared by the question's choices, which run together in a second pass: a question costs
    its context plus its answers, not its context once per answer. Only the positions that predict a choice
    token are projected to the vocabulary."""
    core = _core(model)
    was = model.training
    model.eval()
    bos = _bos_id(tokenizer, model)
    encoded = [knowledge_ids(tokenizer, q, bos) for q in questions]
    order = sorted(range(len(questions)), key=lambda i: len(encoded[i][0]))
    scores: list[list[float]] = [[] for _ in questions]
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for i, row in zip(chunk, _score_chunk(core, [encoded[i] for i in chunk], _pad_id(tokenizer, model))):
                scores[i] = row
    finally:
        model.train(was)
    return scores


def _score_chunk(core: nn.Module, encoded: list[tuple[list[int], list[list[int]]]], pad: int) -> list[list[float]]:
    """Choice log-likelihoods of a few questions: contexts in one pass, then every choice on the shared cache."""
    device = _device(core)
    body = getattr(core, core.base_model_prefix)
    lengths = [len(context) for context, _ in encoded]
    ids, mask = _right_padded([context for context, _ in encoded], pad)
    out = body(input_ids=ids.to(device), attention_mask=mask.to(device),
               position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device), use_cache=True)  # fmt: skip
    last = out.last_hidden_state[torch.arange(len(encoded)), torch.tensor(lengths) - 1]  # predicts each answer's 1st
    owner = torch.tensor([q for q, (_, conts) in enumerate(encoded) for _ in conts])
    answers = [cont for _, conts in encoded for cont in conts]
    cache = out.past_key_values
    cache.reorder_cache(owner.to(device))  # one copy of its question's context per answer
    cont_ids, cont_mask = _right_padded(answers, pad)
    positions = torch.tensor(lengths)[owner].unsqueeze(1) + torch.arange(cont_ids.shape[1]).unsqueeze(0)
    out = body(input_ids=cont_ids.to(device), attention_mask=torch.cat([mask[owner], cont_mask], 1).to(device),
               position_ids=positions.to(device), past_key_values=cache, use_cache=True)  # fmt: skip
    # the hidden state that predicts answer token j: the context's last for j = 0, answer token j - 1 after it
    hidden = torch.cat([last[owner.to(device)].unsqueeze(1), out.last_hidden_state[:, :-1]], 1)
    where = cont_mask.bool().to(device)
    logits = core.get_output_embeddings()(hidden[where]).float()
    cap = getattr(core.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    picked = torch.log_softmax(logits, -1).gather(-1, cont_ids.to(device)[where].unsqueeze(-1)).squeeze(-1)
    totals = [float(part.double().sum()) for part in picked.split([len(a) for a in answers])]
    rows, k = [], 0
    for _, conts in encoded:
        rows.append(totals[k : k + len(conts)])
        k += len(conts)
    return rows


def _right_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[b, : len(r)] = 1
    return ids, mask


def knowledge_metrics(
    base_llm: nn.Module,
    adapted_llm: nn.Module,
    tokenizer,
    questions: Sequence[KnowledgeQuestion],
    *,
    batch_size: int = 8,
    base_scores: list[list[float]] | None = None,
) -> dict[str, Any]:
    """Accuracy of base and adapted model (highest total log-likelihood wins; a tie goes to the first choice) and
    ``change`` = adapted − base; ``items``: per question ``[base correct, adapted correct]``; ``base_scores`` (the
    base's log-likelihoods, reusable: the base never changes)."""
    if base_scores is None:
        base_scores = choice_loglikelihoods(base_llm, tokenizer, questions, batch_size)
    adapted_scores = choice_loglikelihoods(adapted_llm, tokenizer, questions, batch_size)

    def correct(scores, question):
        return int(max(range(len(scores)), key=lambda c: (scores[c], -c)) == question.answer)

    items = [[correct(b, q), correct(a, q)] for b, a, q in zip(base_scores, adapted_scores, questions)]
    n = len(items)
    base_acc = sum(b for b, _ in items) / n if n else float("nan")
    adapted_acc = sum(a for _, a in items) / n if n else float("nan")
    return {"accuracy_base": base_acc, "accuracy_adapted": adapted_acc, "change": adapted_acc - base_acc,
            "questions": n, "items": items, "base_scores": base_scores}  # fmt: skip


# ---------------------------------------------------------------------------------------------- the probe


@dataclass
class ForgettingResult:
    text: dict[str, dict[str, Any]] = field(default_factory=dict)  # language -> text_metrics(...)
    agreement: dict[str, dict[str, Any]] = field(default_factory=dict)  # language -> greedy_agreement(...)
    knowledge: dict[str, Any] | None = None  # knowledge_metrics(...), when the probe has questions
    seconds: float = 0.0
    knowledge_seconds: float = 0.0

    def items(self) -> dict[str, Any]:
        """The per-item numbers: ``text`` (language -> per sentence [NLL base, NLL adapted, KL sum, tokens]),
        ``agreement`` (language -> per prompt [agreement, exact]), ``knowledge`` (per question [base, adapted]
        correct)."""
        out: dict[str, Any] = {"text": {lang: m["items"] for lang, m in self.text.items()},
                               "agreement": {lang: a["items"] for lang, a in self.agreement.items()}}  # fmt: skip
        if self.knowledge is not None:
            out["knowledge"] = self.knowledge["items"]
        return out

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
        if self.knowledge is not None:
            k = self.knowledge
            out.update({"knowledge_base": k["accuracy_base"], "knowledge_adapted": k["accuracy_adapted"],
                        "knowledge_change": k["change"], "knowledge_s": round(self.knowledge_seconds, 3)})  # fmt: skip
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
    # knowledge questions (all of them; the subset is drawn once per tokenizer, see knowledge_subset)
    questions: list[KnowledgeQuestion] = field(default_factory=list)
    knowledge_count: int | None = 500
    knowledge_seed: int = 0
    knowledge_max_tokens: int = 320
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)  # the subset and the base's results

    def knowledge_questions(self, tokenizer) -> list[KnowledgeQuestion]:
        key = ("subset", getattr(tokenizer, "name_or_path", ""), len(tokenizer))
        if key not in self._cache:
            self._cache[key] = knowledge_subset(self.questions, tokenizer, count=self.knowledge_count,
                                                seed=self.knowledge_seed, max_tokens=self.knowledge_max_tokens)  # fmt: skip
        return self._cache[key]

    # The base LLM is loaded once per process and never changes: what it gives on the probe's fixed inputs
    # (knowledge scores, greedy continuations) is computed once. The model and tokenizer are kept with each
    # result, so a later base is never mistaken for the one it came from.
    def _base_result(self, key, base_llm: nn.Module, tokenizer) -> Any:
        kept = self._cache.get(("base", key))
        return kept[2] if kept and kept[0] is base_llm and kept[1] is tokenizer else None

    def _keep_base_result(self, key, base_llm: nn.Module, tokenizer, value: Any) -> None:
        self._cache[("base", key)] = (base_llm, tokenizer, value)

    def measure(
        self, base_llm: nn.Module, adapted_llm: nn.Module, tokenizer, *, knowledge: bool = True
    ) -> ForgettingResult:
        """Every probe on the pair; ``knowledge=False`` leaves the knowledge questions out this time."""
        import time

        started = time.monotonic()
        result = ForgettingResult()
        for lang, rows in self.texts.items():
            result.text[lang] = text_metrics(
                base_llm, adapted_llm, tokenizer, rows, batch_size=self.batch_size, max_tokens=self.max_tokens
            )
        for lang, rows in self.prompts.items():
            result.agreement[lang] = greedy_agreement(
                base_llm, adapted_llm, tokenizer, rows, max_new_tokens=self.agreement_new_tokens,
                base_ids=self._base_result(("greedy", lang), base_llm, tokenizer),
            )  # fmt: skip
            self._keep_base_result(("greedy", lang), base_llm, tokenizer, result.agreement[lang].pop("base_ids"))
        if self.questions and knowledge:
            began = time.monotonic()
            questions = self.knowledge_questions(tokenizer)
            result.knowledge = knowledge_metrics(base_llm, adapted_llm, tokenizer, questions, batch_size=self.batch_size,
                                                 base_scores=self._base_result("knowledge", base_llm, tokenizer))  # fmt: skip
            self._keep_base_result("knowledge", base_llm, tokenizer, result.knowledge["base_scores"])
            result.knowledge_seconds = time.monotonic() - began
        result.seconds = time.monotonic() - started
        return result
