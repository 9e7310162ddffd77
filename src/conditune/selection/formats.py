"""Selection files: plain names, JSON, Axolotl YAML and PEFT target lists, and reading them back.

* ``names`` (``.txt``): one parameter name per line, lowest rank first; ``#`` lines say where the
  selection came from (source fingerprint, policy, score, size).
* ``json`` (``.json``): ``{"names": [...], "tensors": [{name, kind, layer, numel, shape, score, slices}],
  "totals": {...}, "policy": ..., ...}``.
* ``axolotl`` (``.yaml``/``.yml``): ``unfrozen_parameters:`` with one ``^<re.escape(name)>$`` per name,
  which Axolotl applies with :func:`re.match`, so exactly the selection is unfrozen.
* ``peft`` (``--format peft``, JSON): ``{"target_modules": [...], "target_parameters": [...] | null}``
  as returned by :func:`peft.find_kappa_target_modules`: module names (the ``.weight`` dropped) for
  plain weight matrices, parameter names for fused 3-D tensors (LoRA's ``target_parameters``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from conditune import __version__
from conditune.errors import CondituneError
from conditune.io import atomic_write_text
from conditune.selection.policies import Candidate, Selection, format_params

FORMATS = ("names", "json", "axolotl", "peft")
_BY_SUFFIX = {".txt": "names", ".json": "json", ".yaml": "axolotl", ".yml": "axolotl"}


def format_for(path: str | Path | None, fmt: str | None = None) -> str:
    """The output format: ``fmt`` if given, else from the file extension (names for anything unknown)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise CondituneError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
        return fmt
    return _BY_SUFFIX.get(Path(path).suffix.lower(), "names") if path is not None else "names"


def write_selection(selection: Selection, path: str | Path, fmt: str | None = None) -> Path:
    """Write ``selection`` atomically in ``fmt`` (default: from the extension) and return the path."""
    path = Path(path)
    atomic_write_text(path, render(selection, format_for(path, fmt)))
    return path


def render(selection: Selection, fmt: str) -> str:
    if fmt == "names":
        return _comment_header(selection) + "".join(f"{name}\n" for name in selection.names)
    if fmt == "json":
        return json.dumps(_json_document(selection), indent=2) + "\n"
    if fmt == "axolotl":
        import yaml

        body = yaml.safe_dump(
            {"unfrozen_parameters": axolotl_patterns(selection.names)}, sort_keys=False, width=1 << 16
        )
        return _comment_header(selection) + body
    if fmt == "peft":
        return json.dumps(peft_targets(selection), indent=2) + "\n"
    raise CondituneError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")


def axolotl_patterns(names: list[str]) -> list[str]:
    """Anchored regexes that :func:`re.match` turns into exactly ``names``."""
    return [f"^{re.escape(name)}$" for name in names]


def peft_targets(selection: Selection | list[str]) -> dict[str, list[str] | None]:
    """``{"target_modules": [...], "target_parameters": [...] or None}`` for ``peft.LoraConfig``.

    A plain ``<module>.weight`` becomes the module name (LoRA wraps nn.Linear, nn.Embedding, convs);
    a fused tensor (selected through ``name[i]`` slices) or any other parameter stays a parameter name,
    which LoRA reaches through ``target_parameters``. Order is the rank order.
    """
    chosen = selection.chosen if isinstance(selection, Selection) else [None] * len(selection)
    names = selection.names if isinstance(selection, Selection) else list(selection)
    modules, parameters = [], []
    for name, cand in zip(names, chosen):
        fused = isinstance(cand, Candidate) and bool(cand.slices)
        if name.endswith(".weight") and not fused:
            modules.append(name[: -len(".weight")])
        else:
            parameters.append(name)
    return {"target_modules": modules, "target_parameters": parameters or None}


def _comment_header(selection: Selection) -> str:
    lines = [f"conditune {__version__} selection"]
    for key in ("source", "fingerprint"):
        if selection.source.get(key):
            lines.append(f"{key}: {selection.source[key]}")
    lines.append(f"policy: {selection.describe()}")
    lines.append(f"score: {selection.score}")
    lines.append(
        f"count: {len(selection.chosen)} tensors, {selection.selected_params} parameters "
        f"({selection.share:.2%} of {format_params(selection.model_params)})"
    )
    return "".join(f"# {line}\n" for line in lines)


