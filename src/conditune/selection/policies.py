"""Choosing which tensors to fine-tune from a scan.

Rules, in the order they apply:

* Candidates are records with ``status == "ok"``. Skipped tensors (1-D norms, biases) and flagged ones
  are never selected, but every record counts towards the size of the model.
* ``--include`` / ``--exclude`` are regexes matched with :func:`re.search` against the *parameter*
  name (see slices below). With includes, a name must match at least one; any exclude match drops it.
  Embeddings and ``lm_head`` are ordinary candidates unless excluded.
* Ranking: ``lowest`` / ``threshold`` by ascending score, ``highest`` by descending score, ``random`` by
  a seeded shuffle. Ties (and the order before the shuffle) are broken by name, so a selection is
  reproducible. Records whose score is missing or NaN cannot be ranked and are left out (``random``
  does not need a score).
* Slices: a record named ``name[i]`` is expert ``i`` of the fused 3-D tensor ``name``. Such a
  parameter is one candidate, reached through its ok slices and ranked by its best slice (lowest score
  for ``lowest``/``threshold``, highest for ``highest``); it is selected when any of its slices would
  be, and counted once with its full size (all slices), since a parameter trains as a whole.
* Size: ``count`` = number of parameters (tensors); ``budget`` = fraction of all parameters of the
  model; ``params`` = an absolute number of parameters. A parameter-size limit walks the ranking and
  takes every tensor that still fits, skipping ones that would overflow it, so one huge low-κ tensor
  (an embedding) does not leave the budget empty. Without any size, ``threshold`` takes every tensor
  with score <= t and the other policies take :data:`DEFAULT_COUNT` tensors.
* Scores: a record column (``kappa``, ``kappa_norm``, ``log2_volume``), or ``snr``, Spectrum's signal-to-noise
  ratio (:func:`spectrum_snr`), computed from the record's full spectrum (``extra["singular_values"]``, present
  after a scan with ``spectrum="full"``); Spectrum itself keeps the highest SNR per tensor kind, i.e.
  ``select(records, "highest", score="snr", per_kind=True, ...)``.
* ``per_kind``: the size is shared out over tensor kinds (``self_attn.q_proj``, ``mlp.down_proj``,
  ...) in proportion to each kind's candidates (their number for ``count``, their parameters for a
  parameter limit), then each kind takes its share from the top of its own ranking.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from conditune.errors import CondituneError
from conditune.scanning.records import OK, TensorRecord

POLICIES = ("lowest", "highest", "random", "threshold")
SCORES = ("kappa", "kappa_norm", "log2_volume", "snr")
SPECTRUM_SCORES = ("snr",)  # scores computed from a record's full spectrum, not read from a column
DEFAULT_COUNT = 100  # the paper's N for Llama 8B

_SLICE_RE = re.compile(r"^(.*)\[(\d+)\]$")
_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def split_slice(name: str) -> tuple[str, int | None]:
    """``"w[3]"`` -> ``("w", 3)``; ``"w"`` -> ``("w", None)``."""
    match = _SLICE_RE.match(name)
    return (match.group(1), int(match.group(2))) if match else (name, None)


def parameter_name(name: str) -> str:
    """The model parameter a record name stands for (the slice index removed)."""
    return split_slice(name)[0]


def parse_params(text: str | int | float) -> int:
    """``"20M"`` -> 20_000_000. Accepts K, M, B (or G) and T suffixes, case-insensitive, and decimals."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbgt]?)\s*", str(text), re.IGNORECASE)
        if not match:
            raise CondituneError(
                f"bad parameter count {text!r} (expected a number with an optional K/M/B suffix, like 20M)"
            )
        value = float(match.group(1)) * _SUFFIXES[match.group(2).upper()]
    if not value > 0 or not math.isfinite(value):
        raise CondituneError(f"parameter count must be positive, got {text!r}")
    return int(value)


def format_params(n: int | float) -> str:
    """Short human form: 8030261248 -> '8.03B', 20000000 -> '20.0M', 512 -> '512'."""
    for suffix, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}" if n / scale < 100 else f"{n / scale:.0f}{suffix}"
    return f"{int(n)}"


