"""The demo's calibration: this machine's speeds, measured on the first utterances of the real data set.

:func:`calibrate` synthesises the dev and test sets and ``demo.calibration_utterances`` training utterances
per language (the final set reuses them), encodes them, and times a few alignment and main steps of the
real model on them, transcription, the forgetting probes and Whisper's own decoder. :func:`plan_for` then
asks :func:`~conditune.recipes.demo_plan.plan_budget` for the plan that fits what is left.
"""

from __future__ import annotations

import copy
import shutil
import statistics
import time
from pathlib import Path

from conditune.config import load_config
from conditune.errors import CondituneError
from conditune.recipes.demo_plan import DemoPlan, Speeds, plan_budget
from conditune.training.config import TrainConfig, training_part

TIMED_STEPS = 4  # per phase; the first is left out of the mean (one-off allocations)


def existing_train_utterances(speech_dir: Path) -> int:
    """Training utterances per language a previous run left in ``speech_dir`` (they cost nothing again)."""
    from conditune.data.manifest import read_manifest

    manifest = speech_dir / "train.jsonl"
    if not manifest.is_file():
        return 0
    counts: dict[str, int] = {}
    for utt in read_manifest(manifest, warn=False).utterances:
        counts[utt.language] = counts.get(utt.language, 0) + 1
    return min(counts.values(), default=0)


def calibrate(con, cfg, speech_dir: Path, names_file: Path, *, skip_timing: bool = False) -> tuple[Speeds | None, int]:
    """(speeds, training utterances per language already made) — speeds None with ``skip_timing`` (fixed plans)."""
    from conditune.recipes.demo import encode, synthesize

    d = cfg.demo
    made = existing_train_utterances(speech_dir)
    started = time.monotonic()
    speech, synthesized = synthesize(con, cfg, speech_dir, d.train_per_language or max(d.calibration_utterances, made))
    synth_seconds = time.monotonic() - started
    processor = _processor(cfg)
    started = time.monotonic()
    splits = [speech[s] for s in ("train", "dev", "test", "test_heldout_voice") if s in speech]
    encoded = encode(con, processor, splits, d.progress, cfg.data.encode_batch)
    encode_seconds = time.monotonic() - started
    if skip_timing:
        return None, made
    synth_s = synth_seconds / synthesized if synthesized >= 8 else _probe_synthesis(cfg)
    encode_s = encode_seconds / encoded if encoded >= 8 else _probe_encoding(processor, speech["dev"])
    timed = time_training(con, cfg, speech, names_file, processor)
    speeds = Speeds(synth_s=synth_s, encode_s=encode_s + timed.pop("augment_s"), **timed)
    con.log("speeds: " + ", ".join(f"{k} {v:.3g} s" for k, v in speeds.to_dict().items()))
    return speeds, max(made, d.calibration_utterances)


def plan_for(con, cfg, speeds: Speeds, made_per_language: int) -> DemoPlan:
    d = cfg.demo
    augment = cfg.data.augment
    copies = 0 if augment is None else augment.copies - (0 if augment.keep_original else 1)
    plan = plan_budget(
        con.left(),
        speeds,
        languages=2,
        batch=cfg.data.max_batch,
        test=d.test_per_language,
        heldout_voice=d.heldout_voice_per_language or d.test_per_language,
        dev=min(d.dev_per_language, (cfg.evaluation.max_utterances or 2 * d.dev_per_language) // 2),
        evaluations=4,
        heldout_texts=d.heldout,
        prompts=d.agreement_prompts,
        reference=d.whisper_reference,
        align_share=d.align_share,
        main_epochs=d.main_epochs * (1 + copies),
        max_train_per_language=d.max_train_per_language,
        made_per_language=made_per_language,
    )
    if plan is None:
        raise CondituneError(f"--minutes {d.minutes:g} leaves no time to train after the calibration "
                             f"({clock_left(con)} left): use --minutes 10 or more")  # fmt: skip
    con.log(f"plan: {plan.train_per_language} training utterances per language, {plan.align_steps} alignment + "
            f"{plan.main_steps} main steps; set-up {plan.setup_seconds:.0f} s, evaluation {plan.reserve_seconds:.0f} s")  # fmt: skip
    return plan


def clock_left(con) -> str:
    from conditune.recipes.demo import clock

    return clock(max(0.0, con.left()))


def time_training(con, cfg, speech: dict, names_file: Path, processor) -> dict[str, float]:
    """Seconds per alignment step, main step, model build, transcribed utterance, probe item and augmented copy,
    from a few steps of the real model on the calibration utterances (nothing is saved)."""
    from conditune.evaluation.pair import load_base_llm
    from conditune.training.trainer import Trainer

    work = Path(cfg.demo.output) / ".calibration"
    overrides = {"data.train": str(speech["train"]), "data.dev": str(speech["dev"]), "data.augment": None,
                 "model.trainable.names_file": str(names_file), "training.align_steps": TIMED_STEPS,
                 "training.max_steps": TIMED_STEPS, "evaluation.max_utterances": 4, "output.dir": str(work),
                 "output.overwrite": True, "output.progress": False, "output.tensorboard": False}  # fmt: skip
    train_cfg = load_config(TrainConfig, training_part(cfg), overrides)
    try:
        started = time.monotonic()
        trainer = Trainer(train_cfg, llm=copy.deepcopy(load_base_llm(train_cfg.model.llm)))
        trainer.setup()
        build_s = time.monotonic() - started
        step_s = _time_steps(trainer)
        extra = _time_evaluation(trainer, speech, cfg)
        extra["augment_s"] = _time_augmentation(trainer, cfg)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"build_s": build_s, **step_s, **extra}


