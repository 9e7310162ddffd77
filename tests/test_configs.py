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
    overrides = {"experiment.heldout_text": heldout}
    from conditune.config import read_yaml

    if (read_yaml(CONFIGS / name).get("experiment") or {}).get("knowledge_probe"):  # fetched data, absent here too
        probe = tmp_path / "mmlu.jsonl"
        probe.write_text('{"question": "q", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d", '
                         '"correct_answer": "A", "topic": "t"}\n')  # fmt: skip
        overrides["experiment.knowledge_probe"] = str(probe)
    cfg = load_experiment_config(CONFIGS / name, overrides)
    from conditune.experiment.config import ARMS, DEFAULT_ARMS

    assert set(DEFAULT_ARMS) <= set(cfg.experiment.arms) <= set(ARMS) and cfg.experiment.count >= 1


def test_the_v2_config_runs_every_arm_with_the_probes_and_the_long_horizon(tmp_path):
    from conditune.config import read_yaml
    from conditune.experiment.config import ARMS

    e = read_yaml(CONFIGS / "experiment_v2.yaml")["experiment"]
    assert e["arms"] == list(ARMS) and len(e["seeds"]) >= 3 and e["knowledge_probe"] and e["knowledge_questions"] >= 200
    long = e["long_horizon"]  # the part 4: the pair, 2 seeds, 4x the main steps, >= 8 evaluations
    assert long["arms"] == ["lowest-kappa", "highest-kappa"] and len(set(long["seeds"])) == 2
    assert long["steps_multiplier"] == 4 and long["evaluations"] >= 8


def test_the_v2_script_without_an_output_is_one_usage_line():
    import subprocess

    script = Path(__file__).resolve().parents[1] / "scripts" / "experiment_v2.sh"
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and result.stdout == ""
    assert (
        len(result.stderr.strip().splitlines()) == 1 and "usage: bash scripts/experiment_v2.sh OUTPUT" in result.stderr
    )
