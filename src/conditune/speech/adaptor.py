"""The audio adaptor between the frozen encoder and the LLM.

As in the paper: stack ``k`` consecutive encoder frames (zero-padding the tail) -> Linear(k*D_enc, D_llm)
-> LayerNorm -> add sinusoidal positions -> ``depth`` Transformer self-attention layers that ignore the
padded frames (``key_padding_mask`` from the lengths; new length ``ceil(len / k)``) -> a learned scalar
``output_scale`` (set to the RMS of the LLM's token embeddings when the model is built, so audio and text
positions start at the same magnitude).

The adaptor carries the CTC head that reads its outputs (:class:`~conditune.speech.ctc.CTCHead`, a module of
its own: parameters and math), so adaptor and head are trained, saved and loaded together.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from conditune.speech.configuration import AdaptorConfig
from conditune.speech.ctc import CTCHead


def sinusoidal_positions(length: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The Transformer's fixed sinusoidal encoding, ``[length, dim]``."""
    position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    half = (dim + 1) // 2
    div = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * (-math.log(10000.0) / max(half, 1)))
    table = torch.zeros(length, 2 * half, device=device, dtype=torch.float32)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div)
    return table[:, :dim].to(dtype)


def subsampled_lengths(lengths: torch.Tensor, factor: int) -> torch.Tensor:
    return torch.div(lengths + factor - 1, factor, rounding_mode="floor")


class AudioAdaptor(nn.Module):
    def __init__(self, encoder_dim: int, llm_dim: int, config: AdaptorConfig, *, learn_ctc_table: bool = False):
        super().__init__()
        self.factor = int(config.subsample)
        self.encoder_dim = int(encoder_dim)
        self.llm_dim = int(llm_dim)
        # registered first: the parameter order (which gradient clipping sums norms in) stays that of 0.1.0
        self.ctc_head = CTCHead(self.llm_dim, learn_table=learn_ctc_table)
        self.proj = nn.Linear(self.factor * self.encoder_dim, self.llm_dim)
        self.norm = nn.LayerNorm(self.llm_dim)
        heads = int(config.heads)
        if self.llm_dim % heads:
            raise ValueError(f"adaptor heads ({heads}) must divide the LLM hidden size ({self.llm_dim})")
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model=self.llm_dim,
                nhead=heads,
                dim_feedforward=int(config.ffn_multiplier) * self.llm_dim,
                dropout=float(config.dropout),
                activation="gelu",
                batch_first=True,
                norm_first=False,
            )
            for _ in range(int(config.depth))
        )
        self.output_scale = nn.Parameter(torch.ones(()))

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``frames [B, T, D_enc]``, ``lengths [B]`` -> ``(embeddings [B, ceil(T/k), D_llm], new lengths [B])``."""
        batch, time, dim = frames.shape
        k = self.factor
        valid = torch.arange(time, device=frames.device)[None, :] < lengths.to(frames.device)[:, None]
        frames = frames * valid.unsqueeze(-1).to(frames.dtype)  # padded frames are zeros, like the tail pad
        pad = (-time) % k
        if pad:
            frames = torch.nn.functional.pad(frames, (0, 0, 0, pad))
        stacked = frames.reshape(batch, (time + pad) // k, k * dim)
        new_lengths = subsampled_lengths(lengths.to(frames.device), k)
        h = self.norm(self.proj(stacked))
        h = h + sinusoidal_positions(h.shape[1], self.llm_dim, device=h.device, dtype=h.dtype)
        padding_mask = torch.arange(h.shape[1], device=h.device)[None, :] >= new_lengths[:, None]
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=padding_mask)
        h = h.masked_fill(padding_mask.unsqueeze(-1), 0.0) * self.output_scale
        return h, new_lengths

    @torch.no_grad()
    def match_scale(self, embeddings: torch.Tensor) -> None:
        """Start the outputs at the per-element RMS of ``embeddings`` (the LLM's input embedding matrix)."""
        self.output_scale.fill_(float(embeddings.detach().float().pow(2).mean().sqrt()))
