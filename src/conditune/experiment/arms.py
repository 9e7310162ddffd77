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
* ``full``: every LLM tensor;
* ``spectrum``: Spectrum's rule, N tensors: the highest signal-to-noise ratio of the singular values above the
  Marchenko–Pastur edge (:func:`conditune.selection.spectrum_snr`), shared out over tensor kinds in proportion to
  their number (``select(..., "highest", score="snr", per_kind=True)``), from conditune's own full-spectrum scan;
* ``pissa``: PEFT LoRA with ``init_lora_weights = experiment.pissa_init`` (PiSSA: the top singular triples train,
  the residual is frozen) on the ``lora`` arm's targets at its matched ranks;
* ``osf``: PEFT orthogonal subspace fine-tuning on ``experiment.osf_targets``: each matrix trains its bottom
  r_low singular directions (r_low·(out + in + 1) parameters), the top ones frozen; r_low matched in count
  (:func:`match_osf`).

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
    "spectrum": ("highest", "snr"),  # per tensor kind, as Spectrum does
}
PER_KIND_ARMS = ("spectrum",)


@dataclass
class ArmPlan:
    arm: str
    trainable: dict[str, Any]  # the model.trainable section for this arm
    llm_params: int | None  # trainable LLM parameters as computed from the scan (None: counted at training)
    note: str = ""
    names: list[str] = field(default_factory=list)  # selected tensors (selection arms) or LoRA modules


def load_scan(cfg: ExperimentConfig, log=lambda msg: None, *, spectrum: str = "fast"):
    """Scan records of the LLM: from ``experiment.scan``, or a (cached) scan of ``model.llm``. ``spectrum="full"``
    (the ``spectrum`` arm): records with every singular value, from the singular values saved beside
    ``experiment.scan`` when they are there, else from a full-spectrum scan (cached under its own key)."""
    from conditune.scanning.records import attach_spectra, read_records

    if cfg.experiment.scan:
        records, meta = read_records(cfg.experiment.scan)
        if spectrum == "fast" or attach_spectra(records, cfg.experiment.scan):
            return records, meta
    from conditune.scanning import scan_source
    from conditune.speech.loading import llm_source

    source = llm_source(cfg.model.llm)
    log(f"scanning {source} for {'the full spectrum' if spectrum == 'full' else 'condition numbers'} (cached)")
    return scan_source(source, spectrum=spectrum)


def needs_full_spectrum(cfg: ExperimentConfig) -> bool:
    arms = set(cfg.experiment.arms) | set(cfg.experiment.long_horizon.arms)
    return any(SELECTION_ARMS.get(a, ("", ""))[1] == "snr" for a in arms)


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


def capped_ranks(costs: dict[str, int], caps: dict[str, int], target: int) -> dict[str, int]:
    """Per-module ranks whose total ``Σ rank·cost`` comes closest to ``target`` from below, each at most its cap:
    the same rank r everywhere (the largest that fits, capped), then single modules at +1, costliest first."""
    r = 1
    while r < max(caps.values()) and sum(min(r + 1, caps[m]) * c for m, c in costs.items()) <= target:
        r += 1
    ranks = {m: min(r, caps[m]) for m in costs}
    left = target - sum(ranks[m] * c for m, c in costs.items())
    for module in sorted(costs, key=lambda m: (-costs[m], m)):
        if ranks[module] < caps[module] and costs[module] <= left:
            ranks[module] += 1
            left -= costs[module]
    return ranks


