"""Selection policies, output formats, the `select` command and apply_selection on a tiny Llama."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

from conditune.cli import main
from conditune.errors import CondituneError
from conditune.scanning.records import TensorRecord, read_records, write_records
from conditune.selection import (
    apply_selection,
    parse_params,
    peft_targets,
    read_names,
    select,
    trainable_parameters,
    write_selection,
)
from fixtures import batch, load_tiny_llama, save_tiny_llama

L0, L1 = "model.layers.0.", "model.layers.1."
# name -> (shape, status, kappa, kappa_norm). Names and shapes are those of the tiny Llama (untied).
SCAN = {
    "model.embed_tokens.weight": ((128, 32), "ok", 3.0, 9.0),
    L0 + "self_attn.q_proj.weight": ((32, 32), "ok", 10.0, 1.0),
    L0 + "self_attn.k_proj.weight": ((16, 32), "ok", 2.0, 5.0),
    L0 + "self_attn.v_proj.weight": ((16, 32), "ok", 1.5, 6.0),
    L0 + "self_attn.o_proj.weight": ((32, 32), "ok", 20.0, 2.0),
    L0 + "mlp.gate_proj.weight": ((64, 32), "ok", 4.0, 7.0),
    L0 + "mlp.up_proj.weight": ((64, 32), "ok", 4.0, 8.0),  # ties gate_proj: name order decides
    L0 + "mlp.down_proj.weight": ((32, 64), "flagged", 0.5, 0.1),  # lowest of all, never selected
    L0 + "input_layernorm.weight": ((32,), "skipped", 0.01, 0.01),  # 1-D: counted in size only
    L0 + "post_attention_layernorm.weight": ((32,), "skipped", None, None),
    L1 + "self_attn.q_proj.weight": ((32, 32), "ok", 12.0, 3.0),
    L1 + "self_attn.k_proj.weight": ((16, 32), "ok", 2.5, 10.0),
    L1 + "self_attn.v_proj.weight": ((16, 32), "ok", 30.0, 11.0),
    L1 + "self_attn.o_proj.weight": ((32, 32), "ok", 25.0, 12.0),
    L1 + "mlp.gate_proj.weight": ((64, 32), "ok", 6.0, 13.0),
    L1 + "mlp.up_proj.weight": ((64, 32), "ok", 7.0, 14.0),
    L1 + "mlp.down_proj.weight": ((32, 64), "ok", 8.0, 4.0),
    L1 + "input_layernorm.weight": ((32,), "skipped", None, None),
    L1 + "post_attention_layernorm.weight": ((32,), "skipped", None, None),
    "model.norm.weight": ((32,), "skipped", None, None),
    "lm_head.weight": ((128, 32), "ok", 40.0, 15.0),
}
MODEL_PARAMS = 26784  # sum of all numel above
V0, K0, K1 = L0 + "self_attn.v_proj.weight", L0 + "self_attn.k_proj.weight", L1 + "self_attn.k_proj.weight"
EMBED, GATE0, UP0 = "model.embed_tokens.weight", L0 + "mlp.gate_proj.weight", L0 + "mlp.up_proj.weight"
NEVER = {L0 + "mlp.down_proj.weight", L0 + "input_layernorm.weight"} | {n for n, v in SCAN.items() if v[1] == "skipped"}


def make_records(spec: dict) -> list[TensorRecord]:
    records = []
    for name, (shape, status, kappa, kappa_norm) in spec.items():
        numel = 1
        for d in shape:
            numel *= d
        records.append(
            TensorRecord(
                name=name,
                shape=shape,
                dtype="float32",
                numel=numel,
                status=status,
                kappa=kappa,
                kappa_norm=kappa_norm,
                log2_volume=None if kappa is None else -kappa,
            )
        )
    return records


@pytest.fixture(scope="module")
def scan_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("scan") / "scan.csv"
    write_records(make_records(SCAN), path, meta={"fingerprint": "abc123", "source": "tiny-llama"})
    return path


@pytest.fixture(scope="module")
def scan(scan_csv):
    return read_records(scan_csv)  # through the file, as the CLI does


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama") / "untied", tie=False)


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama") / "tied", tie=True)


# ---------------------------------------------------------------------------------------------- policies


def names(scan, policy="lowest", **kw):
    records, meta = scan
    return select(records, policy, meta=meta, **kw).names


def test_lowest_count_skips_flagged_and_skipped(scan):
    assert names(scan, count=3) == [V0, K0, K1]
    assert names(scan, count=6) == [V0, K0, K1, EMBED, GATE0, UP0]  # equal kappa: by name
    assert not NEVER & set(names(scan, count=100))
    assert len(names(scan, count=100)) == 15  # all ok tensors


def test_highest_and_threshold(scan):
    assert names(scan, "highest", count=2) == ["lm_head.weight", L1 + "self_attn.v_proj.weight"]
    assert names(scan, "threshold", threshold=2.5) == [V0, K0, K1]  # <= is inclusive
    assert names(scan, "threshold", threshold=4.0, count=4) == [V0, K0, K1, EMBED]


def test_random_is_seeded(scan):
    first = names(scan, "random", count=5, seed=1)
    assert first == names(scan, "random", count=5, seed=1)
    assert len({tuple(names(scan, "random", count=5, seed=s)) for s in range(5)}) > 1
    assert not NEVER & set(names(scan, "random", count=100, seed=3))


def test_budget_fraction_and_params(scan):
    records, meta = scan
    sel = select(records, budget=0.05)  # 1339 of 26784: 512 + 512 fit, then nothing smaller than 315 is left
    assert sel.model_params == MODEL_PARAMS
    assert sel.names == [V0, K0]
    assert names(scan, params="2K") == [V0, K0, K1]
    assert names(scan, params="1.5K") == [V0, K0]
    # 5000: the 4096 embedding would overflow after 3 x 512 and is skipped; smaller tensors further down still fit
    assert names(scan, params=5000) == [V0, K0, K1, GATE0, L0 + "self_attn.q_proj.weight"]


def test_per_kind_shares_count(scan):
    # 15 candidates in 9 kinds; 8 tensors: one per two-tensor kind (6), and the 2 leftovers go to the
    # one-tensor kinds (largest remainder) whose tensor ranks best: embed (3.0), down_proj (8.0), not lm_head (40)
    expected = [
        V0,
        K0,
        EMBED,
        GATE0,
        UP0,
        L1 + "mlp.down_proj.weight",
        L0 + "self_attn.q_proj.weight",
        L0 + "self_attn.o_proj.weight",
    ]
    assert names(scan, count=8, per_kind=True) == expected
    # fewer tensors than kinds: larger kinds first (remainder 0.4 > 0.2), then the best-ranked among them
    assert names(scan, count=3, per_kind=True) == [V0, K0, GATE0]


def test_score_kappa_norm(scan):
    expected = [L0 + "self_attn.q_proj.weight", L0 + "self_attn.o_proj.weight", L1 + "self_attn.q_proj.weight"]
    assert names(scan, count=3, score="kappa_norm") == expected


def test_include_exclude(scan):
    assert names(scan, count=2, include=["mlp"]) == [GATE0, UP0]
    assert names(scan, count=2, exclude=[r"layers\.0\."]) == [K1, EMBED]
    assert names(scan, count=2, exclude=[r"layers\.0\.", "embed"]) == [K1, L1 + "mlp.gate_proj.weight"]


def test_fused_slices_map_to_one_parameter():
    base = "model.layers.0.mlp.experts.gate_up_proj"
    spec = {
        f"{base}[0]": ((64, 32), "ok", 5.0, 1.0),
        f"{base}[1]": ((64, 32), "flagged", 1.0, 1.0),
        f"{base}[2]": ((64, 32), "ok", 2.0, 1.0),
        "a.weight": ((8, 8), "ok", 3.0, 1.0),
    }
    sel = select(make_records(spec), count=1)
    (fused,) = sel.chosen
    assert (fused.name, fused.score, fused.slices, fused.numel) == (base, 2.0, (0, 2), 3 * 64 * 32)
    assert select(make_records(spec), count=5).names == [base, "a.weight"]
    assert peft_targets(select(make_records(spec), count=5)) == {"target_modules": ["a"], "target_parameters": [base]}


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"count": 0}, "--count"),
        ({"count": 3, "budget": 0.1}, "only one"),
        ({"budget": 1.5}, "--budget"),
        ({"policy": "best"}, "unknown policy"),
        ({"score": "entropy"}, "unknown score"),
        ({"score": "snr"}, "--spectrum full"),  # a known score, but this scan has no singular values
        ({"policy": "threshold"}, "--threshold"),
        ({"include": ["("]}, "regular expression"),
        ({"params": "12Q"}, "parameter count"),
        ({"params": "10"}, "no tensor fits"),
    ],
)
def test_bad_options(scan, kw, message):
    records, _ = scan
    with pytest.raises(CondituneError, match=message):
        select(records, kw.pop("policy", "lowest"), **kw)


def test_parse_params():
    assert [parse_params(t) for t in ("20M", "1.5k", "2B", "300", 7)] == [20_000_000, 1500, 2_000_000_000, 300, 7]


# ---------------------------------------------------------------------------------------------- formats


def test_formats_round_trip(scan, tmp_path):
    records, meta = scan
    sel = select(records, count=5, meta=meta)
    for filename, fmt in (("n.txt", None), ("n.json", None), ("n.yaml", None), ("n.peft.json", "peft")):
        write_selection(sel, tmp_path / filename, fmt)
        assert read_names(tmp_path / filename) == sel.names, filename
    text = (tmp_path / "n.txt").read_text()
    assert "# fingerprint: abc123" in text and "# policy: lowest kappa, count 5" in text
    doc = json.loads((tmp_path / "n.json").read_text())
    assert doc["totals"]["parameters"] == sel.selected_params == 512 * 3 + 4096 + 2048
    assert doc["tensors"][0] == {
        "name": V0,
        "kind": "self_attn.v_proj",
        "layer": 0,
        "numel": 512,
        "shape": [16, 32],
        "kappa": 1.5,
    }
    peft = json.loads((tmp_path / "n.peft.json").read_text())
    assert peft == {"target_modules": [n[: -len(".weight")] for n in sel.names], "target_parameters": None}


def test_read_names_rejects_real_regex(tmp_path):
    (tmp_path / "a.yaml").write_text("unfrozen_parameters:\n- ^lm_head.weight$\n- ^model.layers.[0-9]+.mlp.*\n")
    with pytest.raises(CondituneError, match="regex"):
        read_names(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("unfrozen_parameters:\n- ^lm_head.weight$\n")
    assert read_names(tmp_path / "b.yaml") == ["lm_head.weight"]


def test_axolotl_yaml_unfreezes_exactly_the_selection(scan, llama_dir, tmp_path):
    records, meta = scan
    sel = select(records, count=5, meta=meta)
    write_selection(sel, tmp_path / "unfrozen.yaml")
    patterns = yaml.safe_load((tmp_path / "unfrozen.yaml").read_text())["unfrozen_parameters"]
    model = load_tiny_llama(llama_dir)
    unfrozen = [n for n, _ in model.named_parameters() if any(re.match(p, n) for p in patterns)]  # as Axolotl does
    assert sorted(unfrozen) == sorted(sel.names)


def test_peft_target_modules_on_tiny_llama(scan, llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    records, meta = scan
    sel = select(records, count=4, meta=meta)  # includes the embedding
    write_selection(sel, tmp_path / "peft.json", "peft")
    targets = json.loads((tmp_path / "peft.json").read_text())
    config = LoraConfig(r=2, target_modules=targets["target_modules"], target_parameters=targets["target_parameters"])
    peft_model = get_peft_model(load_tiny_llama(llama_dir), config)
    wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == {n.removesuffix(".weight") for n in sel.names}


# ---------------------------------------------------------------------------------------------- apply


def test_gradients_and_optimizer_reach_only_selection(llama_dir):
    model = load_tiny_llama(llama_dir)
    chosen = {V0, K1, "lm_head.weight"}
    report = apply_selection(model, sorted(chosen))
    assert (report.trainable_tensors, report.trainable_parameters) == (3, 512 + 512 + 4096)
    assert report.share == pytest.approx(5120 / MODEL_PARAMS) and "3 of 21 tensors" in str(report)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(**batch()).loss.backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (name in chosen), name
    torch.optim.AdamW(trainable_parameters(model), lr=1e-2).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == chosen


def test_tied_embedding_is_reported_and_counted_once(tied_dir):
    model = load_tiny_llama(tied_dir)
    report = apply_selection(model, ["lm_head.weight"])
    assert model.model.embed_tokens.weight.requires_grad  # the same tensor
    assert (report.trainable_tensors, report.trainable_parameters) == (1, 4096)
    assert len(report.tied) == 1 and "lm_head.weight is tied to model.embed_tokens.weight" in report.tied[0]


def test_prefix_and_unknown_names(llama_dir):
    class SpeechLLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.projector = torch.nn.Linear(4, 32)
            self.llm = load_tiny_llama(llama_dir)

    wrapper = SpeechLLM()
    report = apply_selection(wrapper, [V0, K1], prefix="llm")
    assert sorted(report.trainable) == sorted(["llm." + V0, "llm." + K1])
    assert not wrapper.projector.weight.requires_grad
    with pytest.raises(CondituneError, match=r"prefix='llm'"):
        apply_selection(wrapper, [V0])
    with pytest.raises(CondituneError, match=r"closest: model\.layers\.0\.self_attn\.q_proj\.weight") as info:
        apply_selection(wrapper.llm, ["model.layers.0.self_attn.q_proj.weights"])
    assert "\n" not in str(info.value)
    report = apply_selection(wrapper.llm, [V0, "nope.weight"], strict=False)
    assert report.missing == ["nope.weight"] and report.trainable == [V0]


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_select_writes_files(scan_csv, tmp_path, capsys):
    out = tmp_path / "names.txt"
    assert main(["select", str(scan_csv), "--count", "3", "--output", str(out)]) == 0
    assert read_names(out) == [V0, K0, K1]
    assert "Selected 3 tensors" in capsys.readouterr().err
    assert main(["select", str(scan_csv), "--budget", "0.5", "--per-kind", "-o", str(tmp_path / "u.yml")]) == 0
    assert "unfrozen_parameters:" in (tmp_path / "u.yml").read_text()
    assert main(["select", str(scan_csv), "-n", "2", "--format", "peft", "-o", str(tmp_path / "p.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["target_modules"] == [V0[:-7], K0[:-7]]
    assert main(["select", str(scan_csv), "-n", "2", "--exclude", "layers.0", "--policy", "highest"]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == ["lm_head.weight", L1 + "self_attn.v_proj.weight"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/missing.csv", "--count", "3"], "scan file not found"),
        (["{scan}", "--policy", "best"], "unknown policy"),
        (["{scan}", "--count", "0"], "--count must be"),
        (["{scan}", "--count", "-2"], "--count must be"),
        (["{scan}", "--format", "xml", "-o", "{tmp}/x.xml"], "unknown format"),
    ],
)
def test_cli_select_bad_input(scan_csv, tmp_path, capsys, args, message):
    args = [a.format(scan=scan_csv, tmp=tmp_path) for a in args]
    assert main(["select", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
