"""The peer arms: Spectrum's SNR score and selection, PiSSA and OSF matched in parameter count (computed from the
scan's shapes == counted on the built model), and PiSSA / OSF models saved and loaded back to exactly what trained."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conditune.cli import main
from conditune.errors import CondituneError
from conditune.selection import read_names, select, spectrum_snr
from fixtures import build_speech_model, make_tiny_llm, make_tiny_whisper

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("arms")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONDITUNE_HOME", str(root / "home"))  # the scan cache goes here
        yield {"root": root, "whisper": make_tiny_whisper(root / "whisper"), "llm": make_tiny_llm(root / "llm")}


def _spectrum_reference(weight: torch.Tensor) -> float:
    """Spectrum's compute_snr, written out from its published algorithm (torch.svdvals, torch.quantile)."""
    s = torch.linalg.svdvals(weight.double())
    sigma = (torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / 1.349
    m, n = weight.shape
    edge = sigma * (1 + math.sqrt(min(m, n) / max(m, n)))
    signal, noise = s[s > edge].sum(), s[s <= edge].sum()
    return float(signal / noise / s[0])


def test_spectrum_snr_by_hand_and_against_spectrum():
    # S = 10, 5 and six 1s (8 x 8): q25 = 1, q75 = 1 + 0.25 * (5 - 1) = 2, sigma = 1/1.349, edge = 2 sigma = 1.4826;
    # signal 10 + 5, noise 6: snr = 2.5, stored as 2.5 / 10
    assert spectrum_snr([10, 5, 1, 1, 1, 1, 1, 1], (8, 8)) == pytest.approx(0.25, rel=1e-12)
    assert spectrum_snr([10, 5, 1, 1, 1, 1, 1, 1], (8, 32)) == pytest.approx(0.25, rel=1e-12)  # edge 1.11: same split
    # equal values: IQR 0, edge 0, all signal (9); no noise, where Spectrum takes 1: snr 9, stored as 9 / 3
    assert spectrum_snr([3.0, 3.0, 3.0], (3, 3)) == pytest.approx(3.0)
    gen = torch.Generator().manual_seed(0)
    for shape in ((24, 24), (16, 40), (40, 12)):
        w = torch.randn(shape, generator=gen, dtype=torch.float64)
        w[:, :3] += 4 * torch.randn(shape[0], 1, generator=gen, dtype=torch.float64)  # a few strong directions
        s = torch.linalg.svdvals(w).numpy()
        assert spectrum_snr(s, shape) == pytest.approx(_spectrum_reference(w), rel=1e-9), shape


def test_snr_selection_needs_the_full_spectrum(assets, tmp_path, capsys):
    from conditune.scanning import scan_source, write_records

    fast, _ = scan_source(str(assets["llm"]), cache=False)
    with pytest.raises(CondituneError, match="--spectrum full"):
        select(fast, "highest", count=4, score="snr", per_kind=True)
    full, meta = scan_source(str(assets["llm"]), spectrum="full", cache=False)
    sel = select(full, "highest", count=7, score="snr", per_kind=True, exclude=["embed|lm_head"])
    kinds = {c.kind for c in sel.chosen}
    assert len(sel.names) == 7 and len(kinds) == 7  # 7 projection kinds × 2 layers: one of each kind
    for c in sel.chosen:  # the higher-SNR tensor of its kind
        rival = next(r for r in full if r.kind == c.kind and r.name != c.name and r.status == "ok")
        mine = next(r for r in full if r.name == c.name)
        assert c.score == spectrum_snr(mine.extra["singular_values"], mine.matrix_shape)
        assert c.score >= spectrum_snr(rival.extra["singular_values"], rival.matrix_shape)
    # the CLI on a full-spectrum scan file (singular values beside it), and one line without them
    scan = tmp_path / "scan.csv"
    assert main(["scan", str(assets["llm"]), "--spectrum", "full", "-o", str(scan), "--no-cache", "-q"]) == 0
    names = tmp_path / "names.txt"
    assert main(["select", str(scan), "--score", "snr", "--policy", "highest", "--per-kind", "-n", "7",
                 "--exclude", "embed|lm_head", "-o", str(names)]) == 0  # fmt: skip
    assert read_names(names) == sel.names
    write_records(fast, tmp_path / "fast.csv", meta)
    capsys.readouterr()
    assert main(["select", str(tmp_path / "fast.csv"), "--score", "snr"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--spectrum full" in err and "\n" not in err


def _plans(assets, arms, **extra):
    from conditune.experiment.arms import load_scan, needs_full_spectrum, plan_arms
    from conditune.experiment.config import load_experiment_config

    model = {"encoder": {"backend": "hf", "path": str(assets["whisper"])}, "llm": {"path": str(assets["llm"])},
             "adaptor": {"subsample": 4, "depth": 1, "heads": 4}}  # fmt: skip
    cfg = load_experiment_config({"model": model, "data": {"train": "unused.jsonl"},
                                  "experiment": {"arms": arms, "count": 4, **extra}})  # fmt: skip
    records, meta = load_scan(cfg)
    full = load_scan(cfg, spectrum="full")[0] if needs_full_spectrum(cfg) else None
    return cfg, plan_arms(cfg, records, seed=0, meta=meta, full_records=full)


@pytest.mark.parametrize("count", [4, 2])
def test_pissa_and_osf_match_lowest_kappa_and_the_built_model(assets, count):
    from conditune.config import to_dict

    cfg, plans = _plans(assets, ["lowest-kappa", "lora", "pissa", "osf", "spectrum"], count=count)
    target = plans["lowest-kappa"].llm_params
    for arm in ("lora", "pissa", "osf"):
        assert abs(plans[arm].llm_params / target - 1) <= 0.05, (arm, plans[arm].llm_params, target)
    assert plans["pissa"].trainable["lora"]["init"] == "pissa_niter_4"
    assert plans["osf"].trainable["mode"] == "osf"
    assert plans["spectrum"].trainable["mode"] == "names" and len(plans["spectrum"].names) == count
    base = to_dict(cfg.model)
    for arm in ("pissa", "osf", "spectrum"):  # counts from shapes == counts of the built model
        model, _ = build_speech_model({**base, "trainable": plans[arm].trainable})
        built = sum(p.numel() for p in model.llm.parameters() if p.requires_grad)
        assert built == plans[arm].llm_params, (arm, built, plans[arm].llm_params)


def test_pissa_caps_ranks_at_the_smaller_side(assets):
    # count 4 matches LoRA at r = 20 on every projection; PiSSA cannot take 20 singular triples of a 16 x 32 k_proj
    cfg, plans = _plans(assets, ["lowest-kappa", "lora", "pissa"], count=4)
    lora, pissa = plans["lora"].trainable["lora"], plans["pissa"].trainable["lora"]
    assert lora["r"] > 16 and pissa["rank_pattern"] and max(pissa["rank_pattern"].values()) <= 32
    assert all(v == 16 for k, v in pissa["rank_pattern"].items() if "k_proj" in k or "v_proj" in k)


def test_unknown_lora_init_and_bad_osf_rank_are_one_line(assets):
    from conditune.speech.configuration import SpeechLLMConfig

    base = {"encoder": {"path": "x"}, "llm": {"path": str(assets["llm"])}}
    with pytest.raises(CondituneError, match="model.trainable.lora.init"):
        SpeechLLMConfig.from_dict({**base, "trainable": {"mode": "lora", "lora": {"init": "eva"}}}).validate()
    with pytest.raises(CondituneError, match="model.trainable.osf.effective_rank"):
        SpeechLLMConfig.from_dict({**base, "trainable": {"mode": "osf", "osf": {"effective_rank": -2}}}).validate()


@pytest.mark.parametrize(
    "trainable",
    [
        {
            "mode": "lora",
            "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "down_proj"], "init": "pissa_niter_4"},
        },
        {"mode": "osf", "osf": {"effective_rank": 20, "target_modules": ["q_proj", "down_proj"]}},
    ],
    ids=["pissa", "osf"],
)
def test_saved_model_reloads_to_exactly_what_trained(assets, tmp_path, trainable):
    """The delta holds only the adapter tensors; the rest (PiSSA's residual base weights, OSF's frozen subspace) is
    rebuilt on load and must be bit-identical, or the reloaded model is not the trained one."""
    from conditune.speech.modeling import SpeechLLM

    cfg = {"encoder": {"backend": "hf", "path": str(assets["whisper"])}, "llm": {"path": str(assets["llm"])},
           "adaptor": {"subsample": 4, "depth": 1, "heads": 4}, "trainable": trainable}  # fmt: skip
    before = torch.random.get_rng_state()
    model, _ = build_speech_model(cfg)
    assert not torch.equal(before, torch.random.get_rng_state())  # the adaptor drew from the RNG ...
    torch.random.set_rng_state(before)
    again, _ = build_speech_model(cfg)
    assert torch.equal(model.adaptor.proj.weight, again.adaptor.proj.weight)  # ... the same as in any other mode
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # "training": move every trainable LLM tensor
        for p in model.llm.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(tmp_path / "m")
    loaded = SpeechLLM.from_pretrained(tmp_path / "m")
    trained, reloaded = model.llm.state_dict(), loaded.llm.state_dict()
    assert trained.keys() == reloaded.keys()
    assert all(torch.equal(trained[k], reloaded[k]) for k in trained), [
        k for k in trained if not torch.equal(trained[k], reloaded[k])
    ][:3]
    ids = torch.randint(0, 50, (2, 9), generator=gen)
    assert torch.equal(model.core_llm(input_ids=ids).logits, loaded.core_llm(input_ids=ids).logits)
    if trainable["mode"] == "lora":  # PiSSA rewrote the base weight: residual + B A starts where the base was
        fresh, _ = build_speech_model(cfg)
        plain = build_speech_model({**cfg, "trainable": {"mode": "none"}})[0]
        diff = (fresh.core_llm(input_ids=ids).logits - plain.core_llm(input_ids=ids).logits).abs().max()
        assert float(diff) < 1e-4 and not np.isnan(float(diff))
