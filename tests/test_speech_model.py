"""Speech LLM model: encoders, adaptor, sequence layout / loss, generation, save/load, feature cache."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from conditune.errors import CondituneError
from conditune.evaluation.transcription import transcribe
from conditune.speech.adaptor import AudioAdaptor
from conditune.speech.configuration import AdaptorConfig, EncoderConfig, SpeechLLMConfig
from conditune.speech.encoders import HFWhisperEncoder, encoded_length
from conditune.speech.modeling import IGNORE_INDEX, SpeechLLM
from fixtures import (
    TEXTS,
    build_speech_model,
    load_speech_model,
    model_config,
    speech_assets,
    tiny_whisper_config,
    tone,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return speech_assets(tmp_path_factory.mktemp("speech"))


@pytest.fixture(scope="module")
def built(assets):
    torch.manual_seed(0)
    return build_speech_model(model_config(assets["whisper"], assets["llm"], "all"))


@pytest.fixture(scope="module")
def model(built):
    return built[0]


@pytest.fixture(scope="module")
def processor(built):
    return built[1]


def _waves(paths):
    from conditune.data.audio import load_audio

    return [load_audio(p) for p in paths]


# ---------------------------------------------------------------- config


def test_config_round_trip_and_errors(assets):
    data = model_config(assets["whisper"], assets["llm"], "lora")
    data["adaptor"]["dropout"] = "0.25"  # strings (YAML / CLI) are coerced to the field type
    cfg = SpeechLLMConfig.from_dict(data)
    assert cfg.adaptor.dropout == 0.25 and cfg.trainable.mode == "lora"
    again = SpeechLLMConfig.from_dict(json.loads(cfg.to_json()))
    legacy = SpeechLLMConfig.from_dict({**data, "adaptor": {**data["adaptor"], "ctc_compress": True}})
    assert legacy.ctc.compress  # a 0.1.0 key moved to its section
    assert again == cfg
    with pytest.raises(CondituneError, match="unknown key"):
        SpeechLLMConfig.from_dict({"adaptor": {"sub_sample": 4}})
    bad = SpeechLLMConfig.from_dict({**data, "trainable": {"mode": "names"}})
    with pytest.raises(CondituneError, match="names_file"):
        bad.validate()


# ---------------------------------------------------------------- encoder + adaptor


def test_hf_encoder_uses_real_length_and_is_batch_independent(assets):
    enc = HFWhisperEncoder(EncoderConfig(backend="hf", path=str(assets["whisper"])))
    waves = [tone(0.5, 300, 1), tone(1.13, 500, 2), tone(0.5, 700, 3)]
    frames, lengths = enc.encode(waves)
    assert lengths.tolist() == [encoded_length(len(w)) for w in waves] == [25, 57, 25]
    assert frames.shape == (3, 57, enc.dim) and frames.dtype == torch.float32
    assert torch.all(frames[0, 25:] == 0)
    alone, _ = enc.encode([waves[1]])
    torch.testing.assert_close(alone[0], frames[1], rtol=0, atol=1e-6)
    # identity is stable and depends on the weights folder
    assert enc.identity == HFWhisperEncoder(EncoderConfig(backend="hf", path=str(assets["whisper"]))).identity


def test_encoder_length_buckets_batch_similar_lengths(assets, monkeypatch):
    enc = HFWhisperEncoder(EncoderConfig(backend="hf", path=str(assets["whisper"]), bucket_seconds=1.0))
    calls = []
    original = enc._encode_mels
    monkeypatch.setattr(enc, "_encode_mels", lambda mels: calls.append(mels.shape) or original(mels))
    waves = [tone(0.31, 300, 1), tone(0.77, 500, 2), tone(1.4, 700, 3)]
    frames, lengths = enc.encode(waves)
    assert lengths.tolist() == [encoded_length(len(w)) for w in waves]
    assert calls == [(2, 80, 100), (1, 80, 200)]  # the two short ones share a 1 s bucket
    alone, _ = enc.encode([waves[1]])
    torch.testing.assert_close(alone[0], frames[1, : lengths[1]], rtol=0, atol=1e-6)
    assert enc.identity != HFWhisperEncoder(EncoderConfig(backend="hf", path=str(assets["whisper"]))).identity


def test_hf_encoder_equals_transformers_forward_on_30s_input(tmp_path):
    from transformers import WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = tiny_whisper_config(encoder_layers=2)
    reference = WhisperForConditionalGeneration(cfg).eval()  # a ...ForConditionalGeneration folder loads too
    reference.save_pretrained(tmp_path / "w")
    enc = HFWhisperEncoder(EncoderConfig(backend="hf", path=str(tmp_path / "w")))
    mel = np.random.default_rng(0).standard_normal((1, 80, 3000)).astype(np.float32)
    with torch.no_grad():
        expected = reference.model.encoder(torch.from_numpy(mel)).last_hidden_state.numpy()
    np.testing.assert_allclose(enc._encode_mels(mel), expected, rtol=0, atol=1e-5)


def test_adaptor_subsamples_and_ignores_padding():
    torch.manual_seed(0)
    adaptor = AudioAdaptor(8, 16, AdaptorConfig(subsample=4, depth=2, heads=4, dropout=0.0)).eval()
    x = torch.randn(3, 10, 8)
    lengths = torch.tensor([10, 5, 1])
    out, new = adaptor(x, lengths)
    assert new.tolist() == [3, 2, 1] and out.shape == (3, 3, 16)
    assert torch.all(out[1, 2:] == 0) and torch.all(out[2, 1:] == 0)
    x2 = x.clone()
    x2[1, 5:] = 123.0  # garbage in the padded part changes nothing
    out2, _ = adaptor(x2, lengths)
    torch.testing.assert_close(out, out2)
    single, _ = adaptor(x[1:2, :5], lengths[1:2])
    torch.testing.assert_close(single[0], out[1, :2], rtol=1e-5, atol=1e-5)
    # frame concatenation, tail padding, projection, norm and positions, by hand (no attention layers)
    from conditune.speech.adaptor import sinusoidal_positions

    flat = AudioAdaptor(8, 16, AdaptorConfig(subsample=4, depth=0, heads=4)).eval()
    y = torch.randn(1, 6, 8)
    out, new = flat(y, torch.tensor([6]))
    rows = torch.stack(
        [torch.cat([y[0, 0], y[0, 1], y[0, 2], y[0, 3]]), torch.cat([y[0, 4], y[0, 5], torch.zeros(16)])]
    )
    with torch.no_grad():
        expected = flat.norm(flat.proj(rows)) + sinusoidal_positions(2, 16)
    assert new.tolist() == [2]
    torch.testing.assert_close(out[0], expected)


# ---------------------------------------------------------------- sequence layout and loss


def test_labels_and_loss_equal_hand_computation(model, processor, assets):
    model.eval()
    frames, lengths = processor.encoder.encode(_waves(assets["paths"][:3]))
    tokens = [processor.tokenize(t) for t in TEXTS[:3]]
    with torch.no_grad():
        audio, alen = model.adaptor(frames, lengths)
        batch = model.build_inputs(audio, alen, tokens)
        out = model.loss_from_batch(batch)

    bos, eos = model.bos_token_id, model.eos_token_id
    total_nll, total_n = 0.0, 0
    for b, toks in enumerate(tokens):
        n_audio = int(alen[b])
        assert n_audio == math.ceil(int(lengths[b]) / 4)
        seq_len = n_audio + len(toks) + 2
        # layout: audio, BOS, text, EOS, then right padding
        assert batch.attention_mask[b].tolist() == [1] * seq_len + [0] * (batch.attention_mask.shape[1] - seq_len)
        assert batch.position_ids[b, :seq_len].tolist() == list(range(seq_len))
        expected = (
            [IGNORE_INDEX] * n_audio
            + list(toks)
            + [eos]
            + [IGNORE_INDEX] * (batch.labels.shape[1] - n_audio - len(toks) - 1)
        )
        assert batch.labels[b].tolist() == expected
        # by hand: one unpadded sequence through the full model, loss token by token
        emb = model.core_llm.get_input_embeddings()
        ids = torch.tensor([bos, *toks, eos])
        seq = torch.cat([audio[b, :n_audio], emb(ids)]).unsqueeze(0)
        with torch.no_grad():
            logits = model.core_llm(inputs_embeds=seq).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        targets = [*toks, eos]
        for j, target in enumerate(targets):
            position = n_audio + j  # BOS predicts t_1, t_k predicts t_{k+1}, t_m predicts EOS
            total_nll -= float(logp[position, target])
            total_n += 1
    assert out.num_tokens == total_n
    assert float(out.loss) == pytest.approx(total_nll / total_n, rel=1e-5, abs=1e-6)


def test_forward_computes_logits_only_at_loss_positions(model, processor, assets, monkeypatch):
    frames, lengths = processor.encoder.encode(_waves(assets["paths"][:2]))
    tokens = [processor.tokenize(t) for t in TEXTS[:2]]
    head = model.core_llm.get_output_embeddings()
    seen = []
    handle = head.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    try:
        out = model(frames, lengths, tokens)
    finally:
        handle.remove()
    n = sum(len(t) + 1 for t in tokens)
    assert seen == [(n, head.in_features)] and out.num_tokens == n
    out.loss.backward()  # gradients reach the adaptor
    assert model.adaptor.proj.weight.grad is not None
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- generation and persistence


def test_transcribe_batched_equals_single_and_beam(model, processor, assets):
    paths = [str(p) for p in assets["paths"]]
    batched = transcribe(model, processor, paths, batch_size=4, max_new_tokens=6)
    single = transcribe(model, processor, paths, batch_size=1, max_new_tokens=6)
    assert batched == single and len(batched) == 4
    beams = transcribe(model, processor, [_waves(paths[:1])[0]], num_beams=3, max_new_tokens=6)
    assert len(beams) == 1 and isinstance(beams[0], str)


def test_save_load_round_trip(assets, tmp_path):
    torch.manual_seed(1)
    names = ["model.layers.1.mlp.down_proj.weight", "model.norm.weight"]
    m, processor = build_speech_model(model_config(assets["whisper"], assets["llm"], "names", names=names))
    assert sorted(m.llm_trainable_names()) == sorted(names)
    with torch.no_grad():  # stand-in for training: move the trainable tensors
        for _, p in m.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.5)
    paths = [str(p) for p in assets["paths"]]
    before = transcribe(m, processor, paths, max_new_tokens=8)
    m.save_pretrained(tmp_path / "model")
    files = sorted(os.listdir(tmp_path / "model"))
    assert files == ["config.json", "integrity.json", "llm_delta", "model.safetensors"]
    delta = json.loads((tmp_path / "model" / "llm_delta" / "delta.json").read_text())
    assert sorted(delta["names"]) == sorted(names)
    loaded, loaded_processor = load_speech_model(tmp_path / "model")
    assert transcribe(loaded, loaded_processor, paths, max_new_tokens=8) == before
    for name in names:
        torch.testing.assert_close(
            dict(loaded.llm.named_parameters())[name], dict(m.llm.named_parameters())[name], rtol=0, atol=0
        )
    # text-only use (forgetting evaluation): no encoder needed, same LLM weights
    from conditune.speech.processing import SpeechProcessor

    assert SpeechProcessor.from_pretrained(tmp_path / "model", load_encoder=False).feature_extractor is None
    text_only = SpeechLLM.from_pretrained(tmp_path / "model")
    for name in names:
        assert torch.equal(dict(text_only.llm.named_parameters())[name], dict(m.llm.named_parameters())[name])
    with pytest.raises(CondituneError, match="adaptor"):
        SpeechLLM.from_pretrained(tmp_path / "model").load_trained_state(tmp_path)


def test_lora_mode_trains_only_adapters(assets, tmp_path):
    m, processor = build_speech_model(
        model_config(
            assets["whisper"], assets["llm"], "lora", lora={"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}
        )
    )
    names = m.llm_trainable_names()
    assert names and all("lora_" in n for n in names)
    with torch.no_grad():
        for n, p in m.llm.named_parameters():
            if "lora_B" in n:
                p.add_(0.3)
    paths = [str(p) for p in assets["paths"][:2]]
    before = transcribe(m, processor, paths, max_new_tokens=5)
    m.save_pretrained(tmp_path / "lora")
    assert transcribe(*load_speech_model(tmp_path / "lora"), paths, max_new_tokens=5) == before


def test_unknown_selected_name_is_a_user_error(assets):
    with pytest.raises(CondituneError):
        build_speech_model(model_config(assets["whisper"], assets["llm"], "names", names=["model.nope.weight"]))


# ---------------------------------------------------------------- feature cache


def test_feature_cache_skips_encoder_second_time(processor, assets, tmp_path, monkeypatch):
    from conditune.speech.features import FeatureCache

    paths = assets["paths"][:3]
    first = FeatureCache(processor.encoder, tmp_path / "cache").get(paths)
    files = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(files) == 3 and not list((tmp_path / "cache").rglob("*.tmp"))

    def boom(*a, **k):
        raise AssertionError("encoder called despite the cache")

    monkeypatch.setattr(processor.encoder, "encode", boom)
    cache = FeatureCache(processor.encoder, tmp_path / "cache", memory=False)
    again = cache.get(paths)
    assert cache.hits == 3 and cache.misses == 0
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert cache.length(paths[1]) == first[1].shape[0]


# ---------------------------------------------------------------- CTranslate2 with the real whisper-base


@pytest.mark.slow
def test_ct2_whisper_base_encoder():
    pytest.importorskip("ctranslate2")
    from conditune import models
    from conditune.speech.encoders import CT2WhisperEncoder

    if not models.is_installed("whisper-base"):
        pytest.skip("whisper-base not installed (conditune models fetch whisper-base)")
    enc = CT2WhisperEncoder(EncoderConfig(backend="ct2", path=str(models.model_path("whisper-base")), threads=1))
    assert enc.dim == 512 and enc.n_mels == 80
    waves = [tone(1.0, 440, 0), tone(2.37, 300, 1)]
    frames, lengths = enc.encode(waves)
    assert lengths.tolist() == [math.ceil(16000 / 320), math.ceil(2.37 * 16000 // 160 / 2)]
    assert frames.shape == (2, int(lengths.max()), 512) and torch.isfinite(frames).all()
    alone, _ = enc.encode([waves[0]])
    torch.testing.assert_close(alone[0], frames[0, : lengths[0]], rtol=1e-4, atol=1e-4)
    assert float(frames[0, : lengths[0]].std()) > 0.05  # real activations, not zeros


def test_ctc_compression_keeps_token_positions_and_averages_runs(assets, tmp_path):
    cfg = model_config(assets["whisper"], assets["llm"], "none")
    cfg["ctc"] = {"compress": True}
    m, _ = build_speech_model(cfg)
    emb = m.core_llm.get_input_embeddings().weight
    dim = emb.shape[1]
    basis = torch.linalg.qr(torch.randn(dim, 3, generator=torch.Generator().manual_seed(0)))[0].T  # 3 orthonormal rows
    with torch.no_grad():
        emb[5], emb[7], m.ctc_head.blank[:] = basis[0], basis[1], basis[2]
    m.set_ctc_vocabulary([7, 5, 7])
    assert m.ctc_head.vocabulary.tolist() == [5, 7]
    e5, e7, blank = basis
    # greedy CTC labels: blank 5 5 blank 5 7 blank -> runs (5 5) (5) (7); an all-blank row keeps one position
    row0 = torch.stack([blank, 2 * e5, e5, blank, e5, e7, blank])
    row1 = torch.stack([blank, blank + 0.3 * e7, blank, blank, blank, blank, blank])
    audio = torch.stack([row0, row1]).requires_grad_(True)
    out, lengths = m.compress(audio, torch.tensor([7, 5]))
    assert lengths.tolist() == [3, 1] and out.shape == (2, 3, dim)
    torch.testing.assert_close(out[0], torch.stack([1.5 * e5, e5, e7]))
    torch.testing.assert_close(out[1, 0], blank + 0.3 * e7)  # the least-blank position
    assert torch.count_nonzero(out[1, 1:]) == 0
    out.sum().backward()  # the kept vectors carry gradients; the dropped ones get none
    assert audio.grad[0, 0].abs().sum() == 0 and audio.grad[0, 1].abs().sum() > 0
    # the vocabulary is saved with the adaptor: a loaded model compresses the same way
    m.save_pretrained(tmp_path / "m")
    loaded = SpeechLLM.from_pretrained(tmp_path / "m")
    assert loaded.ctc_head.vocabulary.tolist() == [5, 7] and loaded.config.ctc.compress


def test_compressed_generation_is_capped_by_the_positions_read(assets):
    cfg = model_config(assets["whisper"], assets["llm"], "none")
    cfg["ctc"] = {"compress": True}
    torch.manual_seed(0)
    m, processor = build_speech_model(cfg)
    frames, lengths = processor.frames(_waves(assets["paths"][:3]))
    _, positions = m.llm_audio(*m.adaptor(frames, lengths))
    caps = m.transcript_token_cap(positions)
    assert caps == [math.ceil(1.5 * int(n)) + 4 for n in positions]
    rows = m.generate_ids(frames, lengths, max_new_tokens=200)
    # a random LLM never stops by itself: every row runs to its own cap, not to max_new_tokens
    assert [len(r) for r in rows] == [min(c, 200) for c in caps]
    assert max(len(r) for r in m.generate_ids(frames, lengths, max_new_tokens=3)) <= 3
    cfg["ctc"] = {"compress": False}
    assert build_speech_model(cfg)[0].transcript_token_cap(positions) is None


def test_ctc_embedding_readout_mixes_token_embeddings_by_posterior(assets):
    cfg = model_config(assets["whisper"], assets["llm"], "none")
    cfg["ctc"] = {"compress": True, "readout": "embeddings"}
    m, _ = build_speech_model(cfg)
    emb = m.core_llm.get_input_embeddings().weight
    dim = emb.shape[1]
    basis = torch.linalg.qr(torch.randn(dim, 3, generator=torch.Generator().manual_seed(1)))[0].T
    with torch.no_grad():
        emb[5], emb[7], m.ctc_head.blank[:] = basis[0], basis[1], basis[2]
        m.ctc_head.log_scale.fill_(0.0)  # logits are plain dot products
    m.set_ctc_vocabulary([5, 7])
    e5, e7, blank = basis
    # labels: blank, 5, 5, 7 -> runs (5 5) (7); each kept vector is softmax over tokens 5, 7 (blank left out)
    row = torch.stack([3 * blank, 2 * e5, e5 + 0.5 * e7, 3 * e7]).requires_grad_(True)
    out, lengths = m.compress(row[None], torch.tensor([4]))
    assert lengths.tolist() == [2]

    def mix(vec):
        p = torch.softmax(torch.stack([vec @ e5, vec @ e7]), 0)
        return p[0] * emb[5] + p[1] * emb[7]

    torch.testing.assert_close(out[0, 0], (mix(row[1]) + mix(row[2])) / 2)
    torch.testing.assert_close(out[0, 1], mix(row[3]))
    out.sum().backward()  # gradients reach the adaptor through the posterior; dropped positions get none
    assert row.grad[0].abs().sum() == 0 and row.grad[1].abs().sum() > 0
    cfg["ctc"] = {"compress": False, "readout": "embeddings"}
    with pytest.raises(CondituneError, match="ctc.readout 'embeddings' needs"):
        SpeechLLMConfig.from_dict(cfg).validate()
    cfg["ctc"] = {"compress": True, "readout": "tokens"}
    with pytest.raises(CondituneError, match="ctc.readout must be one of"):
        SpeechLLMConfig.from_dict(cfg).validate()


def test_transformers_asr_pipeline_transcribes_like_the_model(assets, tmp_path):
    """transformers.pipeline("automatic-speech-recognition", ...) drives a saved speech model: same text as
    conditune's own transcription, from a file path, from an array, and batched."""
    from transformers import pipeline

    from conditune.speech.pipeline import TASK, SpeechRecognitionPipeline, speech_recognition_pipeline

    torch.manual_seed(2)
    m, processor = build_speech_model(model_config(assets["whisper"], assets["llm"], "all"))
    m.save_pretrained(tmp_path / "m")
    paths = [str(p) for p in assets["paths"]]
    expected = transcribe(m, processor, paths, max_new_tokens=6)
    asr = speech_recognition_pipeline(tmp_path / "m", max_new_tokens=6)
    assert isinstance(asr, SpeechRecognitionPipeline)
    assert [asr(p)["text"] for p in paths] == expected
    assert [r["text"] for r in asr(paths, batch_size=2)] == expected
    wave = _waves(paths[:1])[0]
    assert asr({"raw": wave, "sampling_rate": 16000})["text"] == expected[0]
    # transformers' own factory, through the registered task and through pipeline_class
    for task, extra in ((TASK, {}), ("automatic-speech-recognition", {"pipeline_class": SpeechRecognitionPipeline})):
        direct = pipeline(
            task,
            model=m,
            tokenizer=processor.tokenizer,
            feature_extractor=processor.feature_extractor,
            device=-1,
            max_new_tokens=6,
            **extra,
        )
        assert direct(paths[1])["text"] == expected[1], task


