"""Speech LLM training: overfitting, exact resume, selective updates, bad data, config overrides, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conditune.config import parse_overrides
from conditune.errors import CondituneError
from conditune.evaluation.transcription import transcribe
from conditune.training.config import TrainConfig, load_train_config
from conditune.training.trainer import train
from fixtures import (
    TEXTS,
    build_speech_model,
    load_speech_model,
    make_corpus,
    model_config,
    speech_assets,
    tone,
    train_config,
    write_wav,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return speech_assets(tmp_path_factory.mktemp("train"))


def _config(assets, out, mode="all", model_extra=None, **train):
    """Today's sections, from the flat training keys of 0.1.0 (``max_steps=``, ``lr=``, ``eval_every=``...)."""
    settings = {
        "output_dir": str(out),
        "lr": 3e-3,
        "warmup_steps": 5,
        "log_every": 1,
        "progress": False,
        "tensorboard": False,
        "max_new_tokens": 10,
        **train,
    }
    model = model_config(assets["whisper"], assets["llm"], mode, **(model_extra or {}))
    data = {"train": str(assets["manifest"]), "max_batch": 2, "feature_cache": str(assets["cache"])}
    return train_config(model, data, **settings)


# ---------------------------------------------------------------- config


def test_overrides_and_coercion(tmp_path, assets):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_config(assets, tmp_path / "out")))
    overrides = ["optimizer.lr=1e-4", "model.adaptor.depth=1", "data.dev=null", "optimizer.schedule=linear"]
    cfg = load_train_config(path, overrides)
    assert cfg.optimizer.lr == 1e-4 and isinstance(cfg.optimizer.lr, float)
    assert cfg.model.adaptor.depth == 1 and cfg.data.dev is None and cfg.optimizer.schedule == "linear"
    assert parse_overrides(["training.max_steps=7"]) == {"training.max_steps": 7}
    with pytest.raises(CondituneError, match="unknown key optimizer.learning_rate"):
        load_train_config(path, ["optimizer.learning_rate=1"])
    with pytest.raises(CondituneError, match="optimizer.lr must be a number"):
        load_train_config(path, ["optimizer.lr=fast"])
    with pytest.raises(CondituneError, match="section.key=value"):
        load_train_config(path, ["optimizer.lr"])
    with pytest.raises(CondituneError, match="training.align_steps"):
        load_train_config(path, ["training.align_steps=-1"])
    assert TrainConfig.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    # every value checked before anything loads, the key named
    for bad, key in (
        ("optimizer.lr=-1", "optimizer.lr"),
        ("training.max_steps=2.5", "training.max_steps"),
        ("training.max_steps=0", "training.max_steps"),
        ("optimizer.lr=nan", "optimizer.lr"),
        ("data.max_batch=0", "data.max_batch"),
        ("evaluation.num_beams=0", "evaluation.num_beams"),
        ("training.mixed_precision=fp8", "training.mixed_precision"),
    ):
        with pytest.raises(CondituneError, match=key.replace(".", r"\.")):
            load_train_config(path, [bad])
    # a config of 0.1.0 (one `train:` section) still loads, each key moved to its section
    old = load_train_config(path, ["train.lr=2e-4", "train.max_steps=9", "train.output_dir=elsewhere"])
    assert (old.optimizer.lr, old.training.max_steps, old.output.dir) == (2e-4, 9, "elsewhere")


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
    assert (out / "final" / "model.safetensors").is_file() and (out / "result.json").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [60, 120]
    assert transcribe(*load_speech_model(out / "final"), [str(p) for p in assets["paths"]], max_new_tokens=10) == TEXTS


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
        return [
            (r["step"], round(r["loss"], 6))
            for r in map(json.loads, path.read_text().splitlines())
            if r["kind"] == "train"
        ]

    assert losses(tmp_path / "killed" / "metrics.jsonl") == losses(tmp_path / "full" / "metrics.jsonl")
    state = json.loads((tmp_path / "killed" / "checkpoints" / "step-00000008" / "trainer_state.json").read_text())
    assert state["step"] == 8


