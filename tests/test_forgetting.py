"""Forgetting metrics on a tiny random Llama with a real (tiny BPE) tokenizer."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from conditune.errors import CondituneError
from conditune.evaluation.forgetting import (
    DEFAULT_INSTRUCTIONS,
    ForgettingProbe,
    greedy_agreement,
    read_texts,
    text_metrics,
    tokenize_texts,
)
from fixtures import make_tiny_llm

TEXTS = ["open the door", "good morning", "turn left now", "yes please", "open the window please", "good"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_llm(tmp_path_factory.mktemp("llm"), texts=TEXTS)
    tok = AutoTokenizer.from_pretrained(path)
    return path, tok


def _load(path):
    model = LlamaForCausalLM.from_pretrained(path)
    model.eval()
    return model


def test_read_texts(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("one\n\n  two  \nthree\n", encoding="utf-8")
    assert read_texts(f) == ["one", "two", "three"]
    assert read_texts(f, limit=2) == ["one", "two"]
    with pytest.raises(CondituneError):
        read_texts(tmp_path / "missing.txt")


def test_identical_models(tiny):
    path, tok = tiny
    base, adapted = _load(path), _load(path)
    m = text_metrics(base, adapted, tok, TEXTS, batch_size=4)
    assert m["kl_to_base"] == pytest.approx(0.0, abs=1e-7)
    assert m["perplexity_base"] == pytest.approx(m["perplexity_adapted"], rel=1e-6)
    expected_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in TEXTS)
    assert m["tokens"] == expected_tokens
    g = greedy_agreement(base, adapted, tok, ["open the", "good"], max_new_tokens=5)
    assert g["agreement"] == 1.0 and g["exact"] == 1.0


def test_perturbed_tensor_changes_metrics(tiny):
    path, tok = tiny
    base, adapted = _load(path), _load(path)
    with torch.no_grad():
        w = adapted.model.layers[0].mlp.down_proj.weight
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    m = text_metrics(base, adapted, tok, TEXTS, batch_size=3)
    assert m["kl_to_base"] > 1e-4
    assert m["perplexity_adapted"] != pytest.approx(m["perplexity_base"], rel=1e-6)
    same = text_metrics(base, base, tok, TEXTS)
    assert same["perplexity_base"] == pytest.approx(m["perplexity_base"], rel=1e-6)


def test_perplexity_by_hand_and_padding_invariance(tiny):
    path, tok = tiny
    base, adapted = _load(path), _load(path)
    with torch.no_grad():
        adapted.lm_head.weight.mul_(1.7)
    rows = tokenize_texts(tok, TEXTS, tok.bos_token_id, 128)
    nll_b = nll_a = kl = 0.0
    n = 0
    for r in rows:  # one text at a time: no padding at all
        torch.set_grad_enabled(False)
        ids = torch.tensor([r])
        lb = torch.log_softmax(base(ids).logits.float()[0, :-1], -1)
        la = torch.log_softmax(adapted(ids).logits.float()[0, :-1], -1)
        tgt = ids[0, 1:]
        nll_b -= float(lb.gather(-1, tgt[:, None]).sum())
        nll_a -= float(la.gather(-1, tgt[:, None]).sum())
        kl += float((lb.exp() * (lb - la)).sum())
        n += len(tgt)
    torch.set_grad_enabled(True)
    for bs in (1, 4, 8):  # batched with right padding: the same numbers
        m = text_metrics(base, adapted, tok, TEXTS, batch_size=bs)
        assert m["tokens"] == n
        assert m["perplexity_base"] == pytest.approx(math.exp(nll_b / n), rel=1e-4)
        assert m["perplexity_adapted"] == pytest.approx(math.exp(nll_a / n), rel=1e-4)
        assert m["kl_to_base"] == pytest.approx(kl / n, rel=1e-3)
    assert rows[0][0] == tok.bos_token_id


def test_max_tokens_truncates(tiny):
    path, tok = tiny
    base = _load(path)
    m = text_metrics(base, base, tok, ["open the window please " * 10], max_tokens=6)
    assert m["tokens"] == 5


def test_agreement_detects_change(tiny):
    path, tok = tiny
    base, adapted = _load(path), _load(path)
    with torch.no_grad():
        adapted.lm_head.weight.copy_(
            torch.randn(adapted.lm_head.weight.shape, generator=torch.Generator().manual_seed(3))
        )
    g = greedy_agreement(base, adapted, tok, ["open the", "good", "yes"], max_new_tokens=6)
    assert 0.0 <= g["agreement"] < 1.0
    assert g["exact"] < 1.0
    assert len(g["samples"]) == 3


def test_probe_decodes_the_base_once_and_only_that_base(tiny):
    path, tok = tiny
    base, adapted = _load(path), _load(path)
    with torch.no_grad():
        adapted.lm_head.weight.mul_(-1.0)  # another greedy path
    calls = []
    base.register_forward_hook(lambda *a: calls.append(1))
    prompts = ["open the", "good", "yes"]
    probe = ForgettingProbe(prompts={"en": prompts}, agreement_new_tokens=6)
    first = probe.measure(base, adapted, tok)
    n = len(calls)
    second = probe.measure(base, adapted, tok)
    assert n > 0 and len(calls) == n  # the base's continuations came from the first call
    fresh = greedy_agreement(base, adapted, tok, prompts, max_new_tokens=6)
    for got in (first, second):
        assert got.agreement["en"]["items"] == fresh["items"] and got.agreement["en"]["samples"] == fresh["samples"]
        assert "base_ids" not in got.agreement["en"]
    assert fresh["agreement"] < 1.0
    other = _load(path)  # another base object is decoded, never given the first one's continuations
    with torch.no_grad():
        other.lm_head.weight.mul_(-1.0)
    assert probe.measure(other, adapted, tok).agreement["en"]["agreement"] == 1.0
    with pytest.raises(ValueError, match="2 continuations for 3 prompts"):
        greedy_agreement(base, adapted, tok, prompts, base_ids=fresh["base_ids"][:2])


def test_default_instructions():
    assert set(DEFAULT_INSTRUCTIONS) >= {"en", "de"}
    for items in DEFAULT_INSTRUCTIONS.values():
        assert len(items) >= 15 and len(set(items)) == len(items)
