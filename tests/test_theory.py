"""conditune.theory: closed forms, the KL estimator, the report and the ``conditune theory`` CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from conditune.cli import main
from conditune.scanning.records import TensorRecord, write_records
from conditune.theory import (
    as_matrix,
    checks,
    estimate_entropy,
    estimate_output_entropy,
    kappa_random,
    kl_entropy_bits,
    matrix_with_spectrum,
    unit_report,
)
from conditune.theory.quantities import LOG2_2PI_E
from conditune.theory.scan_analysis import (
    FAIL,
    PASS,
    check_scan_consistency,
    check_scan_theorem1,
    scan_tensors,
    spearman,
    variance_share,
)

# A KL estimate here is the mean of 10 independent samples minus a calibration mean of 10, so
# (estimate - truth) / stderr is t-distributed with ~18 degrees of freedom: |t| > 4 has probability
# ~0.1%, and the seeds are fixed, so 4 standard errors is a tolerance that only a real error breaks.
Z_TOL = 4.0


def gaussian_entropy_bits(singular_values, sigma_x=1.0):
    s = np.asarray(singular_values, dtype=float)
    return 0.5 * s.size * (LOG2_2PI_E + 2 * math.log2(sigma_x)) + float(np.sum(np.log2(s)))


# ----------------------------------------------------------------------------------------------
# unit_report against closed forms


def test_scaled_orthogonal_matrix_has_kappa_one_and_no_deficit():
    w = 3.0 * matrix_with_spectrum(np.ones(6), (6, 6), np.random.default_rng(0))
    r = unit_report(w)
    assert r.kappa == pytest.approx(1.0, abs=1e-12)
    assert r.entropy_deficit_bits == pytest.approx(0.0, abs=1e-10)
    assert r.log2_volume == pytest.approx(6 * math.log2(3.0))
    assert r.entropy_bits == pytest.approx(gaussian_entropy_bits([3.0] * 6))
    assert (r.rank, r.degenerate, r.image_dim) == (6, False, 6)


def test_diagonal_spectrum_matches_hand_computation():
    w = np.diag([8.0, 2.0, 1.0, 0.5])
    r = unit_report(w, sigma_x=2.0)
    frobenius = math.sqrt(64 + 4 + 1 + 0.25)
    assert r.kappa == 16.0
    assert r.log2_volume == pytest.approx(3.0)  # 3 + 1 + 0 - 1
    assert r.entropy_bits == pytest.approx(2 * (LOG2_2PI_E + 2) + 3.0)  # r/2 log2(2 pi e 4) + 3
    assert r.frobenius == pytest.approx(frobenius)
    assert r.entropy_deficit_bits == pytest.approx(4 * math.log2(frobenius / 2) - 3.0)
    assert r.max_entropy_bits - r.entropy_bits == pytest.approx(r.entropy_deficit_bits)
    assert r.kappa_mp == kappa_random((4, 4)) and r.kappa_norm == pytest.approx(16.0 / r.kappa_mp)
    # the same report from the singular values alone
    assert unit_report([0.5, 8.0, 1.0, 2.0], shape=(4, 4), sigma_x=2.0) == r


def test_wide_matrix_is_not_degenerate():
    r = unit_report(np.array([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    assert (r.rank, r.degenerate, r.kappa) == (2, False, 3.0)


def test_tall_matrix_output_is_degenerate_and_measured_on_its_image():
    r = unit_report(np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    assert (r.shape, r.rank, r.image_dim, r.degenerate) == ((3, 2), 2, 2, True)
    assert r.entropy_bits == pytest.approx(gaussian_entropy_bits([2.0, 1.0]))


def test_rank_deficient_matrix_counts_only_non_zero_singular_values():
    u, v = np.array([1.0, 2.0, 2.0, 0.0]), np.array([0.0, 3.0, 4.0, 0.0])  # |u| = 3, |v| = 5
    r = unit_report(np.outer(u, v))
    assert (r.rank, r.degenerate) == (1, True)
    assert r.kappa == pytest.approx(1.0)
    assert r.sigma_min == pytest.approx(15.0)  # not the ~1e-16 round-off singular values
    assert r.entropy_bits == pytest.approx(0.5 * LOG2_2PI_E + math.log2(15.0))
    assert r.entropy_deficit_bits == pytest.approx(0.0, abs=1e-12)


def test_zero_matrix_has_no_entropy():
    r = unit_report(np.zeros((3, 4)))
    assert r.rank == 0 and math.isnan(r.kappa) and r.entropy_bits == -math.inf


def test_torch_bf16_and_conv_weights():
    w = torch.randn(8, 2, 3, 3, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    r = unit_report(w)
    exact = unit_report(w.float().numpy().reshape(8, 18).astype(np.float64))
    assert r.shape == (8, 18) and r == exact  # bf16 -> float64 is exact, so the reports are identical
    assert as_matrix(torch.eye(3)).dtype == np.float64


@pytest.mark.parametrize(
    "call",
    [
        lambda: unit_report([1.0, 2.0]),  # singular values need a shape
        lambda: unit_report([1.0, 2.0], shape=(3, 3)),  # wrong count
        lambda: unit_report([1.0, -2.0], shape=(2, 2)),
        lambda: unit_report(np.eye(2), sigma_x=0.0),
        lambda: unit_report(np.array([[1.0, np.nan]])),
        lambda: unit_report(np.eye(2), shape=(3, 3)),
    ],
)
def test_bad_input_raises(call):
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize("c", [-2.0, 1e-3, 0.5, 1e3])
def test_scale_invariance_is_exact(c):
    rng = np.random.default_rng(1)
    for w in (rng.standard_normal((7, 4)), matrix_with_spectrum([5.0, 1.0, 0.1, 0.0, 0.0], (5, 6), rng)):
        base, scaled = unit_report(w), unit_report(c * w)
        assert scaled.rank == base.rank
        assert scaled.kappa == pytest.approx(base.kappa, rel=1e-12)
        assert scaled.log2_volume - base.log2_volume == pytest.approx(base.rank * math.log2(abs(c)), abs=1e-9)
        assert scaled.entropy_deficit_bits == pytest.approx(base.entropy_deficit_bits, abs=1e-9)


def test_theorem1_no_spectrum_beats_kappa_one():
    rng = np.random.default_rng(2)
    for r in (2, 5, 32):
        gaps = [checks.entropy_gap_at_frobenius(checks.random_spectrum(rng, r), 3.0) for _ in range(300)]
        assert max(gaps) <= 1e-9
        assert checks.entropy_gap_at_frobenius(np.full(r, 7.0), 3.0) == pytest.approx(0.0, abs=1e-12)
        # strictly below as soon as the spectrum is not flat (equality case of AM-GM)
        assert checks.entropy_gap_at_frobenius(np.r_[1.01, np.ones(r - 1)], 3.0) < -1e-6
    kappa = np.array([1.0, 2.0, 10.0])
    gaps = [checks.entropy_gap_at_frobenius(np.array([k, 1.0]), 1.0) for k in kappa]
    assert gaps == pytest.approx(checks.kappa_gap_bound(kappa), abs=1e-12)  # exact for r = 2


def test_kappa_bounds_the_deficit_for_every_rank():
    rng = np.random.default_rng(11)
    for _ in range(500):
        s = checks.random_spectrum(rng, int(rng.integers(3, 20)))
        kappa = s.max() / s.min()
        assert checks.entropy_gap_at_frobenius(s, 1.0) <= checks.kappa_gap_bound(kappa) + 1e-9
    # attained when the interior sigma^2 sit at the mean of the extremes' squares
    kappa = 5.0
    s = np.sqrt([1.0, (1.0 + kappa**2) / 2, (1.0 + kappa**2) / 2, kappa**2])
    assert checks.entropy_gap_at_frobenius(s, 1.0) == pytest.approx(checks.kappa_gap_bound(kappa), abs=1e-12)


@pytest.mark.parametrize("shape", [(48, 48), (32, 96)])
def test_kappa_random_matches_monte_carlo(shape):
    # kappa_random uses asymptotic spectrum edges; at min side 32-48 their finite-size shift is
    # ~n^(-2/3) ~ 10%, hence 0.15 in log kappa, plus 3 Monte Carlo standard errors.
    mean_log, stderr = checks.monte_carlo_log_kappa(shape, 60, np.random.default_rng(3))
    assert abs(mean_log - math.log(kappa_random(shape))) <= 0.15 + 3 * stderr
    assert kappa_random(shape) == kappa_random(shape[::-1]) and kappa_random((1, 50)) == 1.0


# ----------------------------------------------------------------------------------------------
# Kozachenko-Leonenko estimator


@pytest.mark.parametrize("spectrum", [[2.0], [3.0, 1.0, 0.4], list(np.linspace(1.0, 2.0, 6))])
def test_kl_estimate_matches_gaussian_entropy(spectrum):
    s = np.asarray(spectrum)
    est = estimate_entropy(lambda g: g.standard_normal((3000, s.size)) * s, np.random.default_rng(4))
    assert est.dim == s.size and est.stderr > 0
    assert abs(est.bits - gaussian_entropy_bits(s)) <= Z_TOL * est.stderr


def test_kl_estimate_of_degenerate_output_is_on_the_image():
    w = matrix_with_spectrum([3.0, 0.5], (6, 2), np.random.default_rng(5))
    est = estimate_output_entropy(w, sigma_x=1.5, n_samples=3000, rng=6)
    assert est.dim == 2
    assert abs(est.bits - unit_report(w, sigma_x=1.5).entropy_bits) <= Z_TOL * est.stderr


def test_kl_estimate_rejects_a_wrong_formula():
    # Using sigma_i^2 instead of sigma_i in eq. 6 would be off by sum(log2 sigma) = 3.17 bits here.
    w = matrix_with_spectrum([3.0, 2.0, 1.5], (3, 5), np.random.default_rng(7))
    est = estimate_output_entropy(w, n_samples=3000, rng=8)
    wrong = gaussian_entropy_bits(np.array([3.0, 2.0, 1.5]) ** 2)
    assert abs(est.bits - wrong) > 20 * est.stderr


def test_kl_estimator_scale_equivariance_and_duplicates():
    y = np.random.default_rng(9).standard_normal((500, 3))
    assert kl_entropy_bits(4.0 * y) - kl_entropy_bits(y) == pytest.approx(3 * 2.0, abs=1e-9)
    with pytest.raises(ValueError):
        kl_entropy_bits(np.vstack([y, y]))


def test_entropy_check_fails_when_the_formula_is_wrong(monkeypatch):
    def off_by_a_fifth_of_a_bit(*args, **kwargs):
        report = unit_report(*args, **kwargs)
        return dataclasses.replace(report, entropy_bits=report.entropy_bits + 0.2)

    small = checks.KLSettings(n_samples=1500, repeats=4)
    assert checks.check_entropy_formula(np.random.default_rng(0), small).status == PASS
    monkeypatch.setattr(checks, "unit_report", off_by_a_fifth_of_a_bit)
    assert checks.check_entropy_formula(np.random.default_rng(0), small).status == FAIL


# ----------------------------------------------------------------------------------------------
# scan analysis


def record_from_matrix(name: str, w: np.ndarray) -> TensorRecord:
    r = unit_report(w)
    return TensorRecord(
        name=name,
        shape=r.shape,
        dtype="float32",
        numel=w.size,
        sigma_max=r.sigma_max,
        sigma_min=r.sigma_min,
        kappa=r.kappa,
        log2_volume=r.log2_volume,
        frobenius=r.frobenius,
        rank=r.rank,
        entropy_bits=r.entropy_bits,
        kappa_mp=r.kappa_mp,
        kappa_norm=r.kappa_norm,
    )


def tiny_scan() -> list[TensorRecord]:
    rng = np.random.default_rng(10)
    kinds = {"self_attn.q_proj": (32, 32), "self_attn.k_proj": (8, 32), "mlp.up_proj": (64, 32)}
    return [
        record_from_matrix(
            f"model.layers.{layer}.{kind}.weight", rng.standard_normal(shape) * rng.uniform(0.2, 2, shape[1])
        )
        for layer in range(2)
        for kind, shape in kinds.items()
    ]


def test_scan_checks_pass_on_consistent_records_and_fail_on_broken_ones():
    records = tiny_scan()
    tensors = scan_tensors(records)
    assert len(tensors) == 6 and {t.kind for t in tensors} == {"self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj"}
    assert check_scan_theorem1(tensors).status == PASS
    assert check_scan_consistency(records).status == PASS

    broken = dataclasses.replace(records[0], log2_volume=records[0].log2_volume + 50.0, kappa=records[0].kappa * 1.1)
    assert check_scan_theorem1(scan_tensors([broken])).status == FAIL  # more volume than the norm allows
    assert check_scan_consistency([broken]).status == FAIL  # kappa != sigma_max / sigma_min, entropy != eq. 6


def test_variance_share_and_spearman():
    values = np.array([1.0, 1.2, 5.0, 5.2])
    # total sum of squares 16.04 around the mean 3.1; group means 1.1 and 5.1 explain 2 * 2^2 + 2 * 2^2 = 16
    assert variance_share(values, ["a", "a", "b", "b"]) == pytest.approx(16 / 16.04)
    assert variance_share(np.array([1.0, 2.0, 1.0, 2.0]), ["a", "a", "b", "b"]) == 0.0
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([10.0, 30.0, 20.0])) == pytest.approx(0.5)
    assert spearman(np.array([1.0, 2.0, 3.0]), np.ones(3)) is None


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_theory_writes_report(tmp_path):
    scan = write_records(tiny_scan(), tmp_path / "scan.csv", meta={"model": "tiny"})
    out = tmp_path / "report"
    assert main(["theory", "--output", str(out), "--scan", str(scan), "--seed", "0"]) == 0
    text = (out / "theory.md").read_text()
    assert "Overall: **PASS**" in text and "## 5. Scanned model" in text and "Spearman" in text
    data = json.loads((out / "theory.json").read_text())
    assert data["status"] == "PASS" and data["scan"]["shape_bias"]["tensors"] == 6
    assert {c["key"] for c in data["checks"]} == {"entropy_formula", "scale_invariance", "theorem1", "kappa_random"}
    for name in data["figures"].values():
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert len(data["figures"]) == 5


def test_cli_theory_missing_scan_file_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["theory", "--output", str(out), "--scan", str(tmp_path / "missing.csv")]) == 1
    err = capsys.readouterr().err.strip()
    assert "missing.csv" in err and "not found" in err and "\n" not in err
    assert not (out / "theory.md").exists()