def spectrum_snr(singular_values: Sequence[float], shape: Sequence[int]) -> float:
    """Spectrum's signal-to-noise ratio of one matrix (cognitivecomputations/spectrum, ``compute_snr``).

    The noise scale is sigma = IQR(S) / 1.349 and the Marchenko–Pastur edge sigma·(1 + sqrt(beta)) with
    beta = min(m, n) / max(m, n); the singular values above the edge are signal, the others noise, and
    snr = sum(signal S) / sum(noise S) (a noise sum of 1 when no value is noise, 0 signal when none is), returned
    as snr / S[0] as Spectrum stores it. Quantiles interpolate linearly, as ``torch.quantile`` does."""
    import numpy as np

    s = np.sort(np.asarray(singular_values, dtype=np.float64))[::-1]
    if s.size == 0 or not s[0] > 0:
        return math.nan
    m, n = (int(shape[-2]), int(shape[-1])) if len(shape) >= 2 else (1, int(shape[0]))
    q75, q25 = np.quantile(s, [0.75, 0.25])
    sigma = (q75 - q25) / 1.349
    edge = sigma * (1.0 + math.sqrt(min(m, n) / max(m, n)))
    signal_mask = s > edge
    signal = float(s[signal_mask].sum()) if signal_mask.any() else 0.0
    noise = float(s[~signal_mask].sum()) if (~signal_mask).any() else 1.0
    snr = signal / noise if noise != 0 else math.inf
    return snr / float(s[0])


def score_of(record: TensorRecord, score: str) -> float | None:
    """A record's score: its column, or for ``snr`` Spectrum's ratio from its full spectrum (None without one)."""
    if score == "snr":
        values = record.extra.get("singular_values")
        return spectrum_snr(values, record.matrix_shape) if values is not None and len(values) else None
    return getattr(record, score)


@dataclass(frozen=True)
class Candidate:
    """One model parameter that can be selected."""

    name: str  # parameter name (slice index removed)
    kind: str
    layer: int | None
    numel: int  # the whole parameter, all slices
    shape: tuple[int, ...]
    score: float | None  # best score over its ok records (None only under ``random`` without scores)
    slices: tuple[int, ...] = ()  # ok slice indices of a fused tensor; () for a plain tensor


@dataclass
class Selection:
    """The result of :func:`select`: chosen parameters in rank order, and how they were chosen."""

    chosen: list[Candidate]
    policy: str
    score: str
    model_params: int  # all parameters of the model, every record counted
    candidates: int  # parameters that were eligible
    options: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # "source" and "fingerprint" of the scanned checkpoint
    notes: list[str] = field(default_factory=list)  # warnings for the user: a size beyond what the scan holds

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.chosen]

    @property
    def selected_params(self) -> int:
        return sum(c.numel for c in self.chosen)

    @property
    def share(self) -> float:
        return self.selected_params / self.model_params if self.model_params else 0.0

    def per_kind(self) -> dict[str, tuple[int, int]]:
        """kind -> (tensors, parameters), largest parameter count first."""
        counts: dict[str, list[int]] = {}
        for c in self.chosen:
            entry = counts.setdefault(c.kind, [0, 0])
            entry[0] += 1
            entry[1] += c.numel
        return {k: (v[0], v[1]) for k, v in sorted(counts.items(), key=lambda kv: (-kv[1][1], kv[0]))}

    def describe(self) -> str:
        """One line saying how the tensors were chosen, e.g. ``lowest kappa, count 100``."""
        parts = [
            f"{self.policy} {self.score}" if self.policy != "random" else f"random (seed {self.options.get('seed')})"
        ]
        for key in ("count", "budget", "params", "threshold"):
            if self.options.get(key) is not None:
                parts.append(f"{key} {self.options[key]}")
        if self.options.get("per_kind"):
            parts.append("per kind")
        for key in ("include", "exclude"):
            if self.options.get(key):
                parts.append(f"{key} {' '.join(self.options[key])}")
        return ", ".join(parts)


