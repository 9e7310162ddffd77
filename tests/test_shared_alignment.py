"""One alignment stage shared by many runs: ``fit(stop_at=align_steps)`` + ``training.init_from`` give the losses,
evaluations and starting adaptor of the same run with its own alignment stage, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from conditune.errors import CondituneError
from conditune.training.trainer import train
from fixtures import make_corpus, make_tiny_llm, make_tiny_whisper, model_config, train_config

torch.set_num_threads(1)
ALIGN, MAIN = 3, 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    manifest, _ = make_corpus(root / "data")
    return {
        "whisper": make_tiny_whisper(root / "whisper"),
        "llm": make_tiny_llm(root / "llm"),
        "manifest": manifest,
        "cache": root / "features",
    }


def _config(assets, out, mode, init_from=None, **trainable):
    model = model_config(assets["whisper"], assets["llm"], mode, **trainable)
    model["adaptor"]["dropout"] = 0.1  # dropout draws from the RNG: the restored RNG state must be the right one
    data = {"train": str(assets["manifest"]), "dev": str(assets["manifest"]), "max_batch": 2,
            "feature_cache": str(assets["cache"])}  # fmt: skip
    cfg = train_config(model, data, output_dir=str(out), lr=3e-3, warmup_steps=2, log_every=1, progress=False,
                       tensorboard=False, max_new_tokens=4, max_steps=MAIN, align_steps=ALIGN, eval_every=2,
                       ctc_weight=0.3)  # fmt: skip
    cfg["training"]["init_from"] = str(init_from) if init_from else None
    return cfg


def _records(out, kind):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


ARMS = {
    "names": {"names": ["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"]},
    "lora": {"lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}},
    "osf": {"osf": {"effective_rank": 30, "target_modules": ["q_proj"]}},
}


def test_shared_alignment_stage_is_bit_identical(assets, tmp_path):
    align = train(_config(assets, tmp_path / "align", "none"), stop_at=ALIGN)
    assert align.stopped == "stop_at" and align.step == ALIGN and align.final_dir is None
    checkpoint = tmp_path / "align" / "checkpoints" / f"step-{ALIGN:08d}"
    assert checkpoint.is_dir() and not (tmp_path / "align" / "final").exists()
    starts = set()
    for mode, extra in ARMS.items():
        own = train(_config(assets, tmp_path / f"own-{mode}", mode, **extra))
        shared = train(_config(assets, tmp_path / f"shared-{mode}", mode, init_from=checkpoint, **extra))
        main = [k for k in own.losses if k > ALIGN]
        assert main == sorted(shared.losses) and len(main) == MAIN
        assert [own.losses[k] for k in main] == [shared.losses[k] for k in main], mode  # bit for bit
        assert own.main_start["adaptor_sha"] == shared.main_start["adaptor_sha"], mode
        assert own.main_start["adaptor_optimizer_sha"] == shared.main_start["adaptor_optimizer_sha"], mode
        assert own.data_sha == shared.data_sha and own.main_start["data_sha"] == shared.main_start["data_sha"]
        a, b = _records(tmp_path / f"own-{mode}", "eval"), _records(tmp_path / f"shared-{mode}", "eval")
        assert [r["step"] for r in a] == [r["step"] for r in b] == [ALIGN + 2, ALIGN + 4]
        assert [r["wer_all"] for r in a] == [r["wer_all"] for r in b]
        lr_a = [
            (r["step"], r["lr"], r["llm_lr"]) for r in _records(tmp_path / f"own-{mode}", "train") if r["step"] > ALIGN
        ]
        lr_b = [(r["step"], r["lr"], r["llm_lr"]) for r in _records(tmp_path / f"shared-{mode}", "train")]
        assert lr_a == lr_b
        assert _records(tmp_path / f"shared-{mode}", "main_start")[0]["init_from"] == str(checkpoint)
        starts.add(shared.main_start["adaptor_sha"])
    assert len(starts) == 1  # every mode started its main phase from the same adaptor


def test_init_from_refuses_another_recipe(assets, tmp_path):
    train(_config(assets, tmp_path / "align", "none"), stop_at=ALIGN)
    checkpoint = tmp_path / "align" / "checkpoints" / f"step-{ALIGN:08d}"
    cfg = _config(assets, tmp_path / "other", "all", init_from=checkpoint)
    cfg["optimizer"]["align_lr"] = 1e-4
    with pytest.raises(CondituneError, match="optimizer.align_lr"):
        train(cfg)
    cfg = _config(assets, tmp_path / "other2", "all", init_from=checkpoint)
    cfg["training"]["align_steps"] = ALIGN + 1
    with pytest.raises(CondituneError, match="not at the end of this run's alignment stage"):
        train(cfg)
