"""A weight matrix as the spectral algorithms see it: tall (m >= n), read without transposing copies.

Mathematically the scanner works on T, the matrix itself when it has at least as many rows as columns
and its transpose otherwise (same singular values). T is never materialised: a wide matrix (like
``down_proj``, 4096 x 14336) stays in its own contiguous storage and every product is written so that
BLAS reads it directly (``A A^T`` for the short-side Gram matrix, ``A^T Q`` for ``T Q``).

Matrices up to ``KEEP_BYTES`` (float64 size) are upcast once and kept in float32 and float64; larger
ones (a 128256 x 4096 embedding) are read in chunks along the long side, upcast one chunk at a time.
bf16, fp16 and fp32 values are exactly representable in float32, so the float32 copy is exact for
them; float64 inputs are rounded there, which only the float32 factorisations see.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np
import torch

# Symmetric blocking of the Gram matrix: only the upper block triangle is computed, in column
# blocks of about this width (narrower blocks lose GEMM efficiency; fewer blocks waste flops).
GRAM_BLOCK = 1024


class MatrixProblem(ValueError):
    """The matrix cannot be analysed (NaN/Inf, all zero); ``reason`` goes into the scan record."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class MatrixView:
    """T (m x n, m >= n) over a 2-D tensor or array of any float dtype, products in float64."""

    CHUNK_BYTES = 256 * 2**20  # float64 bytes per chunk when the matrix is not kept
    KEEP_BYTES = 1 << 30  # up to this float64 size, keep float32 and float64 copies

    def __init__(self, matrix):
        t = matrix if isinstance(matrix, torch.Tensor) else torch.from_numpy(np.asarray(matrix))
        t = t.detach().cpu()
        if t.dim() != 2:
            raise ValueError(f"expected a 2-D matrix, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            t = t.to(torch.float64)
        self.storage = t
        self.wide = t.shape[0] < t.shape[1]
        self.m, self.n = (t.shape[1], t.shape[0]) if self.wide else tuple(t.shape)
        self.kept = 8 * self.m * self.n <= self.KEEP_BYTES
        self.chunk_len = max(1, self.CHUNK_BYTES // (8 * self.n))
        self._copies: dict[torch.dtype, torch.Tensor] = {}

    @property
    def shape(self) -> tuple[int, int]:
        return self.m, self.n

    @property
    def square(self) -> bool:
        return self.m == self.n

    # ------------------------------------------------------------------------------------------
    # storage

    def stored(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole matrix in ``dtype``, storage orientation, contiguous (kept matrices only)."""
        if not self.kept:
            raise RuntimeError("matrix too large to keep whole; use chunks()")
        if dtype not in self._copies:
            source = self.storage if self.storage.dtype == dtype else self.storage.to(dtype)
            self._copies[dtype] = source.contiguous()
        return self._copies[dtype]

    def release(self, dtype: torch.dtype) -> None:
        self._copies.pop(dtype, None)

    def chunks(self, dtype: torch.dtype = torch.float64) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, rows start:stop of T in ``dtype``) along the long side (views, no transposing copy)."""
        if self.kept:
            whole = self.stored(dtype)
            yield 0, self.m, whole.T if self.wide else whole
            return
        for start in range(0, self.m, self.chunk_len):
            stop = min(self.m, start + self.chunk_len)
            if self.wide:
                yield start, stop, self.storage[:, start:stop].to(dtype).T
            else:
                yield start, stop, self.storage[start:stop].to(dtype)

    def dense64(self) -> np.ndarray:
        """T in float64 as one array (only for small matrices and the rare QR/SVD fallbacks)."""
        if self.kept:
            whole = self.stored(torch.float64)
            return (whole.T if self.wide else whole).numpy()
        return np.concatenate([c.numpy() for _, _, c in self.chunks()], axis=0)

    # ------------------------------------------------------------------------------------------
    # products (float64 unless asked otherwise)

    def gram(self, dtype: torch.dtype) -> np.ndarray:
        """G = T^T T (n x n) formed in ``dtype``, symmetric blocks computed once."""
        g = torch.zeros(self.n, self.n, dtype=dtype)
        edges = _block_edges(self.n)
        for _, _, chunk in self.chunks(dtype):
            for lo, hi in itertools.pairwise(edges):
                g[lo:hi, lo:].addmm_(chunk[:, lo:hi].T, chunk[:, lo:])
        upper = torch.triu(g)
        return (upper + torch.triu(g, 1).T).numpy()

    def matmat(self, q: np.ndarray, dtype: torch.dtype = torch.float64) -> np.ndarray:
        """T Q for Q of shape (n, k)."""
        qt = torch.from_numpy(np.ascontiguousarray(q)).to(dtype)
        parts = [chunk @ qt for _, _, chunk in self.chunks(dtype)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.numpy()

    def rmatmat(self, y: np.ndarray, dtype: torch.dtype = torch.float64) -> np.ndarray:
        """T^T Y for Y of shape (m, k)."""
        yt = torch.from_numpy(np.ascontiguousarray(y)).to(dtype)
        out = torch.zeros(self.n, yt.shape[1], dtype=dtype)
        for start, stop, chunk in self.chunks(dtype):
            out.addmm_(chunk.T, yt[start:stop])
        return out.numpy()

    def normal_matvec32(self, x: np.ndarray) -> np.ndarray:
        """T^T T x with float32 products (the sigma_max Lanczos operator where no Gram is formed)."""
        x32 = np.asarray(x, dtype=np.float32)
        out = np.zeros(self.n, dtype=np.float32)
        for _, _, chunk in self.chunks(torch.float32):
            c = chunk.numpy()
            out += c.T @ (c @ x32)
        return out.astype(np.float64)

    # ------------------------------------------------------------------------------------------
    # checks

    def frobenius(self) -> float:
        """||T||_F in float64; :class:`MatrixProblem` for NaN/Inf (counted) and all-zero matrices."""
        # NaN/Inf propagate into the norm (squares of finite bf16/fp16/fp32 values cannot overflow
        # float64), so the costly count runs only for a bad matrix.
        if self.kept:  # the kept copy is needed anyway
            norm = float(torch.linalg.vector_norm(self.stored(torch.float64)))
        else:  # chunk by chunk: a dtype=float64 norm of the whole tensor upcasts all of it at once
            squares = sum(float(torch.linalg.vector_norm(c) ** 2) for _, _, c in self.chunks())
            norm = math.sqrt(squares)
        if not math.isfinite(norm):
            bad = int((~torch.isfinite(self.storage)).sum())
            raise MatrixProblem(f"{bad} NaN/Inf values" if bad else "values too large for float64 products")
        if norm == 0.0:
            raise MatrixProblem("all zero")
        return norm


def _block_edges(n: int) -> list[int]:
    blocks = max(1, round(n / GRAM_BLOCK))
    return [round(i * n / blocks) for i in range(blocks + 1)]
