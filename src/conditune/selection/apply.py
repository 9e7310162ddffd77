"""Freezing a model down to a selection of parameters.

Tied weights: with ``tie_word_embeddings`` a model holds one Parameter under two names
(``model.embed_tokens.weight`` and ``lm_head.weight``). ``named_parameters()`` lists it once, so it is
found here through ``named_parameters(remove_duplicate=False)``. Selecting either name trains the one
shared tensor, i.e. both; the report says so and counts it once.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from conditune.errors import CondituneError
from conditune.selection.policies import format_params, parameter_name


@dataclass
class SelectionReport:
    """What :func:`apply_selection` did."""

    trainable: list[str]  # trainable parameter names in the model (one name per tensor)
    trainable_parameters: int
    total_tensors: int
    total_parameters: int
    tied: list[str] = field(default_factory=list)  # notes on shared tensors among the selection
    missing: list[str] = field(default_factory=list)  # names not in the model (strict=False only)

    @property
    def trainable_tensors(self) -> int:
        return len(self.trainable)

    @property
    def share(self) -> float:
        return self.trainable_parameters / self.total_parameters if self.total_parameters else 0.0

    def __str__(self) -> str:
        lines = [
            f"trainable: {self.trainable_tensors} of {self.total_tensors} tensors, "
            f"{format_params(self.trainable_parameters)} of {format_params(self.total_parameters)} parameters "
            f"({self.share:.2%})"
        ]
        lines += [f"tied: {note}" for note in self.tied]
        if self.missing:
            lines.append(
                f"not in the model ({len(self.missing)}): {', '.join(self.missing[:10])}"
                + (" ..." if len(self.missing) > 10 else "")
            )
        return "\n".join(lines)


def qualify(names: Iterable[str], prefix: str = "") -> list[str]:
    """Model parameter names for selection names: slice index dropped, ``prefix.`` added, repeats removed."""
    prefix = prefix.rstrip(".")
    full = (f"{prefix}.{parameter_name(n)}" if prefix else parameter_name(n) for n in names)
    return list(dict.fromkeys(full))


def unknown_names_error(missing: list[str], known: Iterable[str], what: str = "the model") -> CondituneError:
    """One-line error naming the unknown names, their closest existing names, and a prefix hint."""
    known = list(known)
    shown = []
    for name in missing[:5]:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        shown.append(f"{name} (closest: {', '.join(close)})" if close else name)
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    hint = _prefix_hint(missing[0], known)
    return CondituneError(f"{len(missing)} name(s) not in {what}: {'; '.join(shown)}{more}{hint}")


def _prefix_hint(name: str, known: list[str]) -> str:
    # Names from a scan of the bare LLM miss the wrapper's prefix (or have one too many).
    for other in known:
        if other.endswith("." + name):
            return f" -- did you mean prefix={other[: -len(name) - 1]!r}?"
        if name.endswith("." + other):
            return f" -- the names carry a prefix the model lacks ({name[: -len(other) - 1]!r})"
    return ""


def apply_selection(
    model: torch.nn.Module, names: Iterable[str], prefix: str = "", strict: bool = True
) -> SelectionReport:
    """Unfreeze the named parameters of ``model`` and freeze all others.

    ``names`` are parameter names as written by ``conditune select`` (``name[i]`` slices allowed);
    ``prefix`` is prepended to each, for a model that holds the scanned LLM as a sub-module (e.g.
    ``prefix="llm"`` for a speech model with the LLM at ``model.llm``). Unknown names raise a
    :class:`CondituneError` listing close matches, unless ``strict=False`` (then they are reported).
    """
    wanted = qualify(names, prefix)
    by_name = dict(model.named_parameters(remove_duplicate=False))
    missing = [n for n in wanted if n not in by_name]
    if missing and strict:
        raise unknown_names_error(missing, by_name)
    chosen_ids = {id(by_name[n]) for n in wanted if n in by_name}

    for name, param in model.named_parameters():
        train = id(param) in chosen_ids
        if train and not (param.is_floating_point() or param.is_complex()):
            raise CondituneError(f"{name} is stored as {param.dtype} (quantized?) and cannot be trained")
        param.requires_grad_(train)

    unique = list(model.named_parameters())
    trainable = [(n, p) for n, p in unique if p.requires_grad]
    return SelectionReport(
        trainable=[n for n, _ in trainable],
        trainable_parameters=sum(p.numel() for _, p in trainable),
        total_tensors=len(unique),
        total_parameters=sum(p.numel() for _, p in unique),
        tied=_tied_notes(model, chosen_ids, set(wanted)),
        missing=missing,
    )


def tied_aliases(model: torch.nn.Module) -> dict[int, list[str]]:
    """id(Parameter) -> all its names, for parameters reachable under more than one name."""
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    return {k: v for k, v in aliases.items() if len(v) > 1}


def _tied_notes(model: torch.nn.Module, chosen_ids: set[int], wanted: set[str]) -> list[str]:
    notes = []
    for pid, names in tied_aliases(model).items():
        if pid not in chosen_ids:
            continue
        picked = [n for n in names if n in wanted]
        others = [n for n in names if n not in wanted]
        if others:
            notes.append(f"{', '.join(picked)} is tied to {', '.join(others)} (one tensor): both are trained")
        else:
            notes.append(f"{', '.join(names)} are one tied tensor, trained and counted once")
    return notes


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters left trainable (each tied tensor once), e.g. for ``torch.optim.AdamW(...)``."""
    return [p for p in model.parameters() if p.requires_grad]
