"""Bad input through the real CLI for the training side: train, transcribe, evaluate, demo, experiment.

The same contract as tests/test_cli_errors.py (docs/errors.md): the exit code, exactly one stderr line
naming the file or key, no traceback, nothing half-written; checked before any model loads where it can be.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fixtures import make_corpus, make_tiny_llm, make_tiny_whisper, model_config, tone, train_config, write_wav
from test_cli_errors import USER_ERROR, assert_nothing_half_written, assert_one_line, conditune


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained run (2 checkpoints) and its config file."""
    from conditune.training.trainer import train

    root = tmp_path_factory.mktemp("cli_train")
    model = model_config(make_tiny_whisper(root / "whisper"), make_tiny_llm(root / "llm"), "all")
    manifest, paths = make_corpus(root / "data")
    data = {"train": str(manifest), "max_batch": 2, "feature_cache": str(root / "features")}
    cfg = train_config(model, data, output_dir=str(root / "run"), max_steps=4, save_every=2, keep_last=3,
                       progress=False, tensorboard=False, max_new_tokens=4)  # fmt: skip
    path = root / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train(cfg)
    return {"root": root, "config": path, "run": root / "run", "manifest": manifest, "paths": paths}


# ---------------------------------------------------------------------------------------------- train


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optimizer.lr=-1", "optimizer.lr"),
        ("training.max_steps=2.5", "training.max_steps"),
        ("training.max_steps=0", "training.max_steps"),
        ("optimizer.lr=.nan", "optimizer.lr"),
        ("data.max_batch=0", "data.max_batch"),
        ("training.mixed_precision=fp8", "training.mixed_precision"),
        ("training.learning_rate=1", "training.learning_rate"),
    ],
)
def test_train_bad_value_names_the_key(trained, override, key, tmp_path):
    result = conditune("train", trained["config"], override, f"output.dir={tmp_path / 'out'}")
    assert_one_line(result, USER_ERROR, key)
    assert not (tmp_path / "out").exists()  # refused before anything was created


def test_train_bad_config_files(tmp_path):
    png = tmp_path / "c.yaml"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    assert_one_line(conditune("train", png), USER_ERROR, str(png), "PNG")
    assert_one_line(conditune("train", tmp_path), USER_ERROR, str(tmp_path), "folder")
    assert_one_line(conditune("train", tmp_path / "none.yaml"), USER_ERROR, "none.yaml", "not found")