def select(
    records: Sequence[TensorRecord],
    policy: str = "lowest",
    *,
    count: int | None = None,
    budget: float | None = None,
    params: int | str | None = None,
    threshold: float | None = None,
    score: str = "kappa",
    per_kind: bool = False,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    seed: int = 0,
    meta: dict[str, Any] | None = None,
) -> Selection:
    """Choose parameters to fine-tune from scan records (rules in the module docstring).

    >>> sel = select(records, "lowest", count=100)          # the paper's setting
    >>> sel = select(records, "lowest", budget=0.05, per_kind=True, exclude=[r"embed|lm_head"])
    """
    include, exclude = list(include), list(exclude)
    _check_options(policy, score, count, budget, params, threshold)
    _check_spectra(records, score, policy)
    asked_count = count
    param_limit = parse_params(params) if params is not None else None
    sizes = _parameter_sizes(records)
    model_params = sum(numel for numel, _ in sizes.values())
    if budget is not None:
        param_limit = int(budget * model_params)
    if count is None and param_limit is None and policy != "threshold":
        count = DEFAULT_COUNT

    ranked = _rank(_candidates(records, score, policy, sizes, include, exclude), policy, seed)
    if policy == "threshold":
        ranked = [c for c in ranked if c.score <= threshold]
    groups = _group_by_kind(ranked) if per_kind else {"": ranked}
    chosen_names = set()
    for members, quota in _quotas(groups, count, param_limit, ranked):
        chosen_names.update(c.name for c in _take(members, quota, by_params=param_limit is not None))
    chosen = [c for c in ranked if c.name in chosen_names]  # one global rank order for the output
    if not chosen:
        raise CondituneError(_nothing_selected(policy, score, threshold, param_limit, len(ranked), per_kind))

    options = {
        "count": count,
        "budget": budget,
        "params": params,
        "threshold": threshold,
        "per_kind": per_kind,
        "include": include,
        "exclude": exclude,
        "seed": seed if policy == "random" else None,
    }
    source = {k: (meta or {}).get(k) for k in ("source", "fingerprint") if (meta or {}).get(k) is not None}
    notes = _oversize_notes(asked_count, params, param_limit, ranked)
    return Selection(chosen, policy, score, model_params, len(ranked), options, source, notes)


def _oversize_notes(count: int | None, params, param_limit: int | None, ranked: list[Candidate]) -> list[str]:
    """A size the user asked for that is beyond what the candidates hold is taken as "all", with a note."""
    notes = []
    if count is not None and count > len(ranked):
        notes.append(
            f"--count {count} is more than the {len(ranked)} candidate tensors: all {len(ranked)} are selected"
        )
    available = sum(c.numel for c in ranked)
    if params is not None and param_limit is not None and param_limit > available:
        notes.append(
            f"--params {params} is more than the {format_params(available)} parameters of all candidate tensors: "
            "all are selected"
        )
    return notes


def _check_options(policy: str, score: str, count, budget, params, threshold) -> None:
    if policy not in POLICIES:
        raise CondituneError(f"unknown policy {policy!r} (choose from {', '.join(POLICIES)})")
    if score not in SCORES:
        raise CondituneError(f"unknown score {score!r} (choose from {', '.join(SCORES)})")
    given = [
        flag for flag, value in (("--count", count), ("--budget", budget), ("--params", params)) if value is not None
    ]
    if len(given) > 1:
        raise CondituneError(f"give only one of {', '.join(given)}")
    if count is not None and count <= 0:
        raise CondituneError(f"--count must be a positive number of tensors, got {count}")
    if budget is not None and not 0 < budget <= 1:
        raise CondituneError(f"--budget is a fraction of the model's parameters in (0, 1], got {budget}")
    if policy == "threshold" and threshold is None:
        raise CondituneError("policy 'threshold' needs --threshold T (selects tensors with score <= T)")
    if policy != "threshold" and threshold is not None:
        raise CondituneError(f"--threshold only applies to policy 'threshold', not {policy!r}")


def _parameter_sizes(records: Sequence[TensorRecord]) -> dict[str, tuple[int, tuple[int, ...]]]:
    """parameter name -> (numel, shape), summing the slices of fused tensors."""
    plain: dict[str, tuple[int, tuple[int, ...]]] = {}
    sliced: dict[str, dict[int, TensorRecord]] = {}
    for r in records:
        base, index = split_slice(r.name)
        if index is None:
            plain[base] = (int(r.numel), tuple(r.shape))
        else:
            sliced.setdefault(base, {})[index] = r
    for base, parts in sliced.items():
        if base not in plain:  # a scanner may list the fused tensor itself too: trust that size
            first = next(iter(parts.values()))
            n_slices = max(parts) + 1
            plain[base] = (sum(int(r.numel) for r in parts.values()), (n_slices, *tuple(first.shape)[-2:]))
    return plain


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def _compile(patterns: list[str], flag: str) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise CondituneError(f"{flag} {pattern!r}: not a valid regular expression ({exc})") from None
    return compiled