def _time_steps(trainer) -> dict[str, float]:
    times: dict[bool, list[float]] = {True: [], False: []}
    trainer.batches = trainer.epoch_batches(0)
    trainer.wrapped.train()
    while trainer.state.step < trainer.total_steps:
        aligning = trainer.state.step < trainer.config.training.align_steps
        began = time.monotonic()
        trainer.train_step()
        times[aligning].append(time.monotonic() - began)
    mean = {k: statistics.fmean(v[1:] or v) for k, v in times.items()}
    return {"align_step_s": mean[True], "main_step_s": mean[False]}


def _time_evaluation(trainer, speech: dict, cfg) -> dict[str, float]:
    from conditune.evaluation.forgetting import DEFAULT_INSTRUCTIONS, ForgettingProbe, read_texts
    from conditune.evaluation.pair import load_base_llm
    from conditune.evaluation.reference import whisper_reference
    from conditune.evaluation.transcription import evaluate_examples

    examples = trainer.dev_examples[:4]
    started = time.monotonic()
    evaluate_examples(trainer.model, trainer.processor, examples, max_new_tokens=cfg.evaluation.max_new_tokens)
    generate_s = (time.monotonic() - started) / max(1, len(examples))
    base = load_base_llm(trainer.config.model.llm)
    texts = read_texts(speech["heldout_en"], limit=4)
    started = time.monotonic()
    ForgettingProbe(texts={"en": texts}, batch_size=16).measure(base, trainer.model.llm, trainer.processor.tokenizer)
    forgetting_s = (time.monotonic() - started) / max(1, len(texts))
    started = time.monotonic()
    ForgettingProbe(prompts={"en": DEFAULT_INSTRUCTIONS["en"][:1]}).measure(
        base, trainer.model.llm, trainer.processor.tokenizer
    )
    agreement_s = time.monotonic() - started
    reference_s = 0.0
    if cfg.demo.whisper_reference:
        started = time.monotonic()
        whisper_reference(examples[:2], trainer.processor.encoder)
        reference_s = (time.monotonic() - started) / max(1, len(examples[:2]))
    return {"generate_s": generate_s, "forgetting_s": forgetting_s, "agreement_s": agreement_s,
            "reference_s": reference_s}  # fmt: skip


def _time_augmentation(trainer, cfg) -> float:
    """Seconds to augment and encode one utterance's copies (0 without data.augment): part of its cost."""
    from conditune.data.examples import augment_examples
    from conditune.speech.features import FeatureCache
    from conditune.speech.processing import SpeechFeatureExtractor, SpeechProcessor

    augment = cfg.data.augment
    if augment is None or not augment.copies:
        return 0.0
    encoder = trainer.processor.encoder  # a processor whose cache is memory only: timing fills no cache
    scratch = SpeechProcessor(feature_extractor=SpeechFeatureExtractor(encoder, FeatureCache(encoder, None)),
                              tokenizer=trainer.processor.tokenizer)  # fmt: skip
    examples = trainer.train_examples[:4]
    started = time.monotonic()
    augment_examples(examples, scratch, augment, seed=cfg.training.seed)
    return (time.monotonic() - started) / max(1, len(examples))


def _probe_synthesis(cfg) -> float:
    from conditune.data.synth import measure_synthesis_speed
    from conditune.machine import usable_cores

    speed = measure_synthesis_speed(heldout_voices=cfg.synth.heldout_voices)
    return statistics.fmean(speed.per_language.values()) / usable_cores()


def _probe_encoding(processor, manifest: Path) -> float:
    from conditune.data.examples import read_manifests
    from conditune.speech.features import FeatureCache

    utts, _ = read_manifests(manifest)
    scratch = FeatureCache(processor.encoder, None)
    started = time.monotonic()
    scratch.prepare([u.audio for u in utts[:8]])
    return (time.monotonic() - started) / max(1, len(utts[:8]))


def _processor(cfg):
    from conditune.models import conditune_home
    from conditune.speech.processing import SpeechProcessor

    return SpeechProcessor.from_config(cfg.model, cache_dir=cfg.data.feature_cache or conditune_home() / "features")
