"""The demo's planner: from measured speeds to data size and steps that fit the budget."""

from __future__ import annotations

import pytest

from conditune.recipes.demo_plan import Speeds, evaluation_reserve, plan_budget

SPEEDS = Speeds(synth_s=0.02, encode_s=0.04, align_step_s=0.1, main_step_s=1.2, build_s=20.0, generate_s=0.5,
                reference_s=0.2, forgetting_s=0.1, agreement_s=3.0)  # fmt: skip
SETTINGS = dict(languages=2, batch=8, test=100, heldout_voice=100, dev=20, evaluations=4, heldout_texts=100,
                prompts=10, reference=True, align_share=0.3, main_epochs=1.0, max_train_per_language=20000)  # fmt: skip


def _spent(plan, speeds=SPEEDS, **kw) -> float:
    s = {**SETTINGS, **kw}
    utts = s["languages"] * (plan.train_per_language + s["test"] + s["heldout_voice"] + s["dev"])
    return (
        utts * (speeds.synth_s + speeds.encode_s)
        + plan.align_steps * speeds.align_step_s
        + plan.main_steps * speeds.main_step_s
        + speeds.build_s
        + s["evaluations"] * s["languages"] * s["dev"] * speeds.generate_s
        + plan.reserve_seconds
    )


def test_the_plan_fits_the_budget_and_spends_it():
    plan = plan_budget(1500.0, SPEEDS, **SETTINGS)
    assert 0.97 * 1500 <= _spent(plan) <= 1500 + 1e-6
    # the main steps read the training set once; the alignment stage has its share of the training time
    assert plan.main_steps * 8 == pytest.approx(2 * plan.train_per_language, rel=0.01)
    share = plan.align_steps * 0.1 / (plan.align_steps * 0.1 + plan.main_steps * 1.2)
    assert share == pytest.approx(0.3, abs=0.01)
    assert plan.reserve_seconds == pytest.approx(
        evaluation_reserve(
            SPEEDS, languages=2, test=100, heldout_voice=100, heldout_texts=100, prompts=10, reference=True
        )
    )


def test_a_faster_machine_or_a_bigger_budget_gets_more_data_not_more_passes():
    slow, fast = (
        plan_budget(1500.0, SPEEDS, **SETTINGS),
        plan_budget(1500.0, Speeds(**{**SPEEDS.to_dict(), "main_step_s": 0.4}), **SETTINGS),
    )
    assert fast.train_per_language > 1.5 * slow.train_per_language and fast.main_steps > 1.5 * slow.main_steps
    longer = plan_budget(3000.0, SPEEDS, **SETTINGS)
    assert longer.train_per_language > 2 * slow.train_per_language


def test_capped_data_trains_longer_and_too_little_time_is_none():
    capped = plan_budget(3000.0, SPEEDS, **{**SETTINGS, "max_train_per_language": 500})
    assert capped.train_per_language == 500 and _spent(capped, max_train_per_language=500) == pytest.approx(
        3000, rel=0.01
    )
    assert capped.main_steps * 8 > 2 * 500  # more than one pass when the pool is small
    assert plan_budget(200.0, SPEEDS, **SETTINGS) is None


def test_training_may_use_the_time_the_data_stage_left_but_not_the_evaluation_reserve(tmp_path):
    from conditune.recipes.demo import budget_overrides, load_demo_config

    cfg = load_demo_config()
    plan = plan_budget(1500.0, SPEEDS, **SETTINGS)
    kw = dict(speech={"train": tmp_path / "t.jsonl", "dev": tmp_path / "d.jsonl"}, names_file=tmp_path / "n.txt",
              plan=plan, output=tmp_path)  # fmt: skip
    assert budget_overrides(cfg, **kw)["training.max_seconds"] == plan.train_seconds
    faster = budget_overrides(cfg, **kw, seconds_left=plan.train_seconds + plan.reserve_seconds + 300)
    assert faster["training.max_seconds"] == int(plan.train_seconds + 300)  # the data stage was 5 min quicker
    late = budget_overrides(cfg, **kw, seconds_left=plan.reserve_seconds + 10)
    assert late["training.max_seconds"] == 60  # a minute at least, whatever is left
    assert faster["training.max_steps"] == plan.main_steps and faster["training.align_steps"] == plan.align_steps
