"""Speech LLM training: overfitting, exact resume, selective updates, bad data, config overrides, CLI."""

from __future__ import annotations

import json
import math
import pytest
import torch

from speech_helpers import TEXTS, make_corpus, make_tiny_llm, make_tiny_whisper, model_config, write_wav, tone

from conditune.errors import ConditumeError
from conditune.training.config import TrainConfig, load_train_config, parse_overrides
from conditune.training.trainer import train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    whisper = make_tiny_whisper(root / "whisper")
    llm = make_tiny_llm(root / "llm")
    manifest, paths = make_corpus(root / "data")
    return {"root": root, "whisper": whisper, "llm": llm, "manifest": manifest, "paths": paths, "cache": root / "features"}


def _config(assets, out, mode="all", model_extra=None, **train):
    model = model_config(assets["whisper"], assets["llm"], mode, **(model_extra or {}))
    return {
        "model": model,
        "data": {"train": str(assets["manifest"]), "max_batch": 2, "feature_cache": str(assets["cache"])},
        "train": {"output_dir": str(out), "lr": 3e-3, "warmup_steps": 5, "log_every": 1, "progress": False,
                  "tensorboard": False, "max_new_tokens": 10, **train},
    }


# ---------------------------------------------------------------- config


def test_overrides_and_coercion(tmp_path, assets):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_config(assets, tmp_path / "out")))
    cfg = load_train_config(path, ["train.lr=1e-4", "model.adaptor.depth=1", "data.dev=null", "train.schedule=linear"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.adaptor.depth == 1 and cfg.data.dev is None and cfg.train.schedule == "linear"
    assert parse_overrides(["train.max_steps=7"]) == {"train.max_steps": 7}
    with pytest.raises(ConditumeError, match="unknown key"):
        load_train_config(path, ["train.learning_rate=1"])
    with pytest.raises(ConditumeError, match="number"):
        load_train_config(path, ["train.lr=fast"])
    with pytest.raises(ConditumeError, match="section.key=value"):
        load_train_config(path, ["train.lr"])
    assert TrainConfig.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


# ---------------------------------------------------------------- training behaviour


def test_overfits_a_handful_of_utterances(assets, tmp_path):
    out = tmp_path / "run"
    cfg = _config(assets, out, max_steps=120, eval_every=60, save_every=40, keep_last=2)
    cfg["data"]["max_batch"] = 4
    cfg["data"]["dev"] = str(assets["manifest"])
    result = train(cfg)
    assert result.step == 120 and result.stopped == "max_steps"
    assert result.eval["all"] == 0.0, result.eval
    assert result.losses[120] < 0.5 * result.losses[1]
    # last two checkpoints kept, final model folder, metrics
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-00000080", "step-00000120"]
    assert (out / "final" / "adaptor.safetensors").is_file() and (out / "result.json").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [60, 120]
    from conditune.speech.modeling import SpeechLLM

    model = SpeechLLM.from_pretrained(out / "final")
    assert model.transcribe([str(p) for p in assets["paths"]], max_new_tokens=10) == TEXTS


def test_resume_reproduces_uninterrupted_losses(assets, tmp_path):
    # dropout > 0 and grad accumulation: RNG states and the data position must be restored exactly
    full = _config(assets, tmp_path / "full", max_steps=8, grad_accum=2, schedule="cosine")
    full["model"]["adaptor"]["dropout"] = 0.2
    reference = train(full)

    killed = _config(assets, tmp_path / "killed", max_steps=8, grad_accum=2, save_every=3, schedule="cosine")
    killed["model"]["adaptor"]["dropout"] = 0.2
    first = train(killed, stop_after_steps=5)  # "killed" after step 5; last checkpoint at step 3
    assert first.stopped == "stop_after_steps" and first.step == 5
    assert not (tmp_path / "killed" / "final").exists()
    resumed = train(killed, resume=True)
    assert resumed.step == 8
    assert sorted(resumed.losses) == [4, 5, 6, 7, 8]
    for step in range(4, 9):
        assert resumed.losses[step] == pytest.approx(reference.losses[step], rel=1e-6, abs=1e-7), step
    for step in range(1, 6):
        assert first.losses[step] == pytest.approx(reference.losses[step], rel=1e-6, abs=1e-7)
    # the metrics log of the resumed run reads like the uninterrupted one
    def losses(path):
        return [(r["step"], round(r["loss"], 6)) for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train"]

    assert losses(tmp_path / "killed" / "metrics.jsonl") == losses(tmp_path / "full" / "metrics.jsonl")
    state = json.loads((tmp_path / "killed" / "checkpoints" / "step-00000008" / "trainer_state.json").read_text())
    assert state["step"] == 8


def test_only_selected_tensors_and_adaptor_change(assets, tmp_path):
    from conditune.speech.config import SpeechLLMConfig
    from conditune.speech.modeling import SpeechLLM

    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    cfg = _config(assets, tmp_path / "sel", mode="names", model_extra={"names": names}, max_steps=4)
    base = SpeechLLM.build(SpeechLLMConfig.from_dict(cfg["model"]), for_training=False)
    before = {k: v.clone() for k, v in base.llm.state_dict().items()}
    result = train(cfg)
    trained = SpeechLLM.from_pretrained(result.final_dir)
    after = trained.llm.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == sorted(names)
    delta = json.loads((result.final_dir / "llm_delta" / "delta.json").read_text())
    assert sorted(delta["names"]) == sorted(names)
    # the adaptor did train (compare with a fresh one built from the same seed)
    torch.manual_seed(0)
    fresh = SpeechLLM.build(SpeechLLMConfig.from_dict(cfg["model"]), for_training=False)
    assert not torch.equal(fresh.adaptor.proj.weight, trained.adaptor.proj.weight)


def test_bad_audio_is_skipped_and_counted(assets, tmp_path):
    data = tmp_path / "bad"
    data.mkdir()
    (data / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    good = write_wav(data / "good.wav", tone(0.7, 330, 9))
    rows = [{"id": "good", "audio": str(good), "text": "open the door"},
            {"id": "broken", "audio": str(data / "broken.wav"), "text": "yes please"},
            {"id": "missing", "audio": str(data / "nope.wav"), "text": "yes"},
            {"id": "notext", "audio": str(good)}]
    manifest = data / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _config(assets, tmp_path / "out", max_steps=2)
    cfg["data"]["train"] = str(manifest)
    result = train(cfg)
    assert result.train_utterances == 1
    assert result.skipped["train_bad_audio"] == 1 and result.skipped["train_rows"] == 2
    cfg["data"]["strict"] = True
    cfg["train"]["output_dir"] = str(tmp_path / "strict")
    with pytest.raises(ConditumeError, match="m.jsonl:3"):  # the missing file, found by the manifest reader
        train(cfg)
    only_audio = data / "audio_only.jsonl"
    only_audio.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    cfg["data"]["train"] = str(only_audio)
    from conditune.data.audio import AudioError

    with pytest.raises(AudioError, match="broken.wav"):  # the undecodable file, found when encoding
        train(cfg)
    cfg["data"]["train"] = str(manifest)
    cfg["data"]["strict"] = False
    cfg["train"]["output_dir"] = str(tmp_path / "none")
    manifest.write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(ConditumeError, match="no usable"):
        train(cfg)


def test_refuses_to_mix_runs_in_one_output_dir(assets, tmp_path):
    cfg = _config(assets, tmp_path / "run", max_steps=1)
    train(cfg)
    with pytest.raises(ConditumeError, match="already holds a training run"):
        train(cfg)
    cfg["train"]["overwrite"] = True
    cfg["train"]["max_steps"] = 2
    assert train(cfg).step == 2
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-00000002"]


def test_wall_clock_budget_stops_with_a_checkpoint(assets, tmp_path):
    cfg = _config(assets, tmp_path / "budget", max_steps=10_000, max_seconds=0.5)
    result = train(cfg)
    assert result.stopped == "max_seconds" and 0 < result.step < 10_000
    assert (tmp_path / "budget" / "checkpoints" / f"step-{result.step:08d}").is_dir()
    assert result.final_dir.is_dir()


# ---------------------------------------------------------------- command line


def test_cli_train_transcribe_evaluate(assets, tmp_path, capsys):
    import yaml

    from conditune.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_config(assets, tmp_path / "cli", max_steps=3)))
    assert main(["train", str(path), "train.max_steps=2", "train.lr=1e-3"]) == 0
    state = json.loads((tmp_path / "cli" / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["step"] == 2
    assert main(["train", str(path), "train.max_steps=4", "--resume"]) == 0
    assert (tmp_path / "cli" / "checkpoints" / "step-00000004").is_dir()
    capsys.readouterr()
    out_jsonl = tmp_path / "t.jsonl"
    assert main(["transcribe", str(tmp_path / "cli"), str(assets["paths"][0]), "--output", str(out_jsonl)]) == 0
    rows = [json.loads(x) for x in out_jsonl.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["audio"] == str(assets["paths"][0])
    metrics = tmp_path / "metrics.json"
    assert main(["evaluate", str(tmp_path / "cli" / "final"), str(assets["manifest"]), "--output", str(metrics)]) == 0
    report = json.loads(metrics.read_text())
    assert set(report["wer"]) == {"all", "en", "de"} and report["utterances"] == 4
    assert main(["train", str(path), "train.bogus=1"]) == 1
    assert "unknown key" in capsys.readouterr().err
    assert main(["transcribe", str(tmp_path / "nowhere"), str(assets["paths"][0])]) == 1


def test_bf16_autocast_and_lora_train(assets, tmp_path):
    # bf16 mixed precision (CPU autocast here, GPU in real runs) and LoRA, in the same process as fp32 runs
    cfg = _config(assets, tmp_path / "bf16", mode="lora", model_extra={"lora": {"r": 2, "alpha": 4}},
                  max_steps=3, mixed_precision="bf16", llm_lr=1e-3)
    result = train(cfg)
    assert result.step == 3 and all(torch.isfinite(torch.tensor(v)) for v in result.losses.values())
    record = json.loads((tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["lr"] > 0 and record["llm_lr"] > 0
    delta = json.loads((result.final_dir / "llm_delta" / "delta.json").read_text())
    assert delta["names"] and all("lora_" in n for n in delta["names"])


# ---------------------------------------------------------------- slow: a real kill, the real models


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_losses(assets, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    def config(out):
        cfg = _config(assets, out, max_steps=300, save_every=20, keep_last=2)
        cfg["model"]["adaptor"]["dropout"] = 0.1
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "conditune", "train"]
    full = config(tmp_path / "full")
    subprocess.run([*cmd, str(full)], env=env, check=True, capture_output=True)
    killed = config(tmp_path / "killed")
    proc = subprocess.Popen([*cmd, str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (tmp_path / "killed" / "checkpoints" / "step-00000040").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "final").exists()
    subprocess.run([*cmd, str(killed), "--resume"], env=env, check=True, capture_output=True)

    def losses(path):
        return [(r["step"], round(r["loss"], 5)) for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train"]

    assert losses(tmp_path / "killed" / "metrics.jsonl") == losses(tmp_path / "full" / "metrics.jsonl")
    assert len(losses(tmp_path / "full" / "metrics.jsonl")) == 300


@pytest.mark.slow
def test_real_whisper_base_and_smollm2(tmp_path):
    """A few steps with the real demo models (CTranslate2 whisper-base + SmolLM2-135M GGUF), then reload."""
    pytest.importorskip("ctranslate2")
    from conditune import models
    from conditune.speech.modeling import SpeechLLM

    if not (models.is_installed("whisper-base") and models.is_installed("smollm2")):
        pytest.skip("demo models not installed (conditune models fetch)")
    manifest, paths = make_corpus(tmp_path / "data", texts=["hello world", "good morning"])
    names = ["model.layers.10.self_attn.v_proj.weight", "model.layers.4.self_attn.v_proj.weight"]
    cfg = {
        "model": {"encoder": {"backend": "ct2", "path": "demo:whisper-base", "threads": 1}, "llm": {"path": "demo:smollm2"},
                  "adaptor": {"heads": 9}, "trainable": {"mode": "names", "names": names}},
        "data": {"train": str(manifest), "max_batch": 2, "feature_cache": str(tmp_path / "features")},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "progress": False, "tensorboard": False, "log_every": 1},
    }
    result = train(cfg)
    assert result.step == 2 and all(math.isfinite(v) for v in result.losses.values())
    assert sorted(json.loads((result.final_dir / "llm_delta" / "delta.json").read_text())["names"]) == sorted(names)
    model = SpeechLLM.from_pretrained(result.final_dir)
    texts = model.transcribe([str(p) for p in paths], max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert model.transcribe([str(paths[0])], max_new_tokens=4) == texts[:1]
