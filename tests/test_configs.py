"""The shipped configs load and validate through the real loaders (a renamed key or a bad value fails here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conditune.experiment.config import load_experiment_config
from conditune.training.config import load_train_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_speech_demo_config_validates():
    cfg = load_train_config(CONFIGS / "speech_demo.yaml")
    cfg.validate()
    assert cfg.model.adaptor.ctc_compress and cfg.model.adaptor.ctc_readout == "embeddings"
    assert cfg.train.align_steps > 0 and cfg.train.ctc_weight > 0


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("experiment_*.yaml")))
def test_experiment_configs_validate(name, tmp_path):
    # the held-out text lives under data/ (made by `conditune data synth`), absent on a fresh clone
    heldout = {}
    for lang in ("en", "de"):
        heldout[lang] = str(tmp_path / f"heldout.{lang}.txt")
        Path(heldout[lang]).write_text("Ein Satz.\n", encoding="utf-8")
    cfg = load_experiment_config(CONFIGS / name, {"experiment.heldout_text": heldout})
    assert len(cfg.experiment.arms) == 8 and cfg.experiment.count >= 1
