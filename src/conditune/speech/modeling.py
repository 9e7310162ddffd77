"""``SpeechLLM``: frozen Whisper encoder -> trainable adaptor -> causal LLM (partly trainable).

Training sequence per example (Algorithm 1 of the paper)::

    [a_1 ... a_n] [BOS] [t_1 ... t_m] [EOS]
     audio embeds         text tokens

Only positions that carry a loss are projected to the vocabulary: the BOS position predicts ``t_1``,
``t_k`` predicts ``t_{k+1}``, ``t_m`` predicts ``EOS``. Audio positions and the EOS position (nothing
follows it) carry label -100. ``labels[b, p]`` is the token that position ``p`` predicts: targets are
aligned (shifted) exactly once, here; cross-entropy is computed on the gathered hidden states and the HF
model never sees labels (it would shift them again).

A saved model folder holds ``speech_config.json``, ``adaptor.safetensors`` and ``llm_delta/`` (only the
trained LLM tensors, via :mod:`conditune.selection.delta`); the base LLM and the encoder are referenced
by path, as Ultravox does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from conditune.errors import CondituneError
from conditune.io import atomic_write, atomic_write_text
from conditune.speech.adaptor import AudioAdaptor
from conditune.speech.config import SpeechLLMConfig
from conditune.speech.encoders import SpeechEncoder, build_encoder

IGNORE_INDEX = -100
CONFIG_NAME = "speech_config.json"
ADAPTOR_NAME = "adaptor.safetensors"
DELTA_DIR = "llm_delta"


@dataclass
class SpeechBatch:
    """Everything the LLM consumes for one batch (right padding)."""

    inputs_embeds: torch.Tensor  # [B, N, H]
    attention_mask: torch.Tensor  # [B, N]
    position_ids: torch.Tensor  # [B, N]
    labels: torch.Tensor  # [B, N]: the token position p predicts, IGNORE_INDEX where none
    audio_lengths: torch.Tensor  # [B]


@dataclass
class SpeechOutput:
    loss: torch.Tensor  # what is optimised: llm_loss + ctc_weight * ctc_loss (or ctc_loss alone)
    num_tokens: int
    labels: torch.Tensor | None
    llm_loss: torch.Tensor | None = None  # Algorithm 1's cross-entropy on the text positions
    ctc_loss: torch.Tensor | None = None  # the adaptor's CTC alignment loss, when asked for


# ---------------------------------------------------------------------------------------------- loading


def resolve_path(path: str) -> str:
    """``demo:<name>`` means an offline demo model (:func:`conditune.models.fetch`, installed on first use)."""
    if isinstance(path, str) and path.startswith("demo:"):
        from conditune import models

        return str(models.fetch(path[len("demo:") :], log=lambda msg: None))
    return path


def _split_gguf(path: str, gguf_file: str | None) -> tuple[str, str | None]:
    path = resolve_path(path)
    p = Path(path)
    if gguf_file is None and p.suffix == ".gguf":
        return str(p.parent), p.name
    if gguf_file is not None and Path(gguf_file).is_absolute():
        return str(Path(gguf_file).parent), Path(gguf_file).name
    return path, gguf_file


def load_llm(cfg) -> nn.Module:
    from transformers import AutoModelForCausalLM

    path, gguf = _split_gguf(cfg.path, cfg.gguf_file)
    if not Path(path).exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise CondituneError(f"LLM path {cfg.path} does not exist")
    try:
        dtype = getattr(torch, cfg.dtype)
    except AttributeError:
        raise CondituneError(f"unknown dtype {cfg.dtype!r} for model.llm.dtype") from None
    kwargs = {"dtype": dtype}
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise CondituneError(
            f"cannot load LLM from {cfg.path}{' / ' + gguf if gguf else ''}: {str(exc).splitlines()[0]}"
        ) from None


def load_tokenizer(cfg):
    from transformers import AutoTokenizer

    if cfg.tokenizer:
        path, gguf = _split_gguf(cfg.tokenizer, None)
    else:
        path, gguf = _split_gguf(cfg.path, cfg.gguf_file)
    try:
        return AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError) as exc:
        raise CondituneError(f"cannot load tokenizer from {path}: {str(exc).splitlines()[0]}") from None


def apply_trainable(llm: nn.Module, config: SpeechLLMConfig, *, for_training: bool = True) -> nn.Module:
    """Freeze the LLM, then unfreeze what ``config.trainable`` selects. Returns the (maybe PEFT-wrapped) LLM."""
    llm.requires_grad_(False)
    mode = config.trainable.mode
    if mode == "none":
        return llm
    if mode == "all":
        llm.requires_grad_(True)
        return llm
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        lc = config.trainable.lora
        peft_cfg = LoraConfig(
            r=lc.r,
            lora_alpha=lc.alpha,
            lora_dropout=lc.dropout,
            target_modules=list(lc.target_modules),
            task_type="CAUSAL_LM",
            bias="none",
            rank_pattern=dict(lc.rank_pattern or {}),
            alpha_pattern=dict(lc.alpha_pattern or {}),
        )
        try:
            # LoRA's own initialisation must not shift the global RNG: the adaptor built next (and the
            # dropout masks of training) then start from the same state whatever the trainable mode,
            # which `conditune experiment` relies on to compare modes on an identical footing.
            with torch.random.fork_rng(devices=[]):
                return get_peft_model(llm, peft_cfg)
        except ValueError as exc:
            raise CondituneError(f"LoRA: {str(exc).splitlines()[0]}") from None
    if mode == "names":
        if not for_training:
            return llm  # inference: the delta carries the trained values; nothing needs gradients
        try:
            from conditune.selection import apply_selection, read_names
        except ImportError:  # package __init__ not re-exporting (yet)
            from conditune.selection.apply import apply_selection
            from conditune.selection.formats import read_names

        names = list(config.trainable.names or [])
        if config.trainable.names_file:
            names += read_names(config.trainable.names_file)
        apply_selection(llm, names, prefix="", strict=True)
        return llm
    raise CondituneError(f"unknown trainable mode {mode!r}")


def new_adaptor(encoder_dim: int, core_llm: nn.Module, config: SpeechLLMConfig) -> AudioAdaptor:
    """A freshly initialised adaptor for ``core_llm``, its output scale matched to the token embeddings."""
    embeddings = core_llm.get_input_embeddings().weight
    adaptor = AudioAdaptor(encoder_dim, embeddings.shape[1], config.adaptor)
    if config.adaptor.match_embedding_scale:
        adaptor.match_scale(embeddings)
    return adaptor


def _core(llm: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside a possible PEFT wrapper (LoRA layers are injected in place)."""
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