def test_a_model_saved_by_0_1_0_loads(assets, tmp_path):
    """A folder in the 0.1.0 layout (speech_config.json with a _meta block; adaptor.safetensors holding the CTC
    head's tensors without prefixes) loads, and transcribes as the same model saved today."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(3)
    cfg = model_config(assets["whisper"], assets["llm"], "names", names=["model.layers.1.mlp.down_proj.weight"])
    cfg["ctc"] = {"compress": True}
    m, processor = build_speech_model(cfg)
    m.set_ctc_vocabulary([5, 7, 9])
    with torch.no_grad():
        m.ctc_head.blank.add_(0.5)
    m.save_pretrained(tmp_path / "new")
    paths = [str(p) for p in assets["paths"][:2]]
    expected = transcribe(m, processor, paths, max_new_tokens=5)

    old = tmp_path / "old"
    (old).mkdir()
    import shutil

    shutil.copytree(tmp_path / "new" / "llm_delta", old / "llm_delta")
    doc = json.loads((tmp_path / "new" / "config.json").read_text())
    meta = {"conditune_speech_llm": 1, "encoder_dim": doc.pop("encoder_dim"), "llm_dim": doc.pop("llm_dim"),
            "bos_token_id": doc["llm"]["bos_token_id"], "eos_token_id": doc["llm"]["eos_token_id"]}  # fmt: skip
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        doc["llm"][key] = None
    doc["adaptor"].update(ctc_compress=doc["ctc"]["compress"], ctc_readout=doc.pop("ctc")["readout"])
    for key in ("model_type", "conditune_version"):
        doc.pop(key)
    (old / "speech_config.json").write_text(json.dumps({**doc, "_meta": meta}))
    legacy_names = {"ctc_head.blank": "ctc_blank", "ctc_head.log_scale": "ctc_log_scale",
                    "ctc_head.vocabulary": "ctc_vocabulary"}  # fmt: skip
    state = load_file(str(tmp_path / "new" / "model.safetensors"))
    old_state = {legacy_names.get(k[len("adaptor.") :], k[len("adaptor.") :]): v for k, v in state.items()}
    save_file(old_state, str(old / "adaptor.safetensors"))

    loaded, loaded_processor = load_speech_model(old)
    assert loaded.config.ctc.compress and loaded.ctc_head.vocabulary.tolist() == [5, 7, 9]
    assert transcribe(loaded, loaded_processor, paths, max_new_tokens=5) == expected
    # a folder that is not a model at all: one line naming it
    with pytest.raises(CondituneError, match="missing: .*not found"):
        SpeechLLM.from_pretrained(tmp_path / "missing")