def match_pissa(
    shapes: dict[str, tuple[int, int]], target: int, rank: Any, alpha_ratio: float
) -> tuple[dict[str, Any], int]:
    """The ``lora`` arm's section when every rank fits (PiSSA takes r singular triples, so at most min(out, in) of
    them: PEFT shrinks a larger rank to that); otherwise ranks matched again with min(out, in) as each cap."""
    section, count = match_lora(shapes, target, rank, alpha_ratio)
    caps = {m: min(o, i) for m, (o, i) in shapes.items()}
    ranks = {m: section["r"] for m in shapes}
    ranks.update({m: v for m in shapes for k, v in section["rank_pattern"].items() if k == re.escape(m)})
    if all(ranks[m] <= caps[m] for m in shapes):
        return section, count
    if rank == "match":
        ranks = capped_ranks({m: o + i for m, (o, i) in shapes.items()}, caps, target)
    else:
        ranks = {m: min(int(rank), caps[m]) for m in shapes}
    r = max(ranks.values())
    pattern = {re.escape(m): v for m, v in sorted(ranks.items()) if v != r}
    section.update(r=r, alpha=_alpha(alpha_ratio, r), rank_pattern=pattern,
                   alpha_pattern={k: _alpha(alpha_ratio, v) for k, v in pattern.items()})  # fmt: skip
    return section, sum(ranks[m] * (o + i) for m, (o, i) in shapes.items())


def osf_count(shapes: dict[str, tuple[int, int]], ranks: dict[str, int]) -> int:
    """Exact OSF parameter count: U_low (out × r), S_low (r), V_low (r × in) per module, r its trainable rank."""
    return sum(ranks[m] * (o + i + 1) for m, (o, i) in shapes.items())


def match_osf(shapes: dict[str, tuple[int, int]], target: int, rank: Any) -> tuple[dict[str, Any], int, dict]:
    """A ``trainable.osf`` section over ``shapes`` whose count is closest to ``target`` from below.

    Every module trains the same r_low (capped at min(out, in) − 1: OSF keeps at least one direction frozen), the
    largest whose count fits; the remainder goes to single modules at r_low + 1, largest first, as for LoRA. PEFT
    takes the frozen rank per module, so each module gets ``rank_pattern`` = min(out, in) − its r_low."""
    if not shapes:
        raise CondituneError("OSF arm: no linear module to wrap among the targets")
    caps = {m: min(o, i) - 1 for m, (o, i) in shapes.items()}
    if rank == "match":
        ranks = capped_ranks({m: o + i + 1 for m, (o, i) in shapes.items()}, caps, target)
    else:
        ranks = {m: max(1, min(int(rank), c)) for m, c in caps.items()}
    pattern = {rf"(?:^|\.){re.escape(m)}$": min(shapes[m]) - ranks[m] for m in sorted(shapes)}
    return {"effective_rank": None, "rank_pattern": pattern}, osf_count(shapes, ranks), ranks


def plan_arms(
    cfg: ExperimentConfig, records, seed: int, meta: dict | None = None, *, full_records=None, arms=None
) -> dict[str, ArmPlan]:
    """What every configured arm (or each of ``arms``) trains for ``seed`` (only ``random`` depends on the seed).
    ``full_records``: a full-spectrum scan, for the ``spectrum`` arm."""
    planner = _Planner(cfg, records, seed, meta, full_records)
    return {arm: planner.plan(arm) for arm in (arms if arms is not None else cfg.experiment.arms)}