def test_train_output_that_is_a_file_is_refused_before_loading(trained, tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("not a folder")
    result = conditune("train", trained["config"], f"output.dir={blocker}")
    assert_one_line(result, USER_ERROR, str(blocker))
    assert blocker.read_text() == "not a folder"


def test_resume_passes_over_a_damaged_checkpoint(trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    shutil.rmtree(run / "final")
    latest = run / "checkpoints" / "step-00000004"
    weights = latest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit in a float weight: loads without complaint unless checked
    weights.write_bytes(bytes(data))
    result = conditune("train", trained["config"], f"output.dir={run}", "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step-00000004 is damaged" in result.stderr and "resuming from an earlier one" in result.stderr
    assert "resumed from" in result.stderr and "step-00000002" in result.stderr
    assert (run / "final" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- transcribe / evaluate


def test_transcribe_damaged_model_names_the_file(trained, tmp_path):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(trained["run"] / "final", model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    result = conditune("transcribe", model, trained["paths"][0])
    assert_one_line(result, USER_ERROR, "model.safetensors")


@pytest.mark.parametrize("command", ["transcribe", "evaluate"])
@pytest.mark.parametrize(("option", "value"), [("--batch-size", "0"), ("--beams", "0"), ("--max-new-tokens", "-1"),
                                               ("--device", "tpu")])  # fmt: skip
def test_transcribe_and_evaluate_bad_options(trained, command, option, value):
    data = trained["paths"][0] if command == "transcribe" else trained["manifest"]
    assert_one_line(conditune(command, trained["run"], data, option, value), USER_ERROR, option)


def test_transcribe_output_that_is_a_folder_is_refused_before_loading(trained, tmp_path):
    result = conditune("transcribe", trained["run"], trained["paths"][0], "-o", tmp_path)
    assert_one_line(result, USER_ERROR, str(tmp_path), "folder")


def test_transcribe_reports_silence_instead_of_decoding_it(trained, tmp_path):
    silent = write_wav(tmp_path / "silence.wav", np.zeros(16000, dtype=np.float32))
    t = np.arange(16000) / 16000
    bursts = (np.sin(2 * np.pi * 4 * t) > 0) * 0.4 * np.sin(2 * np.pi * 220 * t)  # syllable-like on/off sound
    voiced = write_wav(tmp_path / "voiced.wav", bursts.astype(np.float32))
    out = tmp_path / "t.jsonl"
    result = conditune("transcribe", trained["run"], voiced, silent, "-o", out)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[1]["text"] == "" and rows[1]["speech"].startswith("silent")
    assert "1 of 2 files hold no speech" in result.stderr
    assert_nothing_half_written(tmp_path)


def test_evaluate_keeps_names_holding_nan(trained, tmp_path):
    manifest = tmp_path / "baNaNa.jsonl"
    manifest.write_text(trained["manifest"].read_text().replace('"audio": "', '"audio": "'))
    rows = [json.loads(x) for x in trained["manifest"].read_text().splitlines()]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "m.json"
    result = conditune("evaluate", trained["run"], manifest, "-o", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(out.read_text())["manifest"] == str(manifest)


def test_training_skips_audio_longer_than_the_encoder_window(trained, tmp_path):
    """A 40 s file is longer than the 30 s window: skipped and counted, never cut and paired with its transcript."""
    from conditune.training.trainer import train

    long = write_wav(tmp_path / "long.wav", tone(40.0, 300.0, 1))
    rows = [json.loads(x) for x in trained["manifest"].read_text().splitlines()]
    rows.append({"id": "long", "audio": str(long), "text": "a very long recording", "language": "en"})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = yaml.safe_load(trained["config"].read_text())
    cfg["data"]["train"] = str(manifest)
    cfg["output"]["dir"] = str(tmp_path / "run")
    cfg["training"]["max_steps"] = 1
    result = train(cfg)
    assert result.skipped["train_audio_too_long"] == 1 and result.train_utterances == len(rows) - 1


# ---------------------------------------------------------------------------------------------- demo / experiment


@pytest.mark.parametrize("minutes", ["nan", "inf", "-5"])
def test_demo_bad_minutes(minutes, tmp_path):
    result = conditune("demo", "--minutes", minutes, "--output", tmp_path / "d", "--quiet")
    assert_one_line(result, USER_ERROR, "--minutes")
    assert not (tmp_path / "d").exists()


def test_demo_bad_override_names_the_key(tmp_path):
    result = conditune("demo", "optimizer.lr=0", "--output", tmp_path / "d", "--quiet")
    assert_one_line(result, USER_ERROR, "optimizer.lr")


def test_experiment_report_only_on_an_empty_folder_is_an_error(tmp_path):
    from conditune.recipes import config_path

    heldout = tmp_path / "h.txt"
    heldout.write_text("Ein Satz.\n")
    over = [f"experiment.heldout_text.en={heldout}", f"experiment.heldout_text.de={heldout}"]
    result = conditune(
        "experiment", config_path("experiment_small"), *over, "--output", tmp_path / "e", "--report-only"
    )
    assert_one_line(result, USER_ERROR, "no finished run")


def test_a_failed_experiment_does_not_lock_its_folder(trained, tmp_path):
    """The first command fails (N larger than the model has tensors); the corrected one then runs in the folder."""
    cfg = yaml.safe_load(trained["config"].read_text())
    heldout = tmp_path / "h.txt"
    heldout.write_text("open the door\n")
    cfg["experiment"] = {"arms": ["adaptor-only"], "seeds": [0], "count": 10_000, "heldout_text": {"en": str(heldout)},
                         "instructions": {"en": ["hello"]}, "agreement_new_tokens": 2, "max_tokens": 8}  # fmt: skip
    cfg["training"]["max_steps"] = 1
    cfg["evaluation"]["every"] = 1
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "exp"
    failed = conditune("experiment", path, "--output", out, timeout=300)
    # progress lines come first (the scan); the error is one line, the last, with no traceback
    assert failed.returncode == USER_ERROR and "Traceback" not in failed.stderr
    assert failed.stderr.splitlines()[-1].startswith("error:") and "experiment.count" in failed.stderr.splitlines()[-1]
    fixed = conditune("experiment", path, "experiment.count=2", "--output", out, timeout=300)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert (out / "runs" / "adaptor-only" / "seed0" / "done.json").is_file()
    assert Path(out / "experiment.json").is_file()