def _json_document(selection: Selection) -> dict[str, Any]:
    return {
        "conditune_version": __version__,
        **selection.source,
        "policy": selection.policy,
        "score": selection.score,
        "options": selection.options,
        "names": selection.names,
        "tensors": [
            {
                "name": c.name,
                "kind": c.kind,
                "layer": c.layer,
                "numel": c.numel,
                "shape": list(c.shape),
                selection.score: c.score,
                **({"slices": list(c.slices)} if c.slices else {}),
            }
            for c in selection.chosen
        ],
        "totals": {
            "tensors": len(selection.chosen),
            "parameters": selection.selected_params,
            "model_parameters": selection.model_params,
            "share": selection.share,
            "candidates": selection.candidates,
            "per_kind": {k: {"tensors": t, "parameters": p} for k, (t, p) in selection.per_kind().items()},
        },
    }


# ----------------------------------------------------------------------------------------------
# reading back


def read_names(path: str | Path) -> list[str]:
    """Parameter names from a selection file in any of the formats above (or a hand-written list).

    PEFT ``target_modules`` come back as ``<module>.weight``. Axolotl patterns must be literal names
    (``^name$``, dots escaped or not); a real regex cannot be turned into names without a model.
    """
    path = Path(path)
    if not path.is_file():
        raise CondituneError(f"{path}: selection file not found")
    text = path.read_text()
    stripped = text.lstrip()
    suffix = path.suffix.lower()
    try:
        if suffix == ".json" or stripped.startswith(("{", "[")):
            names = _names_from_json(json.loads(text))
        elif suffix in (".yaml", ".yml") or re.search(r"^unfrozen_parameters\s*:", text, re.MULTILINE):
            names = _names_from_axolotl(text)
        else:
            names = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    except CondituneError as exc:
        raise CondituneError(f"{path}: {exc}") from None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CondituneError(f"{path}: cannot read selection ({type(exc).__name__}: {exc})") from None
    return list(dict.fromkeys(names))  # drop repeats, keep order


def _names_from_json(data: Any) -> list[str]:
    if isinstance(data, list):
        return [str(n) for n in data]
    if "target_modules" in data:  # PEFT
        modules = data.get("target_modules") or []
        if isinstance(modules, str):
            raise CondituneError("target_modules is a regex string, not a list of module names")
        return [f"{m}.weight" for m in modules] + list(data.get("target_parameters") or [])
    if "names" in data:
        return [str(n) for n in data["names"]]
    if "tensors" in data:
        return [str(t["name"]) for t in data["tensors"]]
    raise CondituneError("JSON has none of 'names', 'tensors', 'target_modules'")


def _names_from_axolotl(text: str) -> list[str]:
    import yaml

    data = yaml.safe_load(text) or {}
    patterns = data.get("unfrozen_parameters") if isinstance(data, dict) else None
    if not isinstance(patterns, list):
        raise CondituneError("YAML has no 'unfrozen_parameters:' list")
    return [_literal_from_pattern(str(p)) for p in patterns]


_REGEX_SPECIALS = set("*+?[](){}|^$")


def _literal_from_pattern(pattern: str) -> str:
    """``^model\\.norm\\.weight$`` (or Axolotl's own ``^lm_head.weight$``) -> ``model.norm.weight``."""
    inner = pattern[1:] if pattern.startswith("^") else pattern
    inner = inner[:-1] if inner.endswith("$") and not inner.endswith("\\$") else inner
    out, chars = [], iter(inner)
    for ch in chars:
        if ch == "\\":
            out.append(next(chars, ""))
        elif ch in _REGEX_SPECIALS:
            raise CondituneError(
                f"pattern {pattern!r} is a regex, not a parameter name; apply it to a model with re.match"
            )
        else:
            out.append(ch)  # an unescaped '.' is read as a literal dot, as Axolotl users write it
    return "".join(out)
