"""The shipped configs load and validate through the real loaders (a renamed key or a bad value fails here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conditune.experiment.config import load_experiment_config
from conditune.recipes import CONFIG_DIR as CONFIGS
from conditune.training.config import load_train_config


def test_speech_demo_config_validates():
    cfg = load_train_config(CONFIGS / "speech_demo.yaml")  # `conditune train` reads the demo's recipe too
    cfg.validate()
    assert cfg.model.ctc.compress and cfg.model.ctc.readout == "embeddings"
    assert cfg.training.align_steps > 0 and cfg.training.ctc_weight > 0
    from conditune.recipes.demo import load_demo_config

    demo = load_demo_config()  # the shipped one by default
    assert demo.demo.minutes == 30 and demo.model == cfg.model and demo.optimizer == cfg.optimizer


def test_the_source_checkout_configs_folder_is_the_shipped_one():
    root = Path(__file__).resolve().parent.parent / "configs"
    assert root.resolve() == CONFIGS.resolve()


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("experiment_*.yaml")))
def test_experiment_configs_validate(name, tmp_path):
    # the held-out text lives under data/ (made by `conditune data synth`), absent on a fresh clone
    heldout = {}
    for lang in ("en", "de"):
        heldout[lang] = str(tmp_path / f"heldout.{lang}.txt")
        Path(heldout[lang]).write_text("Ein Satz.\n", encoding="utf-8")
    cfg = load_experiment_config(CONFIGS / name, {"experiment.heldout_text": heldout})
    assert len(cfg.experiment.arms) == 8 and cfg.experiment.count >= 1