def test_fused_adamw_gives_the_loop_s_update_to_rounding(assets, tmp_path):
    from types import SimpleNamespace

    from conditune.training.config import OptimizerConfig
    from conditune.training.optim import build_optimizer

    models = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
        opt = build_optimizer(model, SimpleNamespace(optimizer=OptimizerConfig(lr=1e-2, fused=fused)))
        assert bool(opt.defaults["fused"]) is fused
        for step in range(3):
            x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        models.append(model)
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert not torch.equal(models[0][0].weight, torch.nn.Linear(6, 5).weight)

    # end to end: the trainer builds it from optimizer.fused, and the losses follow the loop's
    loop = train(_config(assets, tmp_path / "loop", max_steps=4))
    fused = _config(assets, tmp_path / "fused", max_steps=4)
    fused["optimizer"]["fused"] = True
    fast = train(fused)
    for step in range(1, 5):
        assert fast.losses[step] == pytest.approx(loop.losses[step], rel=1e-4), step


def test_only_selected_tensors_and_adaptor_change(assets, tmp_path):
    from conditune.speech.modeling import SpeechLLM

    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    cfg = _config(assets, tmp_path / "sel", mode="names", model_extra={"names": names}, max_steps=4)
    base, _ = build_speech_model(cfg["model"], for_training=False)
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
    fresh, _ = build_speech_model(cfg["model"], for_training=False)
    assert not torch.equal(fresh.adaptor.proj.weight, trained.adaptor.proj.weight)


