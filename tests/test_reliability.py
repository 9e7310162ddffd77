"""The library side of the error contract: output paths, value checks, checkpoint integrity records,
long audio read in part, and the speech-activity check (real files in tmp_path, no mocks)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conditune.data.audio import AudioError, load_audio, load_audio_segment, speech_activity
from conditune.errors import CondituneError
from conditune.integrity import (
    MANIFEST_NAME,
    IntegrityError,
    latest_intact,
    manifest_problem,
    verify_manifest,
    write_manifest,
)
from conditune.io import OutputPathError, atomic_write_text, check_writable, ensure_folder, read_text_file
from conditune.validation import (
    InvalidValueError,
    require_choice,
    require_device,
    require_finite,
    require_int,
    require_positive,
    require_range,
)

SR = 16000

# ---------------------------------------------------------------------------------------------- io


def test_atomic_write_names_the_path_for_every_obstacle(tmp_path):
    (tmp_path / "file").write_text("x")
    folder = tmp_path / "folder"
    folder.mkdir()
    cases = {
        folder: "it is a folder",
        tmp_path / "file" / "out.txt": f"{tmp_path / 'file'} is a file",
        tmp_path / "file" / "a" / "b" / "out.txt": f"{tmp_path / 'file'} is a file",
    }
    for path, reason in cases.items():
        with pytest.raises(OutputPathError) as err:
            atomic_write_text(path, "data")
        assert reason in str(err.value) and "\n" not in str(err.value)
    assert (tmp_path / "file").read_text() == "x" and not list(tmp_path.rglob("*.tmp"))


def test_atomic_write_keeps_other_errors_and_the_old_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(FileNotFoundError):  # a file the caller reads is not an output problem
        from conditune.io import atomic_write

        with atomic_write(target) as handle:
            handle.write("new")
            open(tmp_path / "missing")  # noqa: SIM115
    assert target.read_text() == "old" and not list(tmp_path.glob(".*.tmp"))


def test_check_writable(tmp_path):
    (tmp_path / "file").write_text("x")
    assert check_writable(tmp_path / "new" / "deeper" / "out.csv") == tmp_path / "new" / "deeper" / "out.csv"
    assert not (tmp_path / "new").exists()  # creates nothing
    check_writable(tmp_path / "file")  # an existing file is replaced: fine
    check_writable(tmp_path / "run", folder=True)
    with pytest.raises(OutputPathError, match="it is a file, not a folder"):
        check_writable(tmp_path / "file", folder=True)
    with pytest.raises(OutputPathError, match="it is a folder, not a file"):
        check_writable(tmp_path, folder=False)
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        check_writable(tmp_path / "file" / "x" / "y.txt")
    with pytest.raises(OutputPathError, match="MiB needed"):
        check_writable(tmp_path / "big.bin", min_free_bytes=shutil.disk_usage(tmp_path).free + 2**40)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".conditune-probe")]


def test_ensure_folder(tmp_path):
    assert ensure_folder(tmp_path / "a" / "b").is_dir()
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputPathError, match=r"cannot create the cache folder .*f/c: .*f is a file"):
        ensure_folder(tmp_path / "f" / "c", what="cache folder")


def test_read_text_file(tmp_path):
    good = tmp_path / "c.yaml"
    good.write_bytes("\ufeffa: 1\n".encode())
    assert read_text_file(good, what="config") == "a: 1\n"
    png = tmp_path / "c.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nrest")
    latin = tmp_path / "l.yaml"
    latin.write_bytes(b"a: 1\nb: caf\xe9\n")
    for path, message in [
        (png, "is a PNG image"),
        (tmp_path, "is a folder"),
        (tmp_path / "none.yaml", "not found"),
        (latin, "l.yaml:2: not UTF-8"),
    ]:
        with pytest.raises(CondituneError, match=message):
            read_text_file(path, what="config")


def test_conditune_home_must_be_a_folder(tmp_path, monkeypatch):
    from conditune.models import conditune_home

    monkeypatch.setenv("CONDITUNE_HOME", str(tmp_path / "not-yet"))
    assert conditune_home() == tmp_path / "not-yet"  # creatable: fine
    (tmp_path / "f").write_text("x")
    monkeypatch.setenv("CONDITUNE_HOME", str(tmp_path / "f"))
    with pytest.raises(CondituneError, match=r"from \$CONDITUNE_HOME\) is not a folder"):
        conditune_home()
    monkeypatch.setenv("CONDITUNE_HOME", str(tmp_path / "f" / "sub"))
    with pytest.raises(CondituneError, match="is a file"):
        conditune_home()


# ---------------------------------------------------------------------------------------------- validation


def test_validation_helpers_name_the_key():
    assert require_positive(0.5, "train.lr") == 0.5
    assert require_positive(0, "x", allow_zero=True) == 0
    assert require_int(3.0, "train.max_steps", minimum=1) == 3
    assert require_range(1.0, "p", low=0, high=1) == 1.0
    assert require_choice("fast", "--spectrum", ["fast", "full"]) == "fast"
    assert require_finite(np.float32(2.0), "x") == 2.0
    bad = [
        (lambda: require_positive(-1, "train.lr"), "train.lr must be a positive number, got -1"),
        (lambda: require_positive(float("nan"), "--minutes"), "--minutes must be a finite number, got nan"),
        (lambda: require_positive(math.inf, "--minutes"), "--minutes must be a finite number, got inf"),
        (lambda: require_int(2.5, "train.max_steps"), "train.max_steps must be a whole number, got 2.5"),
        (lambda: require_int(0, "--batch-size", minimum=1), "--batch-size must be a whole number >= 1, got 0"),
        (lambda: require_int(True, "--beams"), "--beams must be a number, got True"),
        (lambda: require_int("3", "--beams"), "--beams must be a number, got '3'"),
        (lambda: require_range(1.5, "p", low=0, high=1, high_open=True), "p must be in [0, 1), got 1.5"),
        (lambda: require_range(0, "p", low=0, low_open=True), "p must be > 0, got 0"),
        (lambda: require_choice("x", "--score", ["kappa"]), "--score must be one of kappa, got 'x'"),
    ]
    for call, message in bad:
        with pytest.raises(InvalidValueError) as err:
            call()
        assert str(err.value) == message


def test_require_device():
    assert require_device("auto") == "auto"
    assert require_device(" CPU ") == "cpu"
    for value in ("bogus", "cpu:x", "mps", "", 3):
        with pytest.raises(InvalidValueError, match="--device must be auto, cpu, cuda or cuda:N"):
            require_device(value)
    with pytest.raises(InvalidValueError, match="cpu, cuda or cuda:N"):
        require_device("auto", allow_auto=False)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(CondituneError, match="no CUDA device"):
            require_device("cuda:0")


# ---------------------------------------------------------------------------------------------- integrity


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "checkpoint-20"
    folder.mkdir()
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, folder / "adaptor.safetensors")
    (folder / "state.json").write_text(json.dumps({"step": 20}))
    (folder / "sub").mkdir()
    (folder / "sub" / "opt.bin").write_bytes(os.urandom(5000))
    write_manifest(folder)
    return folder


def test_integrity_record_of_an_intact_checkpoint(checkpoint):
    record = json.loads((checkpoint / MANIFEST_NAME).read_text())
    assert sorted(record["files"]) == ["adaptor.safetensors", "state.json", "sub/opt.bin"]
    assert record["files"]["state.json"]["size"] == (checkpoint / "state.json").stat().st_size
    verify_manifest(checkpoint)
    assert manifest_problem(checkpoint) is None


def _flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncate", "flip-in-float", "flip-in-header", "delete", "append"])
def test_integrity_names_the_damaged_file(checkpoint, damage):
    target = checkpoint / "adaptor.safetensors"
    size = target.stat().st_size
    if damage == "truncate":
        with open(target, "r+b") as handle:
            handle.truncate(size // 2)
        expected = "truncated"
    elif damage == "flip-in-float":  # still loads, as another float: only the hash sees it
        _flip_bit(target, size - 100)
        expected = "sha256 differs"
    elif damage == "flip-in-header":
        _flip_bit(target, 20)
        expected = "sha256 differs"
    elif damage == "delete":
        target.unlink()
        expected = "missing"
    else:
        with open(target, "ab") as handle:
            handle.write(b"\0")
        expected = "longer than recorded"
    with pytest.raises(IntegrityError) as err:
        verify_manifest(checkpoint)
    message = str(err.value)
    assert message.startswith(str(target)) and expected in message and "\n" not in message
    assert err.value.path == target


def test_integrity_sizes_only_is_cheap_but_misses_flips(checkpoint):
    _flip_bit(checkpoint / "sub" / "opt.bin", 10)
    assert manifest_problem(checkpoint, hashes=False) is None
    assert "opt.bin" in manifest_problem(checkpoint)


def test_integrity_missing_or_damaged_record(checkpoint, tmp_path):
    (checkpoint / MANIFEST_NAME).write_text("{half")
    assert "damaged integrity record" in manifest_problem(checkpoint)
    (checkpoint / MANIFEST_NAME).unlink()
    assert "integrity.json: missing" in manifest_problem(checkpoint)
    assert manifest_problem(checkpoint, missing_ok=True) is None
    assert "not found" in manifest_problem(tmp_path / "nowhere")


def test_latest_intact_falls_back_to_the_previous_checkpoint(checkpoint, tmp_path):
    newer = tmp_path / "checkpoint-40"
    shutil.copytree(checkpoint, newer)
    with open(newer / "adaptor.safetensors", "r+b") as handle:
        handle.truncate(100)
    half_saved = tmp_path / "checkpoint-60"  # killed before its record was written
    half_saved.mkdir()
    (half_saved / "state.json").write_text("{}")
    found, skipped = latest_intact([half_saved, newer, checkpoint])
    assert found == checkpoint
    assert [folder for folder, _ in skipped] == [half_saved, newer]
    assert "truncated" in skipped[1][1]
    assert latest_intact([newer]) == (None, [(newer, skipped[1][1])])


def test_write_manifest_of_named_files_only(tmp_path):
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    write_manifest(tmp_path, ["a", tmp_path / "b"])
    (tmp_path / "scratch").write_text("not recorded")
    verify_manifest(tmp_path)
    with pytest.raises(CondituneError, match="not a file"):
        write_manifest(tmp_path, ["nope"])


# ---------------------------------------------------------------------------------------------- long audio


def test_long_audio_is_read_only_as_far_as_used(tmp_path):
    path = tmp_path / "long.wav"
    rng = np.random.default_rng(0)
    sf.write(path, (0.1 * rng.standard_normal(SR * 120)).astype(np.float32), SR, subtype="PCM_16")  # 2 minutes
    segment = load_audio_segment(path, max_seconds=30)
    assert segment.truncated and segment.seconds == 30.0 and segment.file_seconds == 120.0
    whole = load_audio(path)
    assert np.array_equal(segment.wave, whole[: 30 * SR])
    assert load_audio(path, max_seconds=30).size == 30 * SR


def test_short_audio_is_not_truncated(tmp_path):
    path = tmp_path / "short.wav"
    sf.write(path, np.zeros(22050, np.float32), 22050)  # 1 s at another rate
    segment = load_audio_segment(path, max_seconds=30)
    assert not segment.truncated and segment.seconds == 1.0 and segment.file_seconds == 1.0
    assert not load_audio_segment(path, max_seconds=1.0).truncated  # exactly the window
    assert load_audio_segment(path, max_seconds=0.5).truncated
    for bad in (0, -1, float("nan")):
        with pytest.raises(AudioError, match="max_seconds"):
            load_audio_segment(path, max_seconds=bad)


# ---------------------------------------------------------------------------------------------- speech activity


def _espeak(tmp_path: Path, text: str) -> np.ndarray:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    path = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, timeout=60)
    return load_audio(path)


def test_speech_is_active(tmp_path):
    speech = _espeak(tmp_path, "The quick brown fox jumps over the lazy dog.")
    activity = speech_activity(speech)
    assert activity.has_speech and activity.active_fraction > 0.5
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(speech.size).astype(np.float32)
    noise *= np.sqrt((speech**2).mean() / (noise**2).mean() / 10)  # 10 dB SNR
    assert speech_activity(speech + noise).has_speech
    padded = np.concatenate([np.zeros(SR * 30, np.float32), speech, np.zeros(SR * 30, np.float32)])
    assert speech_activity(padded).has_speech  # a little speech in a long, quiet file


def test_silence_and_steady_noise_are_not_speech():
    rng = np.random.default_rng(0)
    t = np.arange(SR * 3) / SR
    pink = np.fft.irfft(np.fft.rfft(rng.standard_normal(t.size)) / np.sqrt(np.arange(1, t.size // 2 + 2)))
    cases = {
        "silence": np.zeros(t.size),
        "dither": 1e-4 * rng.standard_normal(t.size),
        "white noise": 0.1 * rng.standard_normal(t.size),
        "loud clipped noise": np.clip(0.5 * rng.standard_normal(t.size), -1, 1),
        "pink noise": 0.3 * pink / np.abs(pink).max(),
        "mains hum": 0.3 * np.sin(2 * np.pi * 50 * t),
        "steady tone": 0.4 * np.sin(2 * np.pi * 330 * t),
        "too short": np.zeros(10),
    }
    for name, wave in cases.items():
        activity = speech_activity(wave.astype(np.float32))
        assert not activity.has_speech, (name, activity)
    assert speech_activity(np.zeros(SR)).describe().startswith("silent")
    assert speech_activity(cases["white noise"]).describe().startswith("no speech detected")