class _Planner:
    def __init__(self, cfg: ExperimentConfig, records, seed: int, meta, full_records):
        self.cfg, self.e, self.records, self.seed, self.meta = cfg, cfg.experiment, records, seed, meta
        self.full_records = full_records
        self.linear = linear_modules(records)
        self.lowest = self.selection("lowest-kappa")
        self.target = self.lowest.selected_params

    def selection(self, arm: str):
        from conditune.selection import select

        policy, score = SELECTION_ARMS[arm]
        records = self.records
        if score == "snr":
            if self.full_records is None:
                raise CondituneError(f"arm {arm}: needs a full-spectrum scan of the LLM")
            records = self.full_records
        sel = select(records, policy, count=self.e.count, score=score, exclude=self.e.exclude, seed=self.seed,
                     meta=self.meta, per_kind=arm in PER_KIND_ARMS)  # fmt: skip
        if len(sel.names) < self.e.count:
            raise CondituneError(
                f"arm {arm}: only {len(sel.names)} tensors can be selected, experiment.count is {self.e.count}"
            )
        return sel

    def plan(self, arm: str) -> ArmPlan:
        if arm in SELECTION_ARMS:
            sel = self.lowest if arm == "lowest-kappa" else self.selection(arm)
            note = f"{len(sel.names)} tensors, {sel.share:.1%} of the LLM"
            if arm in PER_KIND_ARMS:
                note += ", per kind: " + ", ".join(f"{k} {n}" for k, (n, _) in sorted(sel.per_kind().items()))
            return ArmPlan(arm, {"mode": "names", "names": list(sel.names)}, sel.selected_params, note, list(sel.names))
        if arm == "adaptor-only":
            return ArmPlan(arm, {"mode": "none"}, 0, "LLM frozen (no LLM parameters: nothing to match)")
        if arm == "full":
            total = sum(int(r.numel) for r in self.records)
            return ArmPlan(arm, {"mode": "all"}, total, "every LLM tensor (the whole LLM: nothing to match)")
        if arm in ("lora", "kappa-lora", "pissa"):
            return self.lora(arm)
        if arm == "osf":
            return self.osf()
        raise CondituneError(f"unknown arm {arm!r}")

    def targets(self, arm: str, suffixes: Sequence[str], key: str) -> dict[str, tuple[int, int]]:
        shapes = {m: s for m, s in self.linear.items() if m.split(".")[-1] in tuple(suffixes)}
        if not shapes:
            raise CondituneError(
                f"arm {arm}: no linear module of the LLM ends in {', '.join(suffixes)} (set experiment.{key})"
            )
        return shapes

    def check_match(self, arm: str, count: int, rank: Any, key: str) -> float:
        error = count / self.target - 1 if self.target else 0.0
        if rank == "match" and abs(error) > self.e.match_tolerance:
            raise CondituneError(
                f"arm {arm}: cannot match lowest-kappa's {self.target} parameters within "
                f"{self.e.match_tolerance:.0%} (best {count}, {error:+.1%}); change experiment.count or experiment.{key}"
            )
        return error

    def lora(self, arm: str) -> ArmPlan:
        e = self.e
        if arm in ("lora", "pissa"):
            shapes = self.targets(arm, e.lora_targets, "lora_targets")
            targets, rank, key = list(e.lora_targets), e.lora_rank, "lora_targets"
        else:
            modules = [n[: -len(".weight")] for n in self.lowest.names if n.endswith(".weight")]
            shapes = {m: self.linear[m] for m in modules if m in self.linear}
            targets, rank, key = sorted(shapes), e.kappa_lora_rank, "kappa_lora_rank"
        match = match_pissa if arm == "pissa" else match_lora
        section, count = match(shapes, self.target, rank, e.lora_alpha_ratio)
        error = self.check_match(arm, count, rank, key)
        section["target_modules"] = targets
        if arm == "pissa":
            section["init"] = e.pissa_init
        dropped = len(self.lowest.names) - len(shapes) if arm == "kappa-lora" else 0
        others = sorted(set(section["rank_pattern"].values()))
        note = (
            f"{len(shapes)} modules, r={section['r']}"
            + (
                f" (+1 on {len(section['rank_pattern'])})"
                if others == [section["r"] + 1]
                else f" ({len(section['rank_pattern'])} at r={'/'.join(map(str, others))})"
                if others
                else ""
            )
            + (f", init {e.pissa_init}" if arm == "pissa" else "")
            + f", {error:+.2%} vs lowest-kappa"
            + (f", {dropped} non-linear tensors of the selection dropped" if dropped else "")
        )
        return ArmPlan(arm, {"mode": "lora", "lora": section}, count, note, sorted(shapes))

    def osf(self) -> ArmPlan:
        e = self.e
        shapes = self.targets("osf", e.osf_targets, "osf_targets")
        section, count, ranks = match_osf(shapes, self.target, e.osf_rank)
        error = self.check_match("osf", count, e.osf_rank, "osf_rank")
        section["target_modules"] = list(e.osf_targets)
        low, high = min(ranks.values()), max(ranks.values())
        note = (f"{len(shapes)} modules, trainable rank {low}" + (f"–{high}" if high != low else "")
                + f" per matrix, {error:+.2%} vs lowest-kappa")  # fmt: skip
        return ArmPlan("osf", {"mode": "osf", "osf": section}, count, note, sorted(shapes))