# ---------------------------------------------------------------------------------------------- model


class SpeechLLM(nn.Module):
    """Frozen encoder (not a sub-module: it is never saved or trained) + adaptor + LLM."""

    def __init__(
        self,
        config: SpeechLLMConfig,
        encoder: SpeechEncoder | None,
        llm: nn.Module,
        tokenizer,
        adaptor: AudioAdaptor | None = None,
    ):
        super().__init__()
        self.config = config
        object.__setattr__(self, "encoder", encoder)  # plain attribute: not in state_dict / parameters()
        self.tokenizer = tokenizer
        self.llm = llm
        core = _core(llm)
        if adaptor is None:
            if encoder is None:
                raise ValueError("need an encoder (for its dimension) or a ready adaptor")
            adaptor = new_adaptor(encoder.dim, core, config)
        self.adaptor = adaptor
        self.bos_token_id = _first_id(
            config.llm.bos_token_id, getattr(tokenizer, "bos_token_id", None), core.config.bos_token_id
        )
        self.eos_token_id = _first_id(
            config.llm.eos_token_id, getattr(tokenizer, "eos_token_id", None), core.config.eos_token_id
        )
        if self.bos_token_id is None or self.eos_token_id is None:
            raise CondituneError("the LLM has no BOS/EOS token id: set model.llm.bos_token_id and eos_token_id")
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else self.eos_token_id

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(
        cls,
        config: SpeechLLMConfig,
        *,
        encoder: SpeechEncoder | None = None,
        for_training: bool = True,
        load_encoder: bool = True,
        encoder_dim: int | None = None,
    ) -> SpeechLLM:
        """Load encoder, LLM and tokenizer as ``config`` says; a fresh adaptor.

        ``load_encoder=False`` skips the encoder (text-only use of the LLM, or features from a cache);
        the adaptor then needs ``encoder_dim``.
        """
        config.validate()
        if encoder is None and load_encoder:
            encoder = build_encoder(config.encoder)
        llm = load_llm(config.llm)
        tokenizer = load_tokenizer(config.llm)
        llm = apply_trainable(llm, config, for_training=for_training)
        adaptor = None
        if encoder is None:
            if encoder_dim is None:
                raise CondituneError("building a SpeechLLM without its encoder needs encoder_dim")
            adaptor = new_adaptor(encoder_dim, _core(llm), config)
        return cls(config, encoder, llm, tokenizer, adaptor=adaptor)

    @property
    def device(self) -> torch.device:
        return self.adaptor.proj.weight.device

    @property
    def core_llm(self) -> nn.Module:
        return _core(self.llm)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def llm_trainable_names(self) -> list[str]:
        return [n for n, p in self.llm.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------ text

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode_tokens(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    # ------------------------------------------------------------------ training forward

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.core_llm.get_input_embeddings()(ids)

    def build_inputs(
        self, audio: torch.Tensor, audio_lengths: torch.Tensor, token_ids: Sequence[Sequence[int]]
    ) -> SpeechBatch:
        """Right-padded ``[audio, BOS, text, EOS]`` sequences with aligned labels (see module docstring)."""
        device = audio.device
        emb_layer = self.core_llm.get_input_embeddings()
        dtype = emb_layer.weight.dtype
        rows, labels, lengths = [], [], []
        for b, tokens in enumerate(token_ids):
            n_audio = int(audio_lengths[b])
            ids = torch.tensor([self.bos_token_id, *tokens, self.eos_token_id], dtype=torch.long, device=device)
            text_emb = emb_layer(ids)
            rows.append(torch.cat([audio[b, :n_audio].to(dtype), text_emb], dim=0))
            lab = torch.full((n_audio + len(ids),), IGNORE_INDEX, dtype=torch.long, device=device)
            lab[n_audio : n_audio + len(ids) - 1] = ids[1:]  # BOS -> t_1, ..., t_m -> EOS; EOS position: none
            labels.append(lab)
            lengths.append(n_audio + len(ids))
        total = max(lengths)
        hidden = rows[0].shape[-1]
        embeds = torch.zeros(len(rows), total, hidden, dtype=dtype, device=device)
        label_t = torch.full((len(rows), total), IGNORE_INDEX, dtype=torch.long, device=device)
        mask = torch.zeros(len(rows), total, dtype=torch.long, device=device)
        for b, (row, lab, n) in enumerate(zip(rows, labels, lengths)):
            embeds[b, :n] = row
            label_t[b, :n] = lab
            mask[b, :n] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return SpeechBatch(embeds, mask, positions, label_t, audio_lengths)

    def forward(
        self,
        frames: torch.Tensor,
        frame_lengths: torch.Tensor,
        token_ids: Sequence[Sequence[int]],
        *,
        ctc_weight: float = 0.0,
        run_llm: bool = True,
    ) -> SpeechOutput:
        """Loss of a batch. ``run_llm=False`` is the alignment stage: the CTC loss alone, the LLM is not run."""
        device = self.device
        audio, audio_lengths = self.adaptor(frames.to(device), frame_lengths.to(device))
        ctc = self.ctc_loss(audio, audio_lengths, token_ids) if (ctc_weight or not run_llm) else None
        if not run_llm:
            return SpeechOutput(loss=ctc, num_tokens=sum(len(t) for t in token_ids), labels=None, ctc_loss=ctc)
        audio, audio_lengths = self.llm_audio(audio, audio_lengths)
        out = self.loss_from_batch(self.build_inputs(audio, audio_lengths, token_ids))
        out.llm_loss = out.loss
        if ctc is not None:
            out.ctc_loss = ctc
            out.loss = out.loss + ctc_weight * ctc
        return out

    def set_ctc_vocabulary(self, token_ids: Sequence[int] | None) -> None:
        """Score the CTC head against these tokens only (those of the training transcripts): the loss then costs
        a few thousand dot products per position instead of the whole vocabulary. ``None``: every token.
        Kept in the adaptor's ``ctc_vocabulary`` buffer, so it is saved and loaded with the adaptor."""
        vocab = sorted(set(int(t) for t in token_ids)) if token_ids is not None else []
        self.adaptor.ctc_vocabulary = torch.tensor(vocab, dtype=torch.long, device=self.adaptor.ctc_vocabulary.device)

    def ctc_token_table(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The frozen token embeddings the CTC head scores against (``[V', D]``) and their token ids (None: all)."""
        table = self.core_llm.get_input_embeddings().weight.detach()
        if not self.adaptor.ctc_vocabulary.numel():
            return table, None
        columns = self.adaptor.ctc_vocabulary.to(table.device)
        return table[columns], columns

    def ctc_logits(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[B, T, V' + 1]`` logits (each adaptor output scored against the token embeddings; blank last) and the
        token id of each column (None: all of them, in order)."""
        table, columns = self.ctc_token_table()
        table = torch.cat([table, self.adaptor.ctc_blank[None].to(table.dtype)])
        return (audio @ table.to(audio.dtype).T).float() * self.adaptor.ctc_log_scale.exp(), columns

    def llm_audio(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The audio positions the LLM reads: all of them, or the CTC-compressed ones (``adaptor.ctc_compress``)."""
        return self.compress(audio, lengths) if self.config.adaptor.ctc_compress else (audio, lengths)

    def compress(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CTC compression: keep the positions whose greedy CTC label is a token, averaging each run of one label
        (a new run starts after a blank or at a label change, as CTC decoding collapses them). The choice is not
        differentiable; the kept vectors are. An utterance with no token position keeps its least-blank one.
        With ``ctc_readout: embeddings`` each kept vector is the CTC posterior over tokens (blank left out)
        times the LLM's token embeddings, so gradients reach the adaptor through the posterior."""
        soft = self.config.adaptor.ctc_readout == "embeddings"
        with torch.set_grad_enabled(soft and torch.is_grad_enabled()):
            logits, _ = self.ctc_logits(audio)
        blank = logits.shape[-1] - 1
        with torch.no_grad():
            labels = logits.argmax(-1)
            token_margin = logits[..., :blank].max(-1).values - logits[..., blank]
        table = self.ctc_token_table()[0] if soft else None
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

    def ctc_loss(
        self, audio: torch.Tensor, audio_lengths: torch.Tensor, token_ids: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """CTC of the text tokens against the adaptor outputs (mean over the batch of per-token losses)."""
        logits, columns = self.ctc_logits(audio)
        log_probs = logits.log_softmax(-1).transpose(0, 1)  # [T, B, V' + 1]
        blank = log_probs.shape[-1] - 1
        targets = torch.tensor([t for seq in token_ids for t in seq], dtype=torch.long, device=audio.device)
        if columns is not None:  # token id -> its column (the vocabulary is sorted)
            columns = columns.to(audio.device)
            found = torch.searchsorted(columns, targets).clamp(max=len(columns) - 1)
            if not bool((columns[found] == targets).all()):
                raise CondituneError("a transcript token is missing from the CTC vocabulary (set_ctc_vocabulary)")
            targets = found
        target_lengths = torch.tensor([len(seq) for seq in token_ids], dtype=torch.long, device=audio.device)
        # zero_infinity: an utterance with more tokens than positions contributes nothing instead of inf
        return nn.functional.ctc_loss(
            log_probs,
            targets,
            audio_lengths.to(audio.device),
            target_lengths,
            blank=blank,
            reduction="mean",
            zero_infinity=True,
        )

    @torch.no_grad()
    def ctc_transcribe(self, frames: torch.Tensor, frame_lengths: torch.Tensor) -> list[str]:
        """Greedy CTC decoding of the adaptor alone (no LLM): a diagnostic of what the alignment stage learned."""
        was_training = self.training
        self.eval()
        try:
            audio, lengths = self.adaptor(frames.to(self.device), frame_lengths.to(self.device))
            logits, columns = self.ctc_logits(audio)
            best = logits.argmax(-1)
            blank = logits.shape[-1] - 1
            texts = []
            for row, n in zip(best.tolist(), lengths.tolist()):
                ids = [t for i, t in enumerate(row[:n]) if t != blank and (i == 0 or t != row[i - 1])]
                texts.append(self.decode_tokens(columns[ids].tolist() if columns is not None else ids))
            return texts
        finally:
            self.train(was_training)

    def loss_from_batch(self, batch: SpeechBatch) -> SpeechOutput:
        core = self.core_llm
        body = getattr(core, core.base_model_prefix)
        out = body(
            inputs_embeds=batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        where = batch.labels != IGNORE_INDEX
        targets = batch.labels[where]
        logits = core.get_output_embeddings()(hidden[where])  # only positions that carry a loss
        logits = _apply_logit_softcap(core, logits)
        loss = nn.functional.cross_entropy(logits.float(), targets, reduction="mean")
        return SpeechOutput(loss=loss, num_tokens=int(targets.numel()), labels=batch.labels)

    # ------------------------------------------------------------------ generation

    def encode_audio(self, inputs: Sequence, feature_cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder frames for paths (via ``feature_cache`` when given) or waveforms."""
        from conditune.speech.features import pad_frames

        if feature_cache is not None and all(isinstance(x, (str, Path)) for x in inputs):
            return pad_frames(feature_cache.get(list(inputs)))
        if self.encoder is None:
            raise CondituneError("this SpeechLLM was built without an encoder")
        waves = []
        for x in inputs:
            if isinstance(x, (str, Path)):
                from conditune.data.audio import load_audio

                waves.append(load_audio(x, sample_rate=16000))
            else:
                waves.append(np.asarray(x, dtype=np.float32))
        return self.encoder.encode(waves)

    def transcript_token_cap(self, audio_lengths: torch.Tensor) -> list[int] | None:
        """Most new tokens each utterance may generate: with ``ctc_compress`` the LLM reads about one position per
        spoken token, so ``ceil(1.5 n) + 4`` tokens for ``n`` positions cut greedy repetition loops short without
        touching a transcript of normal length. None (no cap beyond ``max_new_tokens``) without compression."""
        if not self.config.adaptor.ctc_compress:
            return None
        return [math.ceil(1.5 * int(n)) + 4 for n in audio_lengths]

    @torch.no_grad()
    def generate_ids_from_frames(
        self, frames: torch.Tensor, frame_lengths: torch.Tensor, *, num_beams: int = 1, max_new_tokens: int = 128
    ) -> list[list[int]]:
        """Generated token ids per utterance, cut at EOS (and at :meth:`transcript_token_cap`)."""
        from transformers import GenerationConfig

        was_training = self.training
        self.eval()
        try:
            device = self.device
            audio, audio_lengths = self.llm_audio(*self.adaptor(frames.to(device), frame_lengths.to(device)))
            caps = self.transcript_token_cap(audio_lengths) or [max_new_tokens] * len(audio_lengths)
            caps = [min(c, max_new_tokens) for c in caps]
            emb_layer = self.core_llm.get_input_embeddings()
            dtype = emb_layer.weight.dtype
            bos = emb_layer(torch.tensor([self.bos_token_id], device=device))
            lengths = [int(n) + 1 for n in audio_lengths]
            total = max(lengths)
            embeds = torch.zeros(len(lengths), total, bos.shape[-1], dtype=dtype, device=device)
            mask = torch.zeros(len(lengths), total, dtype=torch.long, device=device)
            for b, n in enumerate(lengths):  # LEFT padding for generation
                embeds[b, total - n : total - 1] = audio[b, : n - 1].to(dtype)
                embeds[b, total - 1] = bos[0]
                mask[b, total - n :] = 1
            gen_cfg = GenerationConfig(
                max_new_tokens=max(caps),
                num_beams=num_beams,
                do_sample=False,
                eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id,
                bos_token_id=self.bos_token_id,
            )
            out = self.core_llm.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=gen_cfg)
            rows = []
            for row, cap in zip(out.tolist(), caps):
                if self.eos_token_id in row:
                    row = row[: row.index(self.eos_token_id)]
                rows.append(row[:cap])
            return rows
        finally:
            self.train(was_training)

    def generate_from_frames(
        self, frames: torch.Tensor, frame_lengths: torch.Tensor, *, num_beams: int = 1, max_new_tokens: int = 128
    ) -> list[str]:
        rows = self.generate_ids_from_frames(frames, frame_lengths, num_beams=num_beams, max_new_tokens=max_new_tokens)
        return [self.decode_tokens(row) for row in rows]

    def transcribe(
        self, inputs: Sequence, batch_size: int = 8, num_beams: int = 1, max_new_tokens: int = 128, feature_cache=None
    ) -> list[str]:
        """Transcribe audio files or 16 kHz waveforms (greedy when ``num_beams == 1``, else beam search)."""
        items = list(inputs)
        results: list[str] = []
        for start in range(0, len(items), batch_size):
            frames, lengths = self.encode_audio(items[start : start + batch_size], feature_cache)
            results += self.generate_from_frames(frames, lengths, num_beams=num_beams, max_new_tokens=max_new_tokens)
        return results

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config, adaptor and the LLM delta (trained tensors only) into ``directory``."""
        from safetensors.torch import save

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cfg = self.config.to_dict()
        if not cfg["encoder"]["path"].startswith("demo:"):
            cfg["encoder"]["path"] = str(Path(cfg["encoder"]["path"]).resolve())
        llm_path = Path(cfg["llm"]["path"])
        if llm_path.exists() and not cfg["llm"]["path"].startswith("demo:"):
            cfg["llm"]["path"] = str(llm_path.resolve())
        if cfg["trainable"]["names_file"] and Path(cfg["trainable"]["names_file"]).exists():
            cfg["trainable"]["names_file"] = str(Path(cfg["trainable"]["names_file"]).resolve())
        meta = {
            "conditune_speech_llm": 1,
            "encoder_dim": self.adaptor.encoder_dim,
            "llm_dim": self.adaptor.llm_dim,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        atomic_write_text(directory / CONFIG_NAME, json.dumps({**cfg, "_meta": meta}, indent=2) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.adaptor.state_dict().items()}
        with atomic_write(directory / ADAPTOR_NAME, "wb") as handle:
            handle.write(save(state))
        names = self.llm_trainable_names()
        if names:
            from conditune.selection.delta import save_delta

            # the fingerprint is taken without the delta's tensors: it equals the untouched base's
            save_delta(self.llm, directory / DELTA_DIR, names=names, base_reference=_base_reference(self.config))

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        encoder: SpeechEncoder | None = None,
        load_encoder: bool = True,
        for_training: bool = False,
        device: str | torch.device | None = None,
        overrides: dict | None = None,
    ) -> SpeechLLM:
        directory = Path(directory)
        config = read_config(directory, overrides)
        meta = json.loads((directory / CONFIG_NAME).read_text()).get("_meta", {})
        model = cls.build(
            config,
            encoder=encoder,
            for_training=for_training,
            load_encoder=load_encoder,
            encoder_dim=meta.get("encoder_dim"),
        )
        model.load_trained_state(directory)
        if device is not None:
            model.to(device)
            if model.encoder is not None:
                model.encoder.to(device)
        return model

    def load_trained_state(self, directory: str | Path, force: bool = False) -> None:
        """Load the adaptor and the LLM delta saved by :meth:`save_pretrained`."""
        from safetensors.torch import load_file

        directory = Path(directory)
        try:
            state = load_file(str(directory / ADAPTOR_NAME))
        except FileNotFoundError:
            raise CondituneError(f"{directory}: no {ADAPTOR_NAME} (not a conditune speech model)") from None
        except Exception as exc:  # noqa: BLE001
            raise CondituneError(f"{directory / ADAPTOR_NAME}: unreadable ({exc})") from None
        # the CTC vocabulary buffer: its size is that of the saved run (absent before 2026-12-02: every token)
        state.setdefault("ctc_vocabulary", torch.zeros(0, dtype=torch.long))
        self.adaptor.ctc_vocabulary = torch.zeros_like(
            state["ctc_vocabulary"], device=self.adaptor.ctc_vocabulary.device
        )
        try:
            self.adaptor.load_state_dict(state)
        except RuntimeError as exc:
            raise CondituneError(
                f"{directory / ADAPTOR_NAME} does not fit this configuration: {str(exc).splitlines()[0]}"
            ) from None
        if (directory / DELTA_DIR).exists():
            from conditune.selection.delta import load_delta

            load_delta(self.llm, directory / DELTA_DIR, force=force)


def read_config(directory: str | Path, overrides: dict | None = None) -> SpeechLLMConfig:
    directory = Path(directory)
    file = directory / CONFIG_NAME
    if not file.is_file():
        raise CondituneError(f"{directory}: no {CONFIG_NAME} (not a conditune speech model or checkpoint)")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CondituneError(f"{file}: not valid JSON ({exc})") from None
    data.pop("_meta", None)
    for key, value in (overrides or {}).items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return SpeechLLMConfig.from_dict(data)


def _base_reference(config: SpeechLLMConfig) -> str:
    if config.llm.path.startswith("demo:"):
        return config.llm.path
    path, gguf = _split_gguf(config.llm.path, config.llm.gguf_file)
    if Path(path).exists():
        path = str(Path(path).resolve())
    return f"{path}/{gguf}" if gguf else path


def _first_id(*candidates):
    for c in candidates:
        if isinstance(c, (list, tuple)):
            c = c[0] if c else None
        if c is not None:
            return int(c)
    return None


def _apply_logit_softcap(core, logits):
    cap = getattr(core.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits
