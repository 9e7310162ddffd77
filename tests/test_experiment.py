"""``conditune experiment``: identical footing across arms, matched LoRA counts, outputs, resume, errors."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conditune.errors import CondituneError
from fixtures import build_speech_model, make_corpus, make_tiny_llm, make_tiny_whisper, train_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    import os

    root = tmp_path_factory.mktemp("experiment")
    os.environ["CONDITUNE_HOME"] = str(root / "home")  # the scan cache goes here, not into the user's home
    whisper = make_tiny_whisper(root / "whisper")
    llm = make_tiny_llm(root / "llm")
    manifest, _ = make_corpus(root / "data")
    heldout = {}
    for lang, lines in {
        "en": ["good morning to you", "open the window please"],
        "de": ["yes now", "turn right"],
    }.items():
        heldout[lang] = root / "data" / f"heldout_text.{lang}.txt"
        heldout[lang].write_text("\n".join(lines) + "\n")
    return {
        "root": root,
        "whisper": whisper,
        "llm": llm,
        "manifest": manifest,
        "heldout": heldout,
        "cache": root / "features",
    }


def _config(assets, arms, seeds=(0, 1), **train) -> dict:
    model = {
        "encoder": {"backend": "hf", "path": str(assets["whisper"])},
        "llm": {"path": str(assets["llm"])},
        "adaptor": {"subsample": 4, "depth": 1, "heads": 4, "dropout": 0.1},
    }
    data = {
        "train": str(assets["manifest"]),
        "dev": str(assets["manifest"]),
        "max_batch": 2,
        "feature_cache": str(assets["cache"]),
    }
    settings = {"lr": 3e-3, "warmup_steps": 2, "max_steps": 4, "eval_every": 2, "log_every": 1, "progress": False,
                "tensorboard": False, "max_new_tokens": 6, **train}  # fmt: skip
    return {
        **train_config(model, data, **settings),
        "experiment": {
            "arms": list(arms),
            "seeds": list(seeds),
            "count": 4,
            "heldout_text": {k: str(v) for k, v in assets["heldout"].items()},
            "instructions": {"en": ["open the door"], "de": ["good morning"]},
            "agreement_new_tokens": 4,
            "max_tokens": 16,
        },
    }


def _train_records(out, arm, seed):
    path = out / "runs" / arm / f"seed{seed}" / "train" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lora_arms_match_lowest_kappa_count(assets):
    from conditune.config import to_dict
    from conditune.experiment.arms import load_scan, plan_arms
    from conditune.experiment.config import load_experiment_config

    cfg = load_experiment_config(_config(assets, ["lowest-kappa", "lora", "kappa-lora", "random", "highest-kappa"]))
    records, meta = load_scan(cfg)
    plans = plan_arms(cfg, records, seed=0, meta=meta)
    target = plans["lowest-kappa"].llm_params
    assert len(plans["lowest-kappa"].names) == 4 and set(plans["lowest-kappa"].names).isdisjoint(
        plans["highest-kappa"].names
    )
    for arm in ("lora", "kappa-lora"):
        assert abs(plans[arm].llm_params / target - 1) <= 0.05, (arm, plans[arm].llm_params, target)
    assert plans["random"].names != plan_arms(cfg, records, seed=1, meta=meta)["random"].names  # seeded per seed
    base = to_dict(cfg.model)
    for arm in ("lowest-kappa", "lora", "kappa-lora"):  # counts from shapes == counts of the built model
        model, _ = build_speech_model({**base, "trainable": plans[arm].trainable})
        assert sum(p.numel() for p in model.llm.parameters() if p.requires_grad) == plans[arm].llm_params, arm


def test_tiny_experiment_outputs_footing_and_skip(assets, tmp_path):
    from conditune.recipes.experiment import run_experiment

    out = tmp_path / "exp"
    result = run_experiment(_config(assets, ["lowest-kappa", "lora"]), out)
    assert sorted(result["ran"]) == [("lora", 0), ("lora", 1), ("lowest-kappa", 0), ("lowest-kappa", 1)]
    for name in (
        "results.csv",
        "summary.md",
        "wer_over_steps.png",
        "forgetting_over_steps.png",
        "wer_vs_forgetting.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    # identical footing: same batches, learning rates and initial loss (same init) for every arm of a seed
    for seed in (0, 1):
        a, b = _train_records(out, "lowest-kappa", seed), _train_records(out, "lora", seed)
        ta, tb = [r for r in a if r["kind"] == "train"], [r for r in b if r["kind"] == "train"]
        assert [r["data_sha"] for r in ta] == [r["data_sha"] for r in tb]
        assert [r["lr"] for r in ta] == [r["lr"] for r in tb]
        assert [r["llm_lr"] for r in ta] == [r["llm_lr"] for r in tb]
        assert ta[0]["loss"] == pytest.approx(tb[0]["loss"], rel=1e-5)  # LoRA starts as the identity
        assert [r["step"] for r in a if r["kind"] == "eval"] == [r["step"] for r in b if r["kind"] == "eval"] == [2, 4]
    assert (
        _train_records(out, "lowest-kappa", 0)[-2]["data_sha"] != _train_records(out, "lowest-kappa", 1)[-2]["data_sha"]
    )

    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0] == "arm,seed,step,metric,value"
    metrics = {r.split(",")[3] for r in rows[1:]}
    assert {
        "wer_all",
        "wer_en",
        "wer_de",
        "kl_en",
        "ppl_change_de",
        "agreement_en",
        "kl",
        "ppl_change",
        "agreement",
        "trainable_llm_params",
        "wall_s",
    } <= metrics
    summary = (out / "summary.md").read_text()
    assert "| lowest-kappa | 2 |" in summary and "| lora | 2 |" in summary
    assert "batch order identical" in summary and "DIFFERS" not in summary and "paired bootstrap" in summary

    # a re-run retrains nothing; adding an arm trains only that arm
    marks = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed*/done.json")}
    metrics_before = {p: p.read_bytes() for p in out.glob("runs/*/seed*/train/metrics.jsonl")}
    again = run_experiment(_config(assets, ["lowest-kappa", "lora"]), out)
    assert again["ran"] == [] and len(again["skipped"]) == 4
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed*/done.json")} == marks
    assert {p: p.read_bytes() for p in out.glob("runs/*/seed*/train/metrics.jsonl")} == metrics_before
    more = run_experiment(_config(assets, ["lowest-kappa", "lora", "adaptor-only"], seeds=[0]), out)
    assert more["ran"] == [("adaptor-only", 0)]
    first = [r for r in _train_records(out, "adaptor-only", 0) if r["kind"] == "train"]
    assert (
        first[0]["data_sha"]
        == next(r for r in _train_records(out, "lowest-kappa", 0) if r["kind"] == "train")["data_sha"]
    )
    # a different configuration in the same folder is refused
    with pytest.raises(CondituneError, match="another configuration"):
        run_experiment(_config(assets, ["lowest-kappa"], max_steps=6), out)
    # ... and so is a report of it (its summary would name a fingerprint the runs were not made with)
    with pytest.raises(CondituneError, match="another configuration"):
        run_experiment(_config(assets, ["lowest-kappa"], max_steps=6), out, report_only=True)
    assert run_experiment(_config(assets, ["lowest-kappa", "lora"]), out, report_only=True)["ran"] == []


def test_killed_run_resumes_to_the_same_result(assets, tmp_path, monkeypatch):
    import conditune.training.trainer as trainer
    from conditune.recipes.experiment import run_experiment

    ref = tmp_path / "ref"
    run_experiment(_config(assets, ["lowest-kappa"], seeds=[0]), ref)
    real = trainer.train
    monkeypatch.setattr(trainer, "train", lambda *a, **k: real(*a, **{**k, "stop_after_steps": 3}))
    out = tmp_path / "killed"
    with pytest.raises(CondituneError, match="stopped early"):
        run_experiment(_config(assets, ["lowest-kappa"], seeds=[0]), out)
    monkeypatch.setattr(trainer, "train", real)
    logs = []
    result = run_experiment(_config(assets, ["lowest-kappa"], seeds=[0]), out, log=logs.append)
    assert result["ran"] == [("lowest-kappa", 0)] and any("resuming" in m for m in logs)
    a, b = _train_records(ref, "lowest-kappa", 0), _train_records(out, "lowest-kappa", 0)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.get("loss") == pytest.approx(rb.get("loss"), rel=1e-5) if "loss" in ra else True
        assert ra.get("kl") == pytest.approx(rb.get("kl"), rel=1e-4, abs=1e-7) if "kl" in ra else True


def test_bad_config_is_one_line_error(assets, tmp_path, capsys):
    from conditune.cli import main

    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump(_config(assets, ["lowest-kappa"])))
    for override in (
        "experiment.arms=[lowest-kappa,bogus]",
        "experiment.count=0",
        "experiment.seeds=[0,0]",
        "experiment.lora_rank=big",
        "training.max_seconds=60",
        "experiment.colour=red",
    ):
        assert main(["experiment", str(path), "--output", str(tmp_path / "o"), override]) == 1, override
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err, (override, err)
    assert main(["experiment", str(tmp_path / "missing.yaml"), "--output", str(tmp_path / "o")]) == 1


def _mmlu(path):
    rows = [("open the", "door", "window", "morning", "now", "A"), ("good", "morning", "left", "yes", "door", "A"),
            ("turn", "left", "please", "good", "open", "B")]  # fmt: skip
    path.write_text("".join(json.dumps({"question": q, "answer_a": a, "answer_b": b, "answer_c": c, "answer_d": d,
                                        "correct_answer": k, "topic": "t"}) + "\n" for q, a, b, c, d, k in rows))  # fmt: skip
    return path


def test_every_arm_end_to_end_with_shared_alignment_and_long_horizon(assets, tmp_path):
    from conditune.experiment.config import ARMS
    from conditune.experiment.runs import align_dir, long_dir, read_items, run_dir
    from conditune.recipes.experiment import run_experiment

    cfg = _config(assets, list(ARMS), seeds=[0], max_steps=4, align_steps=2, ctc_weight=0.2)
    cfg["experiment"].update(count=4, knowledge_probe=str(_mmlu(tmp_path / "mmlu.jsonl")), knowledge_questions=2,
                             long_horizon={"arms": ["lowest-kappa", "highest-kappa"], "steps_multiplier": 2,
                                           "evaluations": 3})  # fmt: skip
    out = tmp_path / "exp"
    result = run_experiment(cfg, out)
    assert sorted(result["ran"]) == sorted((arm, 0) for arm in ARMS)
    assert sorted(result["ran_long"]) == [("highest-kappa", 0), ("lowest-kappa", 0)]
    shared = json.loads((align_dir(out, 0) / "done.json").read_text())
    assert shared["step"] == 2
    for arm in ARMS:
        folder = run_dir(out, arm, 0)
        records = [json.loads(x) for x in (folder / "train" / "metrics.jsonl").read_text().splitlines()]
        start = next(r for r in records if r["kind"] == "main_start")
        assert start["adaptor_sha"] == shared["adaptor_sha"] and start["step"] == 2, arm  # one alignment stage
        assert next(r["step"] for r in records if r["kind"] == "train") == 3  # its own steps start after it
        done, plan = json.loads((folder / "done.json").read_text()), json.loads((folder / "plan.json").read_text())
        if plan["expected_llm_params"] is not None and arm != "full":
            assert done["result"]["trainable_llm_params"] == plan["expected_llm_params"], arm
        items = read_items(folder / "train" / "eval_items.jsonl")
        assert sorted(items) == [4, 6] and len(items[6]["dev"]) == 4 and len(items[6]["knowledge"]) == 2, arm
        assert set(items[6]["text"]) == {"en", "de"}
    target = json.loads((run_dir(out, "lowest-kappa", 0) / "plan.json").read_text())["expected_llm_params"]
    for arm in ("lora", "kappa-lora", "pissa", "osf"):
        count = json.loads((run_dir(out, arm, 0) / "plan.json").read_text())["expected_llm_params"]
        assert abs(count / target - 1) <= 0.05, arm
    long_evals = [json.loads(x)["step"] for x in (long_dir(out, "lowest-kappa", 0) / "train" / "metrics.jsonl")
                  .read_text().splitlines() if json.loads(x)["kind"] == "eval"]  # fmt: skip
    assert long_evals == [4, 6, 8, 10]  # 2 x 4 main steps, every 8 // 3 = 2 after the 2 alignment steps
    summary = (out / "summary.md").read_text()
    assert f"in all {len(ARMS)} arms" in summary and "## Long horizon" in summary and "knowledge accuracy" in summary
    info = json.loads((out / "experiment.json").read_text())
    assert info["machine"]["cores"] >= 1 and info["first_run_started_at"] and info["fingerprint"]
    assert len(info["machines"]) == 1 and info["machines"][0]["cpu"] == info["machine"]["cpu"]
    assert json.loads((run_dir(out, "lora", 0) / "done.json").read_text())["machine"]["cpu"] == info["machine"]["cpu"]
    assert f"Machine: {info['machine']['cpu']}" in summary  # one machine: one line
    # a re-run trains nothing
    again = run_experiment(cfg, out)
    assert again["ran"] == [] and again["ran_long"] == []
    # a run still to do whose seed's alignment checkpoint is gone (a copy without weights): the stage trains again
    # and is used because it reproduces the recorded adaptor bit for bit ...
    import shutil

    shutil.rmtree(shared["checkpoint"])
    (run_dir(out, "random", 0) / "done.json").unlink()
    assert run_experiment(cfg, out)["ran"] == [("random", 0)]
    again = json.loads((align_dir(out, 0) / "done.json").read_text())
    assert again["adaptor_sha"] == shared["adaptor_sha"] and again["first"]["adaptor_sha"] == shared["adaptor_sha"]
    # ... and refused, with what to do, when it does not (here: a different recorded adaptor)
    shutil.rmtree(again["checkpoint"])
    (align_dir(out, 0) / "done.json").write_text(json.dumps({**again, "adaptor_sha": "0" * 64}))
    (run_dir(out, "random", 0) / "done.json").unlink()
    with pytest.raises(CondituneError, match="trained again, its adaptor .* differs from the one .* remove"):
        run_experiment(cfg, out)
    # ... and refused before training when the stage ran on another CPU (it would not reproduce)
    (align_dir(out, 0) / "done.json").write_text(json.dumps({**again, "machine": {"cpu": "Another CPU 9000"}}))
    shutil.rmtree(again["checkpoint"])
    metrics = align_dir(out, 0) / "train" / "metrics.jsonl"
    before = metrics.read_bytes()
    with pytest.raises(CondituneError, match="ran on Another CPU 9000 and its checkpoint is gone.*finish the seed on"):
        run_experiment(cfg, out)
    assert metrics.read_bytes() == before  # nothing trained


def test_the_committed_experiment_keeps_its_fingerprint():
    # A key added to the recipe must leave a committed folder's fingerprint as it was (ADDED_RECIPE_KEYS), or
    # continuing the folder is refused; one whose default changes the arithmetic must not hide behind that.
    from pathlib import Path

    from conditune.config import load_config
    from conditune.experiment.config import ExperimentConfig
    from conditune.experiment.runs import fingerprint

    info = json.loads((Path(__file__).parents[1] / "results" / "experiment_v2" / "experiment.json").read_text())
    cfg = load_config(ExperimentConfig, info["config"], validate=False)
    assert fingerprint(cfg) == info["fingerprint"] == "054a431cbb479665"
    assert not cfg.optimizer.fused
    fused = load_config(ExperimentConfig, info["config"], {"optimizer.fused": True}, validate=False)
    assert fingerprint(fused) != info["fingerprint"]
