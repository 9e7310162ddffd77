"""The spectral scanner: accuracy, sources, records, cache/resume, distributed merge, errors."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conditune.cli import main
from conditune.scanning import analyse_matrix, open_source, read_records, scan_source, write_records
from conditune.scanning.records import parse_name
from conditune.scanning.scanner import assign_work
from conditune.scanning.sources import TensorInfo
from conditune.scanning.spectrum_torch import analyse_matrix_torch
from conditune.theory.quantities import entropy_bits, kappa_random
from fixtures import save_tiny_llama, write_tiny_gguf

ACCURACY = 1e-6  # kappa within 1e-6 relative of a float64 LAPACK SVD (issue #16)


def prescribed(shape, kappa, seed=0, profile="geometric"):
    """W = U diag(s) V^T with random orthonormal U, V and sigma from 1 down to 1/kappa."""
    rng = np.random.default_rng(seed)
    m, n = shape
    k = min(m, n)
    u = np.linalg.qr(rng.standard_normal((m, k)))[0]
    v = np.linalg.qr(rng.standard_normal((n, k)))[0]
    if profile == "geometric":
        s = np.geomspace(1.0, 1.0 / kappa, k)
    else:  # a realistic shape: a few outliers, a flat bulk, a dense lower edge
        s = np.concatenate([np.geomspace(1.0, 0.2, 8), np.linspace(0.1, 1.0 / kappa, k - 8)])
    return (u * s) @ v.T


def reference(matrix: torch.Tensor):
    s = np.linalg.svd(matrix.double().numpy(), compute_uv=False)
    return s[0] / s[-1], float(np.sum(np.log2(s)))


def check_against_reference(result, w):
    ref_kappa, ref_volume = reference(w)
    error = abs(result.kappa - ref_kappa) / ref_kappa
    assert error < ACCURACY, (result.method, error)
    assert error <= result.kappa_rel_err  # the reported bound holds
    # the log-volume comes from the route's factor: a float32 Gram ("gram32") carries float32
    # rounding into it (measured up to 1.2e-6 relative, BLAS-dependent); float64 factors: 1e-6
    volume_tol = 1e-5 if result.method.startswith("gram32") else 1e-6
    assert abs(result.log2_volume - ref_volume) < volume_tol * abs(ref_volume) + 1e-6, result.method


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(480, 480), (1000, 400), (400, 880)])
@pytest.mark.parametrize("kappa", [3.0, 1e2, 1e4, 1e6, 1e8])
def test_kappa_matches_float64_svd(dtype, shape, kappa):
    w = torch.from_numpy(prescribed(shape, kappa, profile="realistic" if kappa > 10 else "geometric")).to(dtype)
    for result in (analyse_matrix(w), analyse_matrix_torch(w, device="cpu")):
        check_against_reference(result, w)


def test_methods_cover_the_precision_ladder():
    # well-conditioned rectangular: the float32 Gram suffices; tall and wide take the same route
    tall = analyse_matrix(torch.from_numpy(prescribed((1000, 400), 3.0)))
    wide = analyse_matrix(torch.from_numpy(prescribed((1000, 400), 3.0)).T)
    assert tall.method == wide.method == "gram32+lanczos"
    assert wide.kappa == pytest.approx(tall.kappa, rel=1e-9)
    # rectangular with kappa ~1e3: float32 rounding of the Gram matrix is too coarse, float64 is not
    assert analyse_matrix(torch.from_numpy(prescribed((1000, 400), 1e3, profile="realistic"))).method.startswith(
        "gram64+lanczos"
    )
    # square and ill-conditioned: an LU of the matrix itself, which does not square kappa
    square = analyse_matrix(torch.from_numpy(prescribed((480, 480), 1e7)))
    assert square.method.startswith("lu64-shift-invert")
    # rectangular with kappa beyond the float64 Gram matrix: Householder QR
    assert analyse_matrix(torch.from_numpy(prescribed((1000, 400), 1e8))).method.startswith("qr64-shift-invert")
    assert analyse_matrix(torch.randn(100, 300)).method == "svd"  # small: exact SVD is cheapest
    assert tall.flops32 == pytest.approx(1000 * 400**2 + 400**3 / 3) and tall.flops64 == 0


@pytest.mark.parametrize("shape", [(1000, 400), (400, 1000), (480, 480)])
def test_rank_deficient_falls_back_to_svd(shape):
    rng = np.random.default_rng(3)
    low = rng.standard_normal((shape[0], 300)) @ rng.standard_normal((300, shape[1]))
    result = analyse_matrix(torch.from_numpy(low))
    assert result.method == "svd" and result.rank == 300
    s = np.linalg.svd(low, compute_uv=False)
    assert result.kappa == pytest.approx(s[0] / s[299], rel=1e-9)


def test_chunked_matrix_equals_whole(monkeypatch):
    from conditune.scanning.matrix import MatrixProblem, MatrixView

    for w in (torch.from_numpy(prescribed((1500, 400), 50.0)).float(), torch.from_numpy(prescribed((400, 1500), 3e3))):
        whole = analyse_matrix(w)
        with monkeypatch.context() as patch:
            patch.setattr(MatrixView, "KEEP_BYTES", 0)
            patch.setattr(MatrixView, "CHUNK_BYTES", 8 * 400 * 128)  # 128-row chunks
            chunked = analyse_matrix(w)
            bad = w.clone()
            bad[-1, -1] = float("nan")  # in the last chunk
            with pytest.raises(MatrixProblem, match="1 NaN/Inf"):
                MatrixView(bad).frobenius()
        # the same route (whether refinement steps ran can differ with the rounding of the chunked sums)
        assert chunked.method.removesuffix("+davidson") == whole.method.removesuffix("+davidson")
        # both are within their own error bounds of the truth, so within the sum of each other
        assert abs(chunked.kappa - whole.kappa) <= (chunked.kappa_rel_err + whole.kappa_rel_err) * whole.kappa
        check_against_reference(chunked, w)


def test_small_matrices_analysed_together_match_one_at_a_time():
    from conditune.scanning.spectrum import MatrixProblem, analyse_matrices

    shapes = [(576, 576), (1536, 576), (576, 1536), (192, 576)] * 2
    mats = [
        torch.from_numpy(prescribed(s, 10.0 ** (1 + i % 4), seed=i, profile="realistic")).float()
        for i, s in enumerate(shapes)
    ]
    mats.append(torch.zeros(500, 400))
    together = analyse_matrices(mats, workers=2)
    assert isinstance(together[-1], MatrixProblem) and together[-1].reason == "all zero"
    for w, result in zip(mats[:-1], together[:-1]):
        alone = analyse_matrix(w)
        assert result.method == alone.method
        assert result.kappa == pytest.approx(alone.kappa, rel=1e-12)
        check_against_reference(result, w)


def test_full_spectrum_and_rank_deficiency():
    w = torch.from_numpy(prescribed((300, 200), 10.0))
    full = analyse_matrix(w, full_spectrum=True)
    assert full.singular_values is not None and len(full.singular_values) == 200
    low_rank = torch.randn(300, 40, dtype=torch.float64) @ torch.randn(40, 500, dtype=torch.float64)
    record = scan_source(torch.nn.Linear(500, 300, bias=False).requires_grad_(False), cache=False)[0][0]
    assert record.status == "ok"
    from conditune.scanning.scanner import analyse_record

    info = TensorInfo("x.weight", (300, 500), "float64")
    flagged = analyse_record("x.weight", low_rank, info, False, "cpu")
    assert flagged.status == "flagged" and "rank 40 of 300" in flagged.reason
    assert flagged.rank == 40 and flagged.sigma_min > 1e-6  # smallest NON-zero singular value


@pytest.mark.parametrize("bad, reason", [(float("nan"), "NaN/Inf"), (float("inf"), "NaN/Inf"), (0.0, "all zero")])
def test_bad_matrices_are_flagged(bad, reason):
    module = torch.nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        module.weight.fill_(bad) if bad == 0.0 else module.weight.__setitem__((0, 0), bad)
    record = scan_source(module, cache=False)[0][0]
    assert record.status == "flagged" and reason in record.reason


def test_record_fields_and_derived_quantities(tmp_path):
    records, meta = scan_source(save_tiny_llama(tmp_path / "m"), cache=False)
    by_name = {r.name: r for r in records}
    q = by_name["model.layers.1.self_attn.q_proj.weight"]
    assert (q.layer, q.kind, q.shape, q.dtype, q.numel) == (1, "self_attn.q_proj", (32, 32), "f32", 1024)
    s = np.linalg.svd(
        torch.nn.Parameter(open_source(tmp_path / "m").load(q.name)).detach().double().numpy(), compute_uv=False
    )
    assert q.kappa == pytest.approx(s[0] / s[-1], rel=1e-9)
    assert q.entropy_bits == pytest.approx(entropy_bits(float(np.sum(np.log2(s))), 32), rel=1e-9)
    assert q.kappa_mp == pytest.approx(kappa_random((32, 32)))
    assert q.kappa_norm == pytest.approx(q.kappa / q.kappa_mp)
    assert q.stable_rank == pytest.approx(float(np.sum(s**2) / s[0] ** 2), rel=1e-9)
    norm = by_name["model.norm.weight"]
    assert norm.status == "skipped" and norm.kappa is None
    assert meta["fingerprint"] and meta["records"] == len(records)


def test_parse_name():
    assert parse_name("model.layers.12.self_attn.q_proj.weight") == (12, "self_attn.q_proj")
    assert parse_name("model.embed_tokens.weight") == (None, "embed_tokens")
    assert parse_name("lm_head.weight") == (None, "lm_head")
    assert parse_name("model.layers.3.mlp.experts.gate_up_proj[5]") == (3, "mlp.experts.gate_up_proj")
    assert parse_name("encoder.blocks.0.attn.query.weight") == (0, "attn.query")


@pytest.mark.parametrize("suffix", [".csv", ".json", ".parquet"])
def test_records_round_trip(tmp_path, suffix):
    records, meta = scan_source(save_tiny_llama(tmp_path / "m"), cache=False)
    path = write_records(records, tmp_path / f"scan{suffix}", meta)
    back, back_meta = read_records(path)
    assert [r.to_row() for r in back] == [r.to_row() for r in records]
    assert back_meta["fingerprint"] == meta["fingerprint"]
    if suffix == ".csv":
        header = path.read_text().splitlines()[0].split(",")
        for column in ["name", "shape", "dtype", "status", "reason", "sigma_max", "sigma_min", "kappa", "log2_volume"]:
            assert column in header
        assert "32x32" in path.read_text()


# ----------------------------------------------------------------------------------------------
# sources


def _expected(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "hf")
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir)
    return model_dir, model, {n: p.detach() for n, p in model.named_parameters()}


def test_all_source_formats_give_the_same_records(tmp_path):
    model_dir, model, params = _expected(tmp_path)
    # sharded safetensors folder with an index
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    single = tmp_path / "single.safetensors"
    save_file({n: p.contiguous() for n, p in params.items()}, single)
    state_dict = tmp_path / "model.pt"
    torch.save({"state_dict": {n: p.clone() for n, p in params.items()}}, state_dict)
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    torch.save({n: p.clone() for n, p in params.items()}, bin_folder / "pytorch_model.bin")

    baseline = {r.name: r.kappa for r in scan_source(model_dir, cache=False)[0]}
    for source in (sharded, single, state_dict, bin_folder, model):
        got = {r.name: r.kappa for r in scan_source(source, cache=False)[0]}
        assert got.keys() == baseline.keys(), source
        for name, kappa in baseline.items():
            assert got[name] == pytest.approx(kappa, rel=1e-12, nan_ok=True) if kappa else got[name] is None


def test_gguf_source_uses_transformers_names_and_values(tmp_path):
    from transformers import AutoModelForCausalLM

    write_tiny_gguf(tmp_path / "tiny.gguf", quant="Q8_0")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    loaded = model.state_dict()
    source = open_source(tmp_path / "tiny.gguf")
    names = [i.name for i in source.infos()]
    assert set(names) == {n for n, _ in model.named_parameters()}
    for name in names:  # dequantised and un-permuted exactly as transformers does it
        assert torch.equal(source.load(name), loaded[name]), name
    records = scan_source(tmp_path / "tiny.gguf", cache=False)[0]
    q = next(r for r in records if r.name == "model.layers.0.self_attn.q_proj.weight")
    assert q.dtype == "Q8_0" and q.status == "ok"


def test_three_d_tensors_are_sliced_and_convs_reshaped():
    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.randn(3, 16, 8))
            self.conv1 = torch.nn.Conv1d(4, 6, 3)

    records = scan_source(Experts(), cache=False)[0]
    names = [r.name for r in records]
    assert names[:3] == ["gate_up_proj[0]", "gate_up_proj[1]", "gate_up_proj[2]"]
    conv = next(r for r in records if r.name == "conv1.weight")
    assert conv.shape == (6, 12) and conv.status == "ok"
    assert next(r for r in records if r.name == "conv1.bias").status == "skipped"


class Pickled:
    """Any non-tensor object in a state dict needs full unpickling, which scan refuses."""


def test_state_dict_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.randn(3, 3), "obj": Pickled()}, path)
    assert main(["scan", str(path), "--no-cache", "-q"]) == 1


# ----------------------------------------------------------------------------------------------
# errors: one line, exit code 1


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


@pytest.mark.parametrize(
    "case", ["missing", "truncated", "corrupt_header", "empty_dir", "bad_gguf_quant", "bad_suffix", "not_gguf"]
)
def test_errors_are_one_line_with_exit_1(tmp_path, capsys, case):
    if case == "missing":
        target = tmp_path / "nope"
    elif case == "truncated":
        target = tmp_path / "t.safetensors"
        save_file({"w": torch.randn(64, 64)}, target)
        _truncate(target, target.stat().st_size - 100)
    elif case == "corrupt_header":
        target = tmp_path / "c.safetensors"
        target.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}")
    elif case == "empty_dir":
        target = tmp_path / "empty"
        target.mkdir()
        (target / "config.json").write_text("{}")
    elif case == "bad_gguf_quant":
        target = tmp_path / "bad.gguf"
        write_tiny_gguf(target, raw_quant="Q8_1")
    elif case == "bad_suffix":
        target = tmp_path / "weights.npz"
        target.write_bytes(b"x")
    else:
        target = tmp_path / "junk.gguf"
        target.write_bytes(b"GARBAGE" * 10)
    code = main(["scan", str(target), "--no-cache", "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    assert target.name in err


def test_bad_output_suffix_and_cli_writes_plot(tmp_path, capsys):
    model_dir = save_tiny_llama(tmp_path / "m")
    assert main(["scan", str(model_dir), "-o", str(tmp_path / "x.txt"), "-q"]) == 1
    out = tmp_path / "scan.csv"
    assert main(["scan", str(model_dir), "-o", str(out), "--plot", str(tmp_path / "k.png"), "--no-cache"]) == 0
    assert out.is_file() and (tmp_path / "k.png").stat().st_size > 1000
    assert "self_attn.q_proj" in capsys.readouterr().err  # the summary table


def test_full_spectrum_file(tmp_path):
    from safetensors.torch import load_file

    model_dir = save_tiny_llama(tmp_path / "m")
    out = tmp_path / "scan.json"
    assert main(["scan", str(model_dir), "-o", str(out), "--spectrum", "full", "--no-cache", "-q"]) == 0
    spectra = load_file(tmp_path / "scan.spectra.safetensors")
    records, _ = read_records(out)
    q = next(r for r in records if r.name == "model.layers.0.self_attn.q_proj.weight")
    s = spectra[q.name].numpy()
    assert len(s) == 32 and s[0] / s[-1] == pytest.approx(q.kappa, rel=1e-12)
    assert q.effective_rank is not None and 1 < q.effective_rank <= 32


# ----------------------------------------------------------------------------------------------
# cache and resume


def test_cache_reuse_and_fingerprint_isolation(tmp_path):
    cache = tmp_path / "cache"
    a = save_tiny_llama(tmp_path / "a", seed=0)
    b = save_tiny_llama(tmp_path / "b", seed=1)
    first, meta1 = scan_source(a, cache_folder=cache)
    again, meta2 = scan_source(a, cache_folder=cache)
    assert meta1["computed"] > 0 and meta2["computed"] == 0
    assert [r.to_row() for r in first] == [r.to_row() for r in again]
    other, meta3 = scan_source(b, cache_folder=cache)  # a different checkpoint: nothing reused
    assert meta3["computed"] == meta1["computed"] and meta3["fingerprint"] != meta1["fingerprint"]
    assert {r.name: r.kappa for r in other} != {r.name: r.kappa for r in first}
    full, meta4 = scan_source(a, cache_folder=cache, spectrum="full")  # other options: own cache
    assert meta4["computed"] == meta1["computed"]


def test_killed_scan_resumes(tmp_path):
    """A scan killed mid-way keeps its finished records; the rerun computes only the rest."""
    folder = tmp_path / "big"
    folder.mkdir()
    tensors = {
        f"model.layers.{i}.mlp.down_proj.weight": torch.from_numpy(prescribed((700, 650), 1e3, seed=i)).float()
        for i in range(12)
    }
    save_file(tensors, folder / "model.safetensors")
    cache = tmp_path / "cache"
    env = {**os.environ, "CONDITUNE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    script = f"from conditune.scanning import scan_source; scan_source({str(folder)!r}, cache_folder={str(cache)!r})"
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        lines = sum(len(p.read_text().splitlines()) for p in cache.glob("*.jsonl")) if cache.exists() else 0
        if lines >= 3 or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = sum(len(p.read_text().splitlines()) for p in cache.glob("*.jsonl"))
    assert 0 < done_before < 12, "the scan should have been killed part-way"
    records, meta = scan_source(folder, cache_folder=cache)
    assert meta["reused_from_cache"] >= done_before - 1 and meta["computed"] <= 12 - done_before + 1
    fresh, _ = scan_source(folder, cache=False)
    assert [r.kappa for r in records] == pytest.approx([r.kappa for r in fresh], rel=1e-12)


# ----------------------------------------------------------------------------------------------
# distributed


def test_assign_work_balances_and_covers():
    infos = [TensorInfo(f"t{i}", (100 * (i + 1), 100), "f32") for i in range(7)]
    shares = assign_work(infos, 3)
    assert sorted(i.name for share in shares for i in share) == sorted(i.name for i in infos)
    assert all(share for share in shares)


def test_torchrun_two_processes_merge(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "m")
    out = tmp_path / "dist.csv"
    env = {**os.environ, "CONDITUNE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    with socket.socket() as probe:  # a free port: parallel runs must not collide
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        "--master_addr=127.0.0.1",
        "-m",
        "conditune",
        "scan",
        str(model_dir),
        "-o",
        str(out),
        "-q",
        "--device",
        "cpu",
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    merged, meta = read_records(out)
    single, _ = scan_source(model_dir, cache=False)
    assert [r.name for r in merged] == [r.name for r in single]
    assert [r.kappa for r in merged if r.kappa] == pytest.approx([r.kappa for r in single if r.kappa], rel=1e-12)
    assert [r.status for r in merged] == [r.status for r in single]
    assert meta["world_size"] == 2


@pytest.mark.slow
def test_real_smollm2_scan():
    records, meta = scan_source("demo:smollm2", cache=False)
    ok = [r for r in records if r.status == "ok"]
    assert len(ok) == 211 and max(r.kappa for r in ok) > 1e5
    lowest = sorted(ok, key=lambda r: r.kappa)[:100]
    assert all(r.kind not in {"self_attn.q_proj", "self_attn.o_proj"} for r in lowest)
    sample = next(r for r in ok if r.kind == "self_attn.q_proj")
    ref, _ = reference(open_source("demo:smollm2").load(sample.name))
    assert abs(sample.kappa - ref) / ref < ACCURACY
    assert math.isfinite(sample.entropy_bits)


def test_cli_progress_bar_goes_to_stderr_and_reaches_the_end(tmp_path, capsys):
    model_dir = save_tiny_llama(tmp_path / "m")
    assert main(["scan", str(model_dir), "-o", str(tmp_path / "scan.csv"), "--no-cache"]) == 0
    captured = capsys.readouterr()
    assert "100.0%" in captured.err and "scan" in captured.err  # the bar, finished, on stderr
    assert "%" not in captured.out  # stdout stays clean for results
