"""The knowledge probe: MMLU-format questions read, a fixed subset drawn, every answer scored by its total
log-likelihood after the question; checked against log-likelihoods computed by hand on a tiny bigram model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from conditune.errors import CondituneError
from conditune.evaluation.forgetting import (
    ForgettingProbe,
    KnowledgeQuestion,
    choice_loglikelihoods,
    knowledge_ids,
    knowledge_metrics,
    knowledge_subset,
    read_knowledge_questions,
)
from fixtures import make_tiny_llm

torch.set_num_threads(1)
TEXTS = ["open the door", "good morning", "turn left now", "yes please", "the window is open", "no thanks"]
QUESTIONS = [
    KnowledgeQuestion("open the", ("door", "window", "morning", "now"), 0),
    KnowledgeQuestion("good", ("morning", "thanks", "door please", "left"), 0),
    KnowledgeQuestion("turn left", ("now", "yes", "the open window", "please"), 0),
    KnowledgeQuestion("yes", ("please", "no thanks", "door", "good morning now"), 0),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_llm(tmp_path_factory.mktemp("llm"), texts=TEXTS)
    return path, AutoTokenizer.from_pretrained(path)


def bigram_model(path, seed: int) -> LlamaForCausalLM:
    """The tiny Llama with every attention and MLP output zeroed: each position's hidden state is its own token's
    embedding, so the model is a bigram model whose log-probabilities follow from two matrices."""
    model = LlamaForCausalLM.from_pretrained(path)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.randn(model.model.embed_tokens.weight.shape, generator=gen))
        model.lm_head.weight.copy_(3 * torch.randn(model.lm_head.weight.shape, generator=gen))
    return model.eval()


def by_hand(model: LlamaForCausalLM, tokenizer, question: KnowledgeQuestion) -> list[float]:
    """log p(answer tokens | question) in float64: p(t | previous token a) = softmax(W · rmsnorm(e_a))[t]."""
    emb = model.model.embed_tokens.weight.detach().double().numpy()
    head = model.lm_head.weight.detach().double().numpy()
    gain = model.model.norm.weight.detach().double().numpy()
    eps = model.config.rms_norm_eps
    context, answers = knowledge_ids(tokenizer, question, tokenizer.bos_token_id)
    scores = []
    for answer in answers:
        total, previous = 0.0, context[-1]
        for token in answer:
            h = emb[previous] / np.sqrt(np.mean(emb[previous] ** 2) + eps) * gain
            logits = head @ h
            total += logits[token] - (logits.max() + math.log(np.exp(logits - logits.max()).sum()))
            previous = token
        scores.append(total)
    return scores


def test_scores_equal_the_hand_computed_log_likelihoods(tiny):
    path, tok = tiny
    model = bigram_model(path, seed=0)
    expected = [by_hand(model, tok, q) for q in QUESTIONS]
    for batch in (1, 3):  # one question at a time, and questions of different lengths sharing a batch
        got = choice_loglikelihoods(model, tok, QUESTIONS, batch_size=batch)
        assert np.allclose(got, expected, rtol=1e-6, atol=1e-6), (got, expected)  # float32 vs float64 by hand
    # accuracies and their change, from the hand-computed scores of two different models
    adapted = bigram_model(path, seed=1)
    hand_b = [int(np.argmax(s)) for s in expected]
    hand_a = [int(np.argmax(by_hand(adapted, tok, q))) for q in QUESTIONS]
    questions = [KnowledgeQuestion(q.question, q.choices, hand_b[i] if i < 3 else (hand_b[i] + 1) % 4)
                 for i, q in enumerate(QUESTIONS)]  # fmt: skip  # base right on 3 of 4
    m = knowledge_metrics(model, adapted, tok, questions, batch_size=2)
    base_right = [int(hand_b[i] == q.answer) for i, q in enumerate(questions)]
    adapted_right = [int(hand_a[i] == q.answer) for i, q in enumerate(questions)]
    assert m["items"] == [[b, a] for b, a in zip(base_right, adapted_right)]
    assert m["accuracy_base"] == 0.75 and m["accuracy_adapted"] == sum(adapted_right) / 4
    assert m["change"] == sum(adapted_right) / 4 - 0.75


def test_shared_context_cache_equals_a_full_forward_per_answer(tiny):
    path, tok = tiny
    model = LlamaForCausalLM.from_pretrained(path).eval()  # random: attention matters here
    got = choice_loglikelihoods(model, tok, QUESTIONS, batch_size=3)
    for q, row in zip(QUESTIONS, got):
        context, answers = knowledge_ids(tok, q, tok.bos_token_id)
        for answer, value in zip(answers, row):
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=torch.tensor([context + answer])).logits[0].double(), -1)
            want = sum(float(lp[len(context) - 1 + j, t]) for j, t in enumerate(answer))
            assert value == pytest.approx(want, abs=2e-5)


def test_read_questions_drops_header_rows_and_names_bad_lines(tmp_path):
    rows = [
        {"question": "2 + 2?", "answer_a": "3", "answer_b": "4", "answer_c": "5", "answer_d": "6",
         "correct_answer": "B", "topic": "arithmetic"},
        {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c",
         "answer_d": "answer_d", "correct_answer": "answer", "topic": "elementary mathematics"},
        {"question": "Capital of France?", "answer_a": "Paris", "answer_b": "Rome", "answer_c": "Bonn",
         "answer_d": "Oslo", "correct_answer": "a", "topic": "geography"},
    ]  # fmt: skip
    path = tmp_path / "mmlu.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    questions = read_knowledge_questions(path)
    assert [(q.question, q.answer, q.topic) for q in questions] == [("2 + 2?", 1, "arithmetic"),
                                                                    ("Capital of France?", 0, "geography")]  # fmt: skip
    assert questions[1].choices == ("Paris", "Rome", "Bonn", "Oslo")
    path.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(CondituneError, match="line 2"):
        read_knowledge_questions(path)


def test_subset_is_fixed_and_leaves_out_long_questions(tiny):
    _, tok = tiny
    many = [KnowledgeQuestion(f"open the door {'now ' * (i % 7)}", ("yes", "no", "left", "door"), 0) for i in range(40)]

    def length(q):
        context, answers = knowledge_ids(tok, q, tok.bos_token_id)
        return len(context) + max(map(len, answers))

    limit = sorted(map(length, many))[20]  # about half the questions fit
    a = knowledge_subset(many, tok, count=10, seed=3, max_tokens=limit)
    assert a == knowledge_subset(many, tok, count=10, seed=3, max_tokens=limit) and len(a) == 10
    assert a != knowledge_subset(many, tok, count=10, seed=4, max_tokens=limit)
    assert all(length(q) <= limit for q in a) and any(length(q) > limit for q in many)
    assert len(knowledge_subset(many, tok, count=None, seed=3, max_tokens=10**6)) == 40


def test_probe_scores_the_base_once(tiny):
    path, tok = tiny
    base, adapted = bigram_model(path, 0), bigram_model(path, 1)
    calls = []
    base.model.register_forward_hook(lambda *a: calls.append(1))  # the body: answers skip the full model
    probe = ForgettingProbe(questions=QUESTIONS, knowledge_count=3, knowledge_seed=0, knowledge_max_tokens=64)
    first = probe.measure(base, adapted, tok)
    n = len(calls)
    second = probe.measure(base, adapted, tok)
    assert len(calls) == n and n > 0  # the base's answers were scored once
    assert first.knowledge["items"] == second.knowledge["items"] and len(first.knowledge["items"]) == 3
    flat = second.flat()
    assert flat["knowledge_change"] == flat["knowledge_adapted"] - flat["knowledge_base"]
    assert "knowledge" not in probe.measure(base, adapted, tok, knowledge=False).items()
