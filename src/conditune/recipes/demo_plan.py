"""The demo's budget: speeds measured in this run, and the plan they give (data size, alignment and main steps).

Nothing here is a timing constant. :class:`Speeds` holds what a short calibration measured on this machine
(synthesis and encoding per utterance, one alignment step, one main step, building the model, generation
and the forgetting probes per item); :func:`plan_budget` turns the seconds left into a :class:`DemoPlan`:

* the evaluation reserve: building the model again, transcribing the test sets (and Whisper's own
  decoder on them), the forgetting probes, the report;
* the rest is set-up of the data plus training. Training time T is split between the alignment stage
  (``demo.align_share`` of it) and the main steps; the training set is what the main steps can read
  ``demo.main_epochs`` times (so a bigger budget means more data, not more passes over the same
  sentences), and making it costs synthesis + encoding per utterance, so
  ``T + setup(T) = left``, solved for T.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class Speeds:
    """Seconds per unit, measured in this run (:func:`conditune.recipes.demo.calibrate`)."""

    synth_s: float  # one utterance synthesised (all jobs together)
    encode_s: float  # one utterance through the frozen encoder into the feature cache
    align_step_s: float  # one alignment (CTC) step at the recipe's batch
    main_step_s: float  # one main step at the recipe's batch
    build_s: float  # building the speech model (LLM de-quantisation, encoder)
    generate_s: float  # transcribing one utterance
    reference_s: float  # Whisper's own decoder on one utterance
    forgetting_s: float  # one held-out sentence through base + adapted LLM
    agreement_s: float  # one instruction prompt, greedy, base + adapted

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(self).items()}


@dataclass
class DemoPlan:
    train_per_language: int
    dev_per_language: int
    test_per_language: int
    heldout_voice_per_language: int
    align_steps: int
    main_steps: int
    train_seconds: float  # the trainer's wall-clock limit (a safety net: the steps are planned to fit)
    setup_seconds: float  # planned synthesis + encoding of what is not made yet
    reserve_seconds: float  # planned evaluation and report

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def evaluation_reserve(speeds: Speeds, *, languages: int, test: int, heldout_voice: int, heldout_texts: int,
                       prompts: int, reference: bool) -> float:  # fmt: skip
    """Seconds for the final evaluation: the model built again, both test sets transcribed (and by Whisper's
    decoder), the held-out texts and prompts through base + adapted LLM, 10 s for the report."""
    utterances = languages * (test + heldout_voice)
    return (
        speeds.build_s
        + utterances * (speeds.generate_s + (speeds.reference_s if reference else 0.0))
        + languages * heldout_texts * speeds.forgetting_s
        + prompts * speeds.agreement_s
        + 10.0
    )


def plan_budget(
    left_s: float,
    speeds: Speeds,
    *,
    languages: int,
    batch: int,
    test: int,
    heldout_voice: int,
    dev: int,
    evaluations: int,
    heldout_texts: int,
    prompts: int,
    reference: bool,
    align_share: float,
    main_epochs: float,
    max_train_per_language: int,
    made_per_language: int = 0,
) -> DemoPlan | None:
    """The largest plan that fits ``left_s`` seconds; None when not even a minimal one does.

    ``made_per_language``: utterances per language already synthesised and encoded (the calibration's)."""
    reserve = evaluation_reserve(speeds, languages=languages, test=test, heldout_voice=heldout_voice,
                                 heldout_texts=heldout_texts, prompts=prompts, reference=reference)  # fmt: skip
    per_utt = speeds.synth_s + speeds.encode_s
    fixed_utts = languages * (test + heldout_voice + dev) - languages * made_per_language
    # training also builds the model and evaluates dev `evaluations` times
    fixed = reserve + speeds.build_s + evaluations * languages * dev * speeds.generate_s + max(0, fixed_utts) * per_utt
    room = left_s - fixed
    # T (training compute) reads (1 - share) T / main_step_s * batch / main_epochs utterances, each costing per_utt
    utts_per_second = (1.0 - align_share) / speeds.main_step_s * batch / main_epochs
    train_s = room / (1.0 + per_utt * utts_per_second)
    train_total = min(languages * max_train_per_language, int(utts_per_second * train_s))
    if train_s <= 0 or train_total < languages * batch:
        return None
    if train_total == languages * max_train_per_language:  # the data is capped: the rest of the time trains
        train_s = room - train_total * per_utt
    main_steps = max(1, int((1.0 - align_share) * train_s / speeds.main_step_s))
    align_steps = int(align_share * train_s / speeds.align_step_s)
    return DemoPlan(
        train_per_language=max(batch, train_total // languages),
        dev_per_language=dev,
        test_per_language=test,
        heldout_voice_per_language=heldout_voice,
        align_steps=align_steps,
        main_steps=main_steps,
        train_seconds=math.ceil(train_s + speeds.build_s + evaluations * languages * dev * speeds.generate_s),
        setup_seconds=round((train_total + max(0, fixed_utts)) * per_utt, 1),
        reserve_seconds=round(reserve, 1),
    )
