"""The CTC head: scores adaptor outputs against the LLM's frozen token embeddings plus a learned blank.

It serves three purposes (docs/speech.md):

* the alignment stage of training: CTC of the transcript's tokens pulls the audio positions towards the
  embeddings of the words spoken, in order, before the LLM is asked to read them (:meth:`CTCHead.loss`);
* compression (``model.ctc.compress``, not in the paper): the LLM reads only the positions whose greedy
  CTC label is a token, one per run (:meth:`CTCHead.compress`), optionally as the CTC posterior times the
  token embeddings (``model.ctc.readout: embeddings``, as LegoSLM);
* a diagnostic: greedy CTC decoding of the adaptor alone (:meth:`CTCHead.greedy_ids`).

The head owns its parameters (``blank``, ``log_scale``) and the ``vocabulary`` buffer (the token ids it
scores, those of the training transcripts; empty: every token); the token embeddings are passed in, since
they belong to the LLM.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from conditune.errors import CondituneError


class CTCHead(nn.Module):
    def __init__(self, dim: int, *, learn_table: bool = False):
        super().__init__()
        self.learn_table = learn_table
        self.blank = nn.Parameter(torch.zeros(dim))  # the blank "token embedding"
        # log of the logit scale: token-embedding dot products are small (SmolLM2: |e| ~ 3), so the softmax over
        # ~50k tokens needs a gain that can grow quickly
        self.log_scale = nn.Parameter(torch.tensor(math.log(4.0)))
        # saved with the head, so a loaded model compresses exactly as it did in training
        self.register_buffer("vocabulary", torch.zeros(0, dtype=torch.long))
        # learn_table: a learned offset to each scored token's embedding (zeros: the frozen embeddings), so the
        # head need not find the LLM's exact embedding directions; what the LLM reads stays its own embeddings
        self.table_offset = nn.Parameter(torch.zeros(0, dim), requires_grad=learn_table)

    def set_vocabulary(self, token_ids: Sequence[int] | None, *, vocabulary_size: int | None = None) -> None:
        """Score only these tokens (a few thousand dot products per position instead of the whole vocabulary);
        ``None``: every token (``vocabulary_size`` of them, for a learned table)."""
        vocab = sorted({int(t) for t in token_ids}) if token_ids is not None else []
        self.vocabulary = torch.tensor(vocab, dtype=torch.long, device=self.vocabulary.device)
        rows = len(vocab) if vocab else (vocabulary_size or 0) if self.learn_table else 0
        self.resize_table(rows)

    def resize_table(self, rows: int) -> None:
        """A zero offset for ``rows`` tokens when the table is learned (no rows otherwise)."""
        rows = rows if self.learn_table else 0
        device = self.table_offset.device
        self.table_offset = nn.Parameter(torch.zeros(rows, self.blank.shape[0], device=device),
                                         requires_grad=self.learn_table)  # fmt: skip

    def scored_table(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows the logits score: the token embeddings (+ the learned offset) and their token ids."""
        table, columns = self.token_table(embeddings)
        if self.table_offset.numel():
            table = table + self.table_offset.to(table.dtype)
        return table, columns

    def token_table(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The frozen token embeddings scored (``[V', D]``) and their token ids (None: all, in order)."""
        table = embeddings.detach()
        if not self.vocabulary.numel():
            return table, None
        columns = self.vocabulary.to(table.device)
        return table[columns], columns

    def logits(self, audio: torch.Tensor, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[B, T, V' + 1]`` logits (blank last) and the token id of each column (None: all of them)."""
        table, columns = self.scored_table(embeddings)
        table = torch.cat([table, self.blank[None].to(table.dtype)])
        return (audio @ table.to(audio.dtype).T).float() * self.log_scale.exp(), columns

    def loss(
        self,
        audio: torch.Tensor,
        lengths: torch.Tensor,
        token_ids: Sequence[Sequence[int]],
        embeddings: torch.Tensor,
    ) -> torch.Tensor:
        """CTC of the text tokens against the adaptor outputs (mean over the batch of per-token losses)."""
        logits, columns = self.logits(audio, embeddings)
        log_probs = logits.log_softmax(-1).transpose(0, 1)  # [T, B, V' + 1]
        blank = log_probs.shape[-1] - 1
        targets = torch.tensor([t for seq in token_ids for t in seq], dtype=torch.long, device=audio.device)
        if columns is not None:  # token id -> its column (the vocabulary is sorted)
            columns = columns.to(audio.device)
            found = torch.searchsorted(columns, targets).clamp(max=len(columns) - 1)
            if not bool((columns[found] == targets).all()):
                raise CondituneError("a transcript token is missing from the CTC vocabulary (set_vocabulary)")
            targets = found
        target_lengths = torch.tensor([len(seq) for seq in token_ids], dtype=torch.long, device=audio.device)
        # zero_infinity: an utterance with more tokens than positions contributes nothing instead of inf
        return nn.functional.ctc_loss(
            log_probs,
            targets,
            lengths.to(audio.device),
            target_lengths,
            blank=blank,
            reduction="mean",
            zero_infinity=True,
        )

    def compress(
        self, audio: torch.Tensor, lengths: torch.Tensor, embeddings: torch.Tensor, *, readout: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the positions whose greedy CTC label is a token, averaging each run of one label (a new run starts
        after a blank or at a label change, as CTC decoding collapses them). The choice is not differentiable;
        the kept vectors are. An utterance with no token position keeps its least-blank one. With ``readout ==
        "embeddings"`` each kept vector is the CTC posterior over tokens (blank left out) times the token
        embeddings, so gradients reach the adaptor through the posterior."""
        soft = readout == "embeddings"
        with torch.set_grad_enabled(soft and torch.is_grad_enabled()):
            logits, _ = self.logits(audio, embeddings)
        blank = logits.shape[-1] - 1
        with torch.no_grad():
            labels = logits.argmax(-1)
            token_margin = logits[..., :blank].max(-1).values - logits[..., blank]
        table = self.token_table(embeddings)[0] if soft else None
        rows = []
        for b, n in enumerate(lengths.tolist()):
            keep = (labels[b, :n] != blank).nonzero().squeeze(1)
            if keep.numel() == 0:
                keep = token_margin[b, :n].argmax().reshape(1)
            lab = labels[b, keep]
            new_run = torch.ones_like(keep, dtype=torch.bool)
            new_run[1:] = (keep[1:] != keep[:-1] + 1) | (lab[1:] != lab[:-1])
            run = new_run.cumsum(0) - 1
            runs = int(run[-1]) + 1
            # the mixture only where it is read (about a third of the positions)
            kept = logits[b, keep, :blank].softmax(-1).to(table.dtype) @ table if soft else audio[b, keep]
            summed = kept.new_zeros(runs, kept.shape[-1]).index_add(0, run, kept)
            counts = torch.bincount(run, minlength=runs).to(kept.dtype).unsqueeze(1)
            rows.append(summed / counts)
        new_lengths = torch.tensor([r.shape[0] for r in rows], dtype=torch.long, device=audio.device)
        return nn.utils.rnn.pad_sequence(rows, batch_first=True), new_lengths

    @torch.no_grad()
    def greedy_ids(self, audio: torch.Tensor, lengths: torch.Tensor, embeddings: torch.Tensor) -> list[list[int]]:
        """Greedy CTC decoding: token ids per utterance (repeats collapsed, blanks dropped)."""
        logits, columns = self.logits(audio, embeddings)
        best = logits.argmax(-1)
        blank = logits.shape[-1] - 1
        rows = []
        for row, n in zip(best.tolist(), lengths.tolist()):
            ids = [t for i, t in enumerate(row[:n]) if t != blank and (i == 0 or t != row[i - 1])]
            rows.append(columns[ids].tolist() if columns is not None else ids)
        return rows