def _candidates(records, score, policy, sizes, include, exclude) -> list[Candidate]:
    includes, excludes = _compile(include, "--include"), _compile(exclude, "--exclude")
    ok: dict[str, list[tuple[TensorRecord, float | None, int | None]]] = {}
    for r in records:
        if r.status != OK:
            continue
        value = score_of(r, score) if policy != "random" or score not in SPECTRUM_SCORES else None
        if policy != "random" and not _is_number(value):
            continue
        base, index = split_slice(r.name)
        if includes and not any(p.search(base) for p in includes):
            continue
        if any(p.search(base) for p in excludes):
            continue
        ok.setdefault(base, []).append((r, value, index))

    best = max if policy == "highest" else min
    candidates = []
    for base, entries in ok.items():
        scores = [v for _, v, _ in entries if _is_number(v)]
        numel, shape = sizes[base]
        first = entries[0][0]
        slices = tuple(sorted(i for _, _, i in entries if i is not None))
        candidates.append(
            Candidate(base, first.kind, first.layer, numel, shape, best(scores) if scores else None, slices)
        )
    return candidates


def _rank(candidates: list[Candidate], policy: str, seed: int) -> list[Candidate]:
    by_name = sorted(candidates, key=lambda c: c.name)
    if policy == "random":
        random.Random(seed).shuffle(by_name)
        return by_name
    sign = -1.0 if policy == "highest" else 1.0
    return sorted(by_name, key=lambda c: sign * c.score)  # stable: equal scores stay in name order


def _group_by_kind(ranked: list[Candidate]) -> dict[str, list[Candidate]]:
    groups: dict[str, list[Candidate]] = {}
    for c in ranked:
        groups.setdefault(c.kind, []).append(c)
    return dict(sorted(groups.items()))


def _quotas(groups: dict[str, list[Candidate]], count: int | None, param_limit: int | None, ranked: list[Candidate]):
    """(members, quota) per group; the quota is a count, a parameter limit, or None (take all)."""
    total = count if count is not None else param_limit
    if total is None:
        return [(members, None) for members in groups.values()]
    if count is None:  # parameter limits need no rounding to whole tensors
        weights = {k: sum(c.numel for c in m) for k, m in groups.items()}
        whole = sum(weights.values()) or 1
        return [(groups[k], total * w // whole) for k, w in weights.items()]
    return [(groups[k], q) for k, q in _largest_remainder(groups, total, ranked).items()]


def _largest_remainder(groups: dict[str, list[Candidate]], total: int, ranked: list[Candidate]) -> dict[str, int]:
    """Split ``total`` tensors over groups in proportion to their sizes, in integers adding up to it.

    Leftover tensors go to the largest fractional shares; among equal shares, to the group whose next
    tensor ranks best, so a count smaller than the number of kinds still takes the best tensors.
    """
    sizes = {k: len(m) for k, m in groups.items()}
    whole = sum(sizes.values())
    if total >= whole:
        return sizes
    position = {c.name: i for i, c in enumerate(ranked)}
    exact = {k: total * n / whole for k, n in sizes.items()}
    quotas = {k: int(v) for k, v in exact.items()}
    leftover = total - sum(quotas.values())
    order = sorted(exact, key=lambda k: (-(exact[k] - quotas[k]), position[groups[k][quotas[k]].name]))
    for k in order[:leftover]:
        quotas[k] += 1
    return quotas


def _take(ranked: list[Candidate], quota: int | None, by_params: bool) -> list[Candidate]:
    if quota is None:
        return list(ranked)
    if not by_params:
        return ranked[:quota]
    taken, used = [], 0
    for c in ranked:
        if used + c.numel <= quota:
            taken.append(c)
            used += c.numel
    return taken


def _check_spectra(records: Sequence[TensorRecord], score: str, policy: str) -> None:
    """A spectrum score on a scan without spectra is one line that says how to get them."""
    has_spectra = any(r.status == OK and r.extra.get("singular_values") is not None for r in records)
    if score in SPECTRUM_SCORES and policy != "random" and not has_spectra:
        raise CondituneError(
            f"score {score!r} needs every matrix's singular values, and this scan has none: scan with "
            "--spectrum full (conditune scan ... --spectrum full -o scan.csv keeps them beside the table)"
        )


def _nothing_selected(policy, score, threshold, param_limit, n_candidates, per_kind) -> str:
    if n_candidates == 0:
        return f"no tensor can be selected: none has status ok and a {score} value after --include/--exclude"
    if policy == "threshold" and param_limit is None:
        return f"no tensor has {score} <= {threshold}"
    where = "its kind's share of " if per_kind else ""
    return (
        f"no tensor fits {where}a budget of {format_params(param_limit)} parameters; "
        "raise --budget/--params or exclude large tensors"
    )