def test_bad_audio_is_skipped_and_counted(assets, tmp_path):
    data = tmp_path / "bad"
    data.mkdir()
    (data / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    good = write_wav(data / "good.wav", tone(0.7, 330, 9))
    rows = [
        {"id": "good", "audio": str(good), "text": "open the door"},
        {"id": "broken", "audio": str(data / "broken.wav"), "text": "yes please"},
        {"id": "missing", "audio": str(data / "nope.wav"), "text": "yes"},
        {"id": "notext", "audio": str(good)},
    ]
    manifest = data / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _config(assets, tmp_path / "out", max_steps=2)
    cfg["data"]["train"] = str(manifest)
    result = train(cfg)
    assert result.train_utterances == 1
    assert result.skipped["train_bad_audio"] == 1 and result.skipped["train_rows"] == 2
    cfg["data"]["strict"] = True
    cfg["output"]["dir"] = str(tmp_path / "strict")
    with pytest.raises(CondituneError, match="m.jsonl:3"):  # the missing file, found by the manifest reader
        train(cfg)
    only_audio = data / "audio_only.jsonl"
    only_audio.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    cfg["data"]["train"] = str(only_audio)
    from conditune.data.audio import AudioError

    with pytest.raises(AudioError, match="broken.wav"):  # the undecodable file, found when encoding
        train(cfg)
    cfg["data"]["train"] = str(manifest)
    cfg["data"]["strict"] = False
    cfg["output"]["dir"] = str(tmp_path / "none")
    manifest.write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(CondituneError, match="no usable"):
        train(cfg)


def test_refuses_to_mix_runs_in_one_output_dir(assets, tmp_path):
    cfg = _config(assets, tmp_path / "run", max_steps=1)
    train(cfg)
    with pytest.raises(CondituneError, match="already holds a training run"):
        train(cfg)
    cfg["output"]["overwrite"] = True
    cfg["training"]["max_steps"] = 2
    assert train(cfg).step == 2
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-00000002"]


def test_wall_clock_budget_stops_with_a_checkpoint(assets, tmp_path):
    cfg = _config(assets, tmp_path / "budget", max_steps=10_000, max_seconds=0.5)
    result = train(cfg)
    assert result.stopped == "max_seconds" and 0 < result.step < 10_000
    assert (tmp_path / "budget" / "checkpoints" / f"step-{result.step:08d}").is_dir()
    assert result.final_dir.is_dir()


def test_alignment_stage_trains_only_the_adaptor_then_the_llm(assets, tmp_path):
    from conditune.speech.modeling import SpeechLLM

    names = ["model.layers.0.mlp.up_proj.weight"]
    cfg = _config(
        assets,
        tmp_path / "align",
        mode="names",
        model_extra={"names": names},
        max_steps=2,
        align_steps=30,
        align_lr=1e-2,
        warmup_steps=0,
        log_every=1,
    )
    base, _ = build_speech_model(cfg["model"], for_training=False)
    before = base.llm.state_dict()[names[0]].clone()
    stopped = train(cfg, stop_after_steps=30)  # the whole alignment stage, nothing of the main one
    assert stopped.step == 30
    # CTC-only steps: the loss falls, the learning rate is align_lr, and the records say which phase
    assert stopped.losses[30] < 0.7 * stopped.losses[1]
    records = [json.loads(x) for x in (tmp_path / "align" / "metrics.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in records} == {"align"} and records[5]["lr"] == pytest.approx(1e-2)
    full = train({**cfg, "output": {**cfg["output"], "overwrite": True}})
    assert full.step == 32
    trained = SpeechLLM.from_pretrained(full.final_dir)
    assert not torch.equal(trained.llm.state_dict()[names[0]], before)  # the main steps do train the LLM
    main = [json.loads(x) for x in (tmp_path / "align" / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert [r["phase"] for r in main][-2:] == ["main", "main"] and main[-2]["lr"] == pytest.approx(
        1.5e-3
    )  # lr after step 31: half-way down the 2-step cosine from 3e-3


def test_alignment_steps_leave_the_llm_untouched(assets, tmp_path):
    from conditune.speech.modeling import SpeechLLM, load_llm

    cfg = _config(
        assets, tmp_path / "ckpt", mode="all", max_steps=1, align_steps=3, lr=1e-2, save_every=3, warmup_steps=0
    )
    train(cfg)
    base = load_llm(SpeechLLM.from_pretrained(tmp_path / "ckpt" / "final").config.llm).state_dict()
    aligned = SpeechLLM.from_pretrained(tmp_path / "ckpt" / "checkpoints" / "step-00000003").llm.state_dict()
    final = SpeechLLM.from_pretrained(tmp_path / "ckpt" / "final").llm.state_dict()
    assert all(torch.equal(aligned[n], base[n]) for n in base)  # 3 alignment steps: the LLM is as it was
    assert any(not torch.equal(final[n], base[n]) for n in base)  # the one main step afterwards moved it


def test_evaluations_count_main_steps(assets, tmp_path):
    cfg = _config(assets, tmp_path / "ev", mode="none", max_steps=4, align_steps=3, eval_every=2, warmup_steps=0)
    cfg["data"]["dev"] = str(assets["manifest"])
    cfg["evaluation"]["max_utterances"] = 2
    train(cfg)
    records = [json.loads(x) for x in (tmp_path / "ev" / "metrics.jsonl").read_text().splitlines()]
    # none in the alignment stage (steps 1-3); then every 2 main steps (step 5) and at the end (step 7)
    assert [r["step"] for r in records if r["kind"] == "eval"] == [5, 7]


def test_adaptor_output_starts_at_the_embedding_scale(assets):
    cfg = _config(assets, "unused")["model"]
    model, _ = build_speech_model(cfg, for_training=False)
    emb = model.core_llm.get_input_embeddings().weight
    frames = torch.randn(2, 40, model.adaptor.encoder_dim)
    audio, lengths = model.adaptor.eval()(frames, torch.tensor([40, 24]))
    rms = audio[0].pow(2).mean().sqrt()
    assert float(rms) == pytest.approx(float(emb.pow(2).mean().sqrt()), rel=0.05)
    cfg["adaptor"]["match_embedding_scale"] = False
    plain, _ = build_speech_model(cfg, for_training=False)
    assert float(plain.adaptor.output_scale) == 1.0


def test_ctc_vocabulary_restriction_gives_the_same_loss(assets):
    """Restricting the CTC head to the transcripts' tokens changes the normaliser, not which path scores best:
    the greedy CTC transcript is unchanged where the restricted vocabulary holds the answer."""
    model, _ = build_speech_model(_config(assets, "unused")["model"], for_training=False)
    tokens = [[5, 9, 9, 3], [7, 5]]
    audio = torch.randn(2, 12, model.adaptor.llm_dim)
    lengths = torch.tensor([12, 8])
    full = model.ctc_loss(audio, lengths, tokens)
    model.set_ctc_vocabulary([t for seq in tokens for t in seq])
    restricted = model.ctc_loss(audio, lengths, tokens)
    assert torch.isfinite(full) and torch.isfinite(restricted) and float(restricted) < float(full)
    with pytest.raises(CondituneError, match="CTC vocabulary"):
        model.ctc_loss(audio, lengths, [[11]])


def test_ddp_two_processes_equal_one_process_with_accumulation(assets, tmp_path):
    """2 gloo processes x grad_accum 1 train exactly what 1 process x grad_accum 2 trains: each rank takes its
    own batch of every pair, and DDP averages the gradients as accumulation does."""
    import os
    import socket
    import subprocess
    import sys

    import yaml
    from safetensors.torch import load_file

    def config(name, accum):
        cfg = _config(assets, tmp_path / name, max_steps=4, grad_accum=accum, log_every=1, device="cpu")
        cfg["data"]["max_batch"] = 1  # 4 utterances: 4 batches an epoch, so the ranks' batches differ
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={port}",
            "--master_addr=127.0.0.1",
            "-m",
            "conditune",
            "train",
            str(config("ddp", 1)),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, "-m", "conditune", "train", str(config("single", 2))],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]

    def log(name):
        return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    ddp, single = log("ddp"), log("single")
    assert [r["data_sha"] for r in ddp if r["kind"] == "train"] == [
        r["data_sha"] for r in single if r["kind"] == "train"
    ]
    assert [r["loss"] for r in ddp if r["kind"] == "train"] == pytest.approx(
        [r["loss"] for r in single if r["kind"] == "train"], rel=1e-4
    )
    a = load_file(str(tmp_path / "ddp" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "single" / "final" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    assert json.loads((tmp_path / "ddp" / "result.json").read_text())["step"] == 4


# ---------------------------------------------------------------- command line


def test_cli_train_transcribe_evaluate(assets, tmp_path, capsys):
    import yaml

    from conditune.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_config(assets, tmp_path / "cli", max_steps=3)))
    assert main(["train", str(path), "training.max_steps=2", "optimizer.lr=1e-3"]) == 0
    state = json.loads((tmp_path / "cli" / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["step"] == 2
    assert main(["train", str(path), "training.max_steps=4", "--resume"]) == 0
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
    assert main(["train", str(path), "training.bogus=1"]) == 1
    assert "unknown key" in capsys.readouterr().err
    assert main(["transcribe", str(tmp_path / "nowhere"), str(assets["paths"][0])]) == 1


def test_bf16_autocast_and_lora_train(assets, tmp_path):
    # bf16 mixed precision (CPU autocast here, GPU in real runs) and LoRA, in the same process as fp32 runs
    cfg = _config(
        assets,
        tmp_path / "bf16",
        mode="lora",
        model_extra={"lora": {"r": 2, "alpha": 4}},
        max_steps=3,
        mixed_precision="bf16",
        llm_lr=1e-3,
    )
    result = train(cfg)
    assert result.step == 3 and all(torch.isfinite(torch.tensor(v)) for v in result.losses.values())
    lines = (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()
    record = next(r for r in map(json.loads, lines) if r["kind"] == "train")
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
        return [
            (r["step"], round(r["loss"], 5))
            for r in map(json.loads, path.read_text().splitlines())
            if r["kind"] == "train"
        ]

    assert losses(tmp_path / "killed" / "metrics.jsonl") == losses(tmp_path / "full" / "metrics.jsonl")
    assert len(losses(tmp_path / "full" / "metrics.jsonl")) == 300


@pytest.mark.slow
def test_real_whisper_base_and_smollm2(tmp_path):
    """A few steps with the real demo models (CTranslate2 whisper-base + SmolLM2-135M GGUF), then reload."""
    pytest.importorskip("ctranslate2")
    from conditune import models

    if not (models.is_installed("whisper-base") and models.is_installed("smollm2")):
        pytest.skip("demo models not installed (conditune models fetch)")
    manifest, paths = make_corpus(tmp_path / "data", texts=["hello world", "good morning"])
    names = ["model.layers.10.self_attn.v_proj.weight", "model.layers.4.self_attn.v_proj.weight"]
    cfg = {
        "model": {
            "encoder": {"backend": "ct2", "path": "demo:whisper-base", "threads": 1},
            "llm": {"path": "demo:smollm2"},
            "adaptor": {"heads": 9},
            "trainable": {"mode": "names", "names": names},
        },
        "data": {"train": str(manifest), "max_batch": 2, "feature_cache": str(tmp_path / "features")},
        "training": {"max_steps": 2},
        "output": {"dir": str(tmp_path / "run"), "progress": False, "tensorboard": False, "log_every": 1},
    }
    result = train(cfg)
    assert result.step == 2 and all(math.isfinite(v) for v in result.losses.values())
    assert sorted(json.loads((result.final_dir / "llm_delta" / "delta.json").read_text())["names"]) == sorted(names)
    model, processor = load_speech_model(result.final_dir)
    texts = transcribe(model, processor, [str(p) for p in paths], max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert transcribe(model, processor, [str(paths[0])], max_new_tokens=4) == texts[:1]


def test_balanced_dev_subset_scores_every_language():
    from types import SimpleNamespace

    from conditune.data.examples import balanced_subset

    utts = [SimpleNamespace(language="en", i=i) for i in range(5)] + [
        SimpleNamespace(language="de", i=i) for i in range(2)
    ]
    picked = balanced_subset(utts, 4)
    assert [(u.language, u.i) for u in picked] == [("en", 0), ("en", 1), ("de", 0), ("de", 1)]
    assert [(u.language, u.i) for u in balanced_subset(utts, 3)] == [("en", 0), ("en", 1), ("de", 0)]
    assert balanced_subset(utts, 100) == utts


@pytest.mark.parametrize("readout", ["adaptor", "embeddings"])
def test_ctc_compressed_training_runs_and_needs_a_ctc_head(assets, tmp_path, readout):

    cfg = _config(assets, tmp_path / "cc", mode="none", max_steps=2, warmup_steps=0)
    cfg["model"]["ctc"] = {"compress": True, "readout": readout}
    with pytest.raises(CondituneError, match="ctc.compress needs a trained CTC head"):
        train(cfg)
    cfg["training"].update(align_steps=2, ctc_weight=0.5)
    result = train(cfg)
    assert result.step == 4 and all(math.isfinite(v) for v in result.losses.values())
    model, processor = load_speech_model(result.final_dir)
    assert model.ctc_head.vocabulary.numel() > 0  # the transcripts' tokens, saved with the adaptor
    assert model.config.ctc.readout == readout
    paths = [str(p) for p in assets["paths"][:2]]
    again = transcribe(*load_speech_model(result.final_dir), paths, max_new_tokens=4)
    assert transcribe(model, processor, paths, max_new_tokens=4) == again


def test_augmented_copies_train_and_are_cached_on_the_augmented_audio(assets, tmp_path):
    """data.augment: each utterance gets its copies, encoded once into the feature cache under (file, params);
    the same seed gives the same copies, another seed others."""
    cache = tmp_path / "features"
    augment = {"copies": 2, "probability": 1.0, "effects": ["noise", "gain"]}
    cfg = _config(assets, tmp_path / "aug", max_steps=3)
    cfg["data"].update(augment=augment, feature_cache=str(cache))
    result = train(cfg)
    assert result.train_utterances == 4 * 3 and result.step == 3
    files = sorted(p.name for p in cache.rglob("*.safetensors"))
    assert len(files) == 4 * 3  # 4 originals + 8 augmented copies, each its own entry
    again = train({**cfg, "output": {**cfg["output"], "dir": str(tmp_path / "aug2")}})
    assert again.losses == result.losses and sorted(p.name for p in cache.rglob("*.safetensors")) == files
    other = _config(assets, tmp_path / "aug3", max_steps=3, seed=1)
    other["data"].update(augment=augment, feature_cache=str(cache))
    train(other)
    assert len(list(cache.rglob("*.safetensors"))) == 4 * 3 + 8  # seed 1: other copies


def test_augmented_copies_can_take_the_originals_place(assets, tmp_path):
    cfg = _config(assets, tmp_path / "aug", max_steps=2)
    cfg["data"]["augment"] = {"copies": 1, "probability": 1.0, "keep_original": False, "effects": ["gain"]}
    result = train(cfg)
    assert result.train_utterances == 4  # each utterance once, as its augmented copy
    records = [json.loads(x) for x in (tmp_path / "aug" / "metrics.jsonl").read_text().splitlines()]
    assert next(r for r in records if r["kind"] == "train")[
        "data_sha"
    ]  # the batches name the copies: path#aug-<params>


def test_a_learned_ctc_table_trains_saves_and_loads(assets, tmp_path):
    cfg = _config(assets, tmp_path / "lt", mode="none", max_steps=2, align_steps=3, warmup_steps=0)
    cfg["model"]["ctc"] = {"compress": True, "readout": "embeddings", "learn_table": True}
    cfg["training"]["ctc_weight"] = 0.5
    result = train(cfg)
    model, processor = load_speech_model(result.final_dir)
    offset = model.ctc_head.table_offset
    assert offset.shape == (model.ctc_head.vocabulary.numel(), model.config.llm_dim) and offset.abs().sum() > 0
    paths = [str(p) for p in assets["paths"][:2]]
    assert transcribe(model, processor, paths, max_new_tokens=4) == transcribe(
        *load_speech_model(result.final_dir), paths, max_new_tokens=4
    )


def test_optimizer_benchmark_runs_and_its_two_optimizers_agree(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    out = tmp_path / "opt"
    cmd = [sys.executable, str(root / "benchmarks" / "optimizer_step.py"), "--quick", "--rounds", "2", "--steps", "2",
           "--output", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "opt_quick.json").read_text())
    assert result["steps_each"] == 4 and set(result["median_step_s"]) == {"loop", "fused"}
    assert 0 <= result["max_relative_parameter_difference"] < 1e-5 and result["speedup_fused"] > 0
    assert "| fused |" in (tmp_path / "opt_quick.md").read_text()
