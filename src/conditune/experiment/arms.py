"""What each arm trains, decided from one scan of the LLM, and LoRA ranks matched in parameter count.

Arms (``experiment.arms``):

* ``lowest-kappa`` / ``highest-kappa``: the N tensors with the smallest / largest κ (the paper's pair);
* ``random``: N tensors drawn at random, a different draw per seed (``select(..., seed=seed)``);
* ``lowest-kappa-norm``: the N smallest κ/κ_mp (shape effect removed);
* ``adaptor-only``: the LLM frozen (``trainable.mode: none``);
* ``lora``: PEFT LoRA on ``experiment.lora_targets`` (every linear projection by default), its rank
  chosen so that its trainable parameter count matches the ``lowest-kappa`` arm's;
* ``kappa-lora``: LoRA on the *modules* of the lowest-κ selection (tensor names minus ``.weight``,
  linear layers only: an embedding / ``lm_head`` in the selection is dropped), rank matched the same way;
* ``full``: every LLM tensor.

Every arm also trains the same adaptor. Matching: a LoRA pair on a ``(out, in)`` linear layer holds
``r·(in + out)`` parameters, so with S = Σ(in + out) over the target modules rank r gives r·S exactly
(computed from the scan's shapes, checked against the built model in the tests). The base rank is
r = ⌊P/S⌋ and the remainder is spent greedily on single modules at rank r + 1 (PEFT ``rank_pattern``),
which lands within one module's (in + out) of the target P — far inside the 5 % tolerance once P ≫ S.
``lora_alpha`` is ``lora_alpha_ratio · r`` per module, so every module has the same scale α/r.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from conditune.errors import CondituneError
from conditune.experiment.config import ExperimentConfig

SELECTION_ARMS = {  # arm -> (policy, score)
    "lowest-kappa": ("lowest", "kappa"),
    "highest-kappa": ("highest", "kappa"),
    "random": ("random", "kappa"),
    "lowest-kappa-norm": ("lowest", "kappa_norm"),
}


@dataclass
class ArmPlan:
    arm: str
    trainable: dict[str, Any]  # the model.trainable section for this arm
    llm_params: int | None  # trainable LLM parameters as computed from the scan (None: counted at training)
    note: str = ""
    names: list[str] = field(default_factory=list)  # selected tensors (selection arms) or LoRA modules


def load_scan(cfg: ExperimentConfig, log=lambda msg: None):
    """Scan records of the LLM: from ``experiment.scan``, or a (cached) scan of ``model.llm``."""
    from conditune.scanning.records import read_records

    if cfg.experiment.scan:
        return read_records(cfg.experiment.scan)
    from conditune.scanning import scan_source
    from conditune.speech.loading import llm_source

    source = llm_source(cfg.model.llm)
    log(f"scanning {source} for condition numbers (cached)")
    return scan_source(source)


def linear_modules(records) -> dict[str, tuple[int, int]]:
    """Module name -> (out, in) of every 2-D ``*.weight`` that LoRA can wrap (embeddings and lm_head left out)."""
    out: dict[str, tuple[int, int]] = {}
    for r in records:
        if not r.name.endswith(".weight") or len(r.shape) != 2 or "[" in r.name:
            continue
        module = r.name[: -len(".weight")]
        if "embed" in module.split(".")[-1] or module.split(".")[-1] in ("lm_head", "wte", "wpe"):
            continue
        out[module] = (int(r.shape[0]), int(r.shape[1]))
    return out


def lora_count(shapes: dict[str, tuple[int, int]], r: int, extra: Sequence[str] = ()) -> int:
    """Exact LoRA parameter count: rank r on every module, r + 1 on those in ``extra``."""
    return r * sum(o + i for o, i in shapes.values()) + sum(shapes[m][0] + shapes[m][1] for m in extra)


def match_lora(
    shapes: dict[str, tuple[int, int]], target: int, rank: Any, alpha_ratio: float
) -> tuple[dict[str, Any], int]:
    """A ``trainable.lora`` section over ``shapes`` whose parameter count is closest to ``target``."""
    if not shapes:
        raise CondituneError("LoRA arm: no linear module to wrap among the targets")
    total = sum(o + i for o, i in shapes.values())
    extra: list[str] = []
    if rank == "match":
        r = max(1, target // total)
        left = target - r * total
        if left > 0:  # largest modules first, each taken if it does not overshoot (a greedy fill)
            for module in sorted(shapes, key=lambda m: (-(sum(shapes[m])), m)):
                cost = sum(shapes[module])
                if cost <= left:
                    extra.append(module)
                    left -= cost
    else:
        r = int(rank)
    pattern = {re.escape(m): r + 1 for m in extra}
    section = {
        "r": r,
        "alpha": _alpha(alpha_ratio, r),
        "dropout": 0.0,
        "rank_pattern": pattern,
        "alpha_pattern": {k: _alpha(alpha_ratio, v) for k, v in pattern.items()},
    }
    return section, lora_count(shapes, r, extra)


def _alpha(ratio: float, r: int) -> int:
    return max(1, int(round(ratio * r)))


def plan_arms(cfg: ExperimentConfig, records, seed: int, meta: dict | None = None) -> dict[str, ArmPlan]:
    """What every configured arm trains for ``seed`` (only ``random`` depends on the seed)."""
    from conditune.selection import select

    e = cfg.experiment
    linear = linear_modules(records)
    total_llm = sum(int(r.numel) for r in records)

    def selection(arm: str):
        policy, score = SELECTION_ARMS[arm]
        sel = select(records, policy, count=e.count, score=score, exclude=e.exclude, seed=seed, meta=meta)
        if len(sel.names) < e.count:
            raise CondituneError(
                f"arm {arm}: only {len(sel.names)} tensors can be selected, experiment.count is {e.count}"
            )
        return sel

    lowest = selection("lowest-kappa")
    plans: dict[str, ArmPlan] = {}
    for arm in e.arms:
        if arm in SELECTION_ARMS:
            sel = lowest if arm == "lowest-kappa" else selection(arm)
            plans[arm] = ArmPlan(
                arm,
                {"mode": "names", "names": list(sel.names)},
                sel.selected_params,
                f"{len(sel.names)} tensors, {sel.share:.1%} of the LLM",
                list(sel.names),
            )
        elif arm == "adaptor-only":
            plans[arm] = ArmPlan(arm, {"mode": "none"}, 0, "LLM frozen")
        elif arm == "full":
            plans[arm] = ArmPlan(arm, {"mode": "all"}, total_llm, "every LLM tensor")
        elif arm in ("lora", "kappa-lora"):
            if arm == "lora":
                suffixes = tuple(e.lora_targets)
                shapes = {m: s for m, s in linear.items() if m.split(".")[-1] in suffixes}
                if not shapes:
                    raise CondituneError(
                        f"arm lora: no linear module of the LLM ends in {', '.join(suffixes)} "
                        "(set experiment.lora_targets)"
                    )
                targets, rank = list(e.lora_targets), e.lora_rank
            else:
                modules = [n[: -len(".weight")] for n in lowest.names if n.endswith(".weight")]
                shapes = {m: linear[m] for m in modules if m in linear}
                targets, rank = sorted(shapes), e.kappa_lora_rank
            section, count = match_lora(shapes, lowest.selected_params, rank, e.lora_alpha_ratio)
            error = count / lowest.selected_params - 1 if lowest.selected_params else 0.0
            if rank == "match" and abs(error) > e.match_tolerance:
                raise CondituneError(
                    f"arm {arm}: cannot match lowest-kappa's {lowest.selected_params} parameters within "
                    f"{e.match_tolerance:.0%} (best {count}, {error:+.1%}); change experiment.count "
                    f"or experiment.{'lora_targets' if arm == 'lora' else 'kappa_lora_rank'}"
                )
            section["target_modules"] = targets
            dropped = len(lowest.names) - len(shapes) if arm == "kappa-lora" else 0
            note = (
                f"{len(shapes)} modules, r={section['r']}"
                + (f" (+1 on {len(section['rank_pattern'])})" if section["rank_pattern"] else "")
                + f", {error:+.2%} vs lowest-kappa"
                + (f", {dropped} non-linear tensors of the selection dropped" if dropped else "")
            )
            plans[arm] = ArmPlan(arm, {"mode": "lora", "lora": section}, count, note, sorted(shapes))
    return plans
