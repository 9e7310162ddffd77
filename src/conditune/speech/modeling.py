"""``SpeechLLM``: adaptor (+ CTC head) -> causal LLM (partly trainable), on frozen encoder frames.

Training sequence per example (Algorithm 1 of the paper)::

    [a_1 ... a_n] [BOS] [t_1 ... t_m] [EOS]
     audio embeds         text tokens

Only positions that carry a loss are projected to the vocabulary: the BOS position predicts ``t_1``,
``t_k`` predicts ``t_{k+1}``, ``t_m`` predicts ``EOS``. Audio positions and the EOS position (nothing
follows it) carry label -100. ``labels[b, p]`` is the token that position ``p`` predicts: targets are
aligned (shifted) exactly once, here; cross-entropy is computed on the gathered hidden states and the HF
model never sees labels (it would shift them again).

The model consumes encoder frames; audio -> frames and text <-> ids are the processor's
(:class:`~conditune.speech.processing.SpeechProcessor`). A saved model folder holds ``config.json``,
``model.safetensors`` (the adaptor with its CTC head) and ``llm_delta/`` (only the trained LLM tensors, via
:mod:`conditune.selection.delta`); the base LLM and the encoder are referenced by path, as Ultravox does.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conditune.errors import CondituneError
from conditune.io import atomic_write
from conditune.speech.adaptor import AudioAdaptor
from conditune.speech.configuration import SpeechLLMConfig
from conditune.speech.ctc import CTCHead
from conditune.speech.loading import apply_trainable, base_reference, core_model, load_llm

IGNORE_INDEX = -100
WEIGHTS_NAME = "model.safetensors"
DELTA_DIR = "llm_delta"
LEGACY_ADAPTOR_NAME = "adaptor.safetensors"  # releases up to 0.1.0: adaptor and CTC head, without prefixes
_LEGACY_CTC_KEYS = {"ctc_blank": "ctc_head.blank", "ctc_log_scale": "ctc_head.log_scale",
                    "ctc_vocabulary": "ctc_head.vocabulary"}  # fmt: skip


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
    ctc_loss: torch.Tensor | None = None  # the CTC alignment loss, when asked for


class SpeechLLM(nn.Module):
    """Adaptor (with its CTC head) + LLM. The frozen encoder is the processor's: it is never saved or trained."""

    main_input_name = "input_features"  # what transformers' ASR pipeline hands to generate()

    def __init__(self, config: SpeechLLMConfig, llm: nn.Module, adaptor: AudioAdaptor):
        super().__init__()
        self.config = config
        # registration order fixes the parameter order (gradient clipping sums norms in it): LLM, then adaptor
        self.llm = llm
        self.adaptor = adaptor
        ids = config.llm
        if ids.bos_token_id is None or ids.eos_token_id is None:
            raise CondituneError("the LLM has no BOS/EOS token id: set model.llm.bos_token_id and eos_token_id")
        self.bos_token_id, self.eos_token_id = int(ids.bos_token_id), int(ids.eos_token_id)
        self.pad_token_id = int(ids.pad_token_id) if ids.pad_token_id is not None else self.eos_token_id
        from transformers import GenerationConfig

        self.generation_config = GenerationConfig(
            max_new_tokens=128,
            num_beams=1,
            do_sample=False,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(
        cls,
        config: SpeechLLMConfig,
        *,
        encoder_dim: int,
        tokenizer=None,
        for_training: bool = True,
        llm: nn.Module | None = None,
    ) -> SpeechLLM:
        """The LLM as ``config`` names it (or ``llm``, an already loaded copy), the trainable selection applied, a
        fresh adaptor and CTC head. Token ids the config leaves open come from ``tokenizer`` (else the LLM's
        config); the returned model's config records them and the sizes."""
        config = copy.deepcopy(config)
        config.validate()
        llm = apply_trainable(llm if llm is not None else load_llm(config.llm), config, for_training=for_training)
        core = core_model(llm)
        _resolve_token_ids(config, tokenizer, core)
        embeddings = core.get_input_embeddings().weight
        config.encoder_dim, config.llm_dim = int(encoder_dim), int(embeddings.shape[1])
        adaptor = AudioAdaptor(
            config.encoder_dim, config.llm_dim, config.adaptor, learn_ctc_table=config.ctc.learn_table
        )
        if config.adaptor.match_embedding_scale:
            adaptor.match_scale(embeddings)
        return cls(config, llm, adaptor)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        for_training: bool = False,
        device: str | torch.device | None = None,
        overrides: dict[str, Any] | None = None,
        llm: nn.Module | None = None,
        **_: Any,  # transformers' loaders pass dtype, revision, ...: the saved config decides
    ) -> SpeechLLM:
        """A saved model (``save_pretrained``, a checkpoint, or a 0.1.0 folder); ``overrides`` as dotted config keys
        (``{"llm.path": ...}`` when the base LLM moved); ``llm``: an already loaded base LLM to adapt (its copy)."""
        from conditune.integrity import verify_manifest

        verify_manifest(directory, missing_ok=True)  # a damaged file: one line naming it, before minutes of loading
        config = SpeechLLMConfig.from_pretrained(directory, overrides)
        if config.encoder_dim is None:
            raise CondituneError(f"{directory}: config records no encoder_dim (not a trained speech model)")
        model = cls.build(config, encoder_dim=config.encoder_dim, for_training=for_training, llm=llm)
        model.load_trained_state(directory)
        if device is not None:
            model.to(device)
        return model

    # ------------------------------------------------------------------ properties

    @property
    def device(self) -> torch.device:
        return self.adaptor.proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.adaptor.proj.weight.dtype

    @property
    def core_llm(self) -> nn.Module:
        return core_model(self.llm)

    @property
    def ctc_head(self) -> CTCHead:
        return self.adaptor.ctc_head

    @property
    def token_embeddings(self) -> torch.Tensor:
        return self.core_llm.get_input_embeddings().weight

    def can_generate(self) -> bool:
        return True

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def llm_trainable_names(self) -> list[str]:
        return [n for n, p in self.llm.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------ training forward

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
            rows.append(torch.cat([audio[b, :n_audio].to(dtype), emb_layer(ids)], dim=0))
            lab = torch.full((n_audio + len(ids),), IGNORE_INDEX, dtype=torch.long, device=device)
            lab[n_audio : n_audio + len(ids) - 1] = ids[1:]  # BOS -> t_1, ..., t_m -> EOS; EOS position: none
            labels.append(lab)
            lengths.append(n_audio + len(ids))
        total = max(lengths)
        embeds = torch.zeros(len(rows), total, rows[0].shape[-1], dtype=dtype, device=device)
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
        logits = _apply_logit_softcap(core, core.get_output_embeddings()(hidden[where]))  # loss positions only
        loss = nn.functional.cross_entropy(logits.float(), targets, reduction="mean")
        return SpeechOutput(loss=loss, num_tokens=int(targets.numel()), labels=batch.labels)

    # ------------------------------------------------------------------ CTC head

    def set_ctc_vocabulary(self, token_ids: Sequence[int] | None) -> None:
        self.ctc_head.set_vocabulary(token_ids, vocabulary_size=self.token_embeddings.shape[0])

    def ctc_loss(
        self, audio: torch.Tensor, audio_lengths: torch.Tensor, token_ids: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        return self.ctc_head.loss(audio, audio_lengths, token_ids, self.token_embeddings)

    def compress(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ctc_head.compress(audio, lengths, self.token_embeddings, readout=self.config.ctc.readout)

    def llm_audio(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The audio positions the LLM reads: all of them, or the CTC-compressed ones (``model.ctc.compress``)."""
        return self.compress(audio, lengths) if self.config.ctc.compress else (audio, lengths)

    @torch.no_grad()
    def ctc_greedy_ids(self, frames: torch.Tensor, frame_lengths: torch.Tensor) -> list[list[int]]:
        """Greedy CTC decoding of the adaptor alone (no LLM): a diagnostic of what the alignment stage learned."""
        with _eval_mode(self):
            audio, lengths = self.adaptor(frames.to(self.device), frame_lengths.to(self.device))
            return self.ctc_head.greedy_ids(audio, lengths, self.token_embeddings)

    # ------------------------------------------------------------------ generation

    def transcript_token_cap(self, audio_lengths: torch.Tensor) -> list[int] | None:
        """Most new tokens each utterance may generate: with compression the LLM reads about one position per spoken
        token, so ``ceil(1.5 n) + 4`` tokens for ``n`` positions cut greedy repetition loops short without
        touching a transcript of normal length. None (no cap beyond ``max_new_tokens``) without compression."""
        if not self.config.ctc.compress:
            return None
        return [math.ceil(1.5 * int(n)) + 4 for n in audio_lengths]

    @torch.no_grad()
    def generate_ids(
        self, frames: torch.Tensor, frame_lengths: torch.Tensor, *, num_beams: int = 1, max_new_tokens: int = 128
    ) -> list[list[int]]:
        """Generated token ids per utterance, cut at EOS (and at :meth:`transcript_token_cap`)."""
        from transformers import GenerationConfig

        with _eval_mode(self):
            device = self.device
            audio, audio_lengths = self.llm_audio(*self.adaptor(frames.to(device), frame_lengths.to(device)))
            caps = self.transcript_token_cap(audio_lengths) or [max_new_tokens] * len(audio_lengths)
            caps = [min(c, max_new_tokens) for c in caps]
            embeds, mask = self._prompt(audio, audio_lengths)
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

    def _prompt(self, audio: torch.Tensor, audio_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``[audio, BOS]`` prompts for generation."""
        emb_layer = self.core_llm.get_input_embeddings()
        dtype = emb_layer.weight.dtype
        bos = emb_layer(torch.tensor([self.bos_token_id], device=audio.device))
        lengths = [int(n) + 1 for n in audio_lengths]
        total = max(lengths)
        embeds = torch.zeros(len(lengths), total, bos.shape[-1], dtype=dtype, device=audio.device)
        mask = torch.zeros(len(lengths), total, dtype=torch.long, device=audio.device)
        for b, n in enumerate(lengths):
            embeds[b, total - n : total - 1] = audio[b, : n - 1].to(dtype)
            embeds[b, total - 1] = bos[0]
            mask[b, total - n :] = 1
        return embeds, mask

    @torch.no_grad()
    def generate(
        self,
        input_features: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        num_beams: int | None = None,
        max_new_tokens: int | None = None,
        generation_config=None,
        **_: Any,
    ) -> torch.Tensor:
        """transformers-style: encoder frames ``[B, T, D]`` (+ mask) -> ``[B, L]`` token ids, padded with the pad id."""
        gen = generation_config or self.generation_config
        lengths = (
            attention_mask.sum(-1)
            if attention_mask is not None
            else torch.full((input_features.shape[0],), input_features.shape[1])
        )
        rows = self.generate_ids(
            input_features,
            lengths.long(),
            num_beams=int(num_beams or gen.num_beams or 1),
            max_new_tokens=int(max_new_tokens or gen.max_new_tokens or 128),
        )
        width = max(1, max(len(r) for r in rows))
        out = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        for b, row in enumerate(rows):
            out[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json``, ``model.safetensors`` (adaptor + CTC head) and the LLM delta (trained tensors)."""
        from safetensors.torch import save

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _absolute_paths(self.config).save(directory)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith("llm.")}
        with atomic_write(directory / WEIGHTS_NAME, "wb") as handle:
            handle.write(save(state))
        names = self.llm_trainable_names()
        if names:
            from conditune.selection.delta import save_delta

            # the fingerprint is taken without the delta's tensors: it equals the untouched base's
            save_delta(self.llm, directory / DELTA_DIR, names=names, base_reference=base_reference(self.config.llm))
        from conditune.integrity import write_manifest

        write_manifest(directory)  # last: size + sha256 of every file, checked before a load

    def load_trained_state(self, directory: str | Path, force: bool = False) -> None:
        """Load the adaptor (with its CTC head) and the LLM delta saved by :meth:`save_pretrained`."""
        from conditune.integrity import verify_manifest

        verify_manifest(directory, missing_ok=True)
        state = {k[len("adaptor.") :]: v for k, v in _read_trained_state(Path(directory)).items()}
        # the CTC vocabulary buffer takes the saved run's size (absent before 2026-12-02: every token)
        saved = state.setdefault("ctc_head.vocabulary", torch.zeros(0, dtype=torch.long))
        self.ctc_head.vocabulary = torch.zeros_like(saved, device=self.ctc_head.vocabulary.device)
        offset = state.setdefault("ctc_head.table_offset", torch.zeros(0, self.ctc_head.blank.shape[0]))
        self.ctc_head.resize_table(offset.shape[0])
        try:
            self.adaptor.load_state_dict(state)
        except RuntimeError as exc:
            raise CondituneError(
                f"{directory}: the adaptor does not fit this configuration: {str(exc).splitlines()[0]}"
            ) from None
        if (Path(directory) / DELTA_DIR).exists():
            from conditune.selection.delta import load_delta

            load_delta(self.llm, Path(directory) / DELTA_DIR, force=force)


# ---------------------------------------------------------------------------------------------- helpers


def _read_trained_state(directory: Path) -> dict[str, torch.Tensor]:
    """``model.safetensors``, or a 0.1.0 ``adaptor.safetensors`` with its keys given today's prefixes."""
    from safetensors.torch import load_file

    file = directory / WEIGHTS_NAME
    legacy = not file.is_file() and (directory / LEGACY_ADAPTOR_NAME).is_file()
    if legacy:
        file = directory / LEGACY_ADAPTOR_NAME
    if not file.is_file():
        raise CondituneError(
            f"{directory}: no {WEIGHTS_NAME} with the adaptor's weights (not a conditune speech model)"
        )
    try:
        state = load_file(str(file))
    except Exception as exc:  # noqa: BLE001 - safetensors reports damage as several exception types
        raise CondituneError(f"{file}: unreadable ({' '.join(str(exc).split())[:200]})") from None
    if legacy:
        state = {f"adaptor.{_LEGACY_CTC_KEYS.get(k, k)}": v for k, v in state.items()}
    return state


def _resolve_token_ids(config: SpeechLLMConfig, tokenizer, core: nn.Module) -> None:
    ids = config.llm
    ids.bos_token_id = _first_id(ids.bos_token_id, getattr(tokenizer, "bos_token_id", None), core.config.bos_token_id)
    ids.eos_token_id = _first_id(ids.eos_token_id, getattr(tokenizer, "eos_token_id", None), core.config.eos_token_id)
    ids.pad_token_id = _first_id(
        ids.pad_token_id,
        getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None,
        getattr(core.config, "pad_token_id", None) if tokenizer is None else None,
        ids.eos_token_id,
    )


def _absolute_paths(config: SpeechLLMConfig) -> SpeechLLMConfig:
    """A copy whose local paths are absolute (``demo:`` names and hub ids stay as they are)."""
    config = copy.deepcopy(config)
    if not config.encoder.path.startswith("demo:"):
        config.encoder.path = str(Path(config.encoder.path).resolve())
    if not config.llm.path.startswith("demo:") and Path(config.llm.path).exists():
        config.llm.path = str(Path(config.llm.path).resolve())
    names_file = config.trainable.names_file
    if names_file and Path(names_file).exists():
        config.trainable.names_file = str(Path(names_file).resolve())
    return config


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


class _eval_mode:
    """Switch a module to eval mode for a block, restoring its training flag afterwards."""

    def __init__(self, module: nn.Module):
        self.module, self.was = module, module.training

    def __enter__(self):
        self.module.eval()
        return self.module

    def __exit__(self, *exc) -> bool:
        self.module.train(self.was)
        return False
