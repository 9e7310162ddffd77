"""The spectral fast path in torch, for CUDA (any torch device works; tests run it on the CPU).

On a GPU a dense symmetric eigensolver on the float64 Gram matrix is cheap, so this path uses
``eigh`` instead of Lanczos; the Rayleigh-quotient refinement from A itself and the QR fallback are
those of the CPU path (see :mod:`conditune.scanning.spectrum`).
"""

from __future__ import annotations

import math

import torch

from conditune.scanning.spectrum import (
    GRAM_REL_ERR_LIMIT,
    SMALL_SIDE,
    MatrixProblem,
    Spectrum,
    backward_error_bound,
    spectrum_from_singular_values,
)


def analyse_matrix_torch(matrix, *, full_spectrum: bool = False, device: str = "cuda") -> Spectrum:
    t = matrix if isinstance(matrix, torch.Tensor) else torch.as_tensor(matrix)
    a = t.detach().to(device=device, dtype=torch.float64)
    if a.dim() != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(a.shape)}")
    if a.shape[0] < a.shape[1]:
        a = a.T
    m, n = a.shape
    frob = float(torch.linalg.norm(a))
    if not math.isfinite(frob):
        raise MatrixProblem(f"{int((~torch.isfinite(a)).sum())} NaN/Inf values")
    if frob == 0.0:
        raise MatrixProblem("all zero")

    def svd(keep: bool = False) -> Spectrum:
        s = torch.linalg.svdvals(a).cpu().numpy()
        return spectrum_from_singular_values(s, (m, n), frob, "svd", keep=keep)

    if full_spectrum or n <= SMALL_SIDE:
        return svd(keep=full_spectrum)
    gram = a.T @ a
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        return svd()
    evals, evecs = torch.linalg.eigh(gram)
    lam_min, lam_max = float(evals[0]), float(evals[-1])
    u, v = evecs[:, -1], evecs[:, 0]
    sigma_max, sigma_min = float(torch.linalg.norm(a @ u)), float(torch.linalg.norm(a @ v))
    if lam_min <= 0:
        return svd()
    drift = abs(sigma_max - math.sqrt(lam_max)) / sigma_max + abs(sigma_min - math.sqrt(lam_min)) / sigma_min
    log2_vol = float(torch.log2(torch.diagonal(chol)).sum())
    method = "gram-eigh"
    if drift > GRAM_REL_ERR_LIMIT:
        r = torch.linalg.qr(a, mode="r").R
        s = torch.linalg.svdvals(r)
        sigma_min, drift, method = float(s[-1]), 0.0, "qr"
        log2_vol = float(torch.log2(torch.diagonal(r).abs()).sum())
    if sigma_min <= sigma_max * max(m, n) * torch.finfo(torch.float64).eps:
        return svd()
    rel_err = drift + backward_error_bound(m, n, sigma_max / sigma_min)
    return Spectrum(sigma_max, sigma_min, n, log2_vol, frob, rel_err, method)
