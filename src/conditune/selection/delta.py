"""Delta checkpoints: only the fine-tuned tensors, plus what is needed to put them back.

A delta directory holds ``delta.safetensors`` (the tensors, one per tied group) and ``delta.json``::

    {"format": "conditune-delta", "format_version": 1, "conditune_version": "0.1.0",
     "base_model": "<path or hub id>", "base_fingerprint": "<sha256>", "names": [...],
     "tied": {"lm_head.weight": ["model.embed_tokens.weight"]}, "dtype": "bfloat16",
     "tensors": {"<name>": {"shape": [...], "dtype": "..."}}, "parameters": 123}

``delta.json`` is written last, so a directory with it is complete. Only safetensors are used (no pickle).

Base fingerprint (:func:`model_fingerprint`): sha256 over every parameter name in sorted order (tied
aliases included), with its shape and dtype, and, for each tensor not excluded, the first and last
4 KiB of its raw bytes. The delta's own tensors are excluded from the content part, because they are
exactly what fine-tuning changes: the fingerprint of the base before training and of the fine-tuned
model after it are the same, and either one can receive the delta. A different checkpoint, a
different architecture or the same one in another dtype gives a different fingerprint. It is a cheap
identity check (some KiB read per tensor), not a proof that every byte is equal.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from conditune import __version__
from conditune.errors import CondituneError
from conditune.io import atomic_write_json
from conditune.selection.apply import qualify, tied_aliases, unknown_names_error

DELTA_FILE = "delta.safetensors"
META_FILE = "delta.json"
FORMAT = "conditune-delta"
SAMPLE_BYTES = 4096
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)


def model_fingerprint(model: torch.nn.Module, exclude: Iterable[str] = ()) -> str:
    """sha256 hex digest identifying a model's weights (see the module docstring for what it covers)."""
    params = list(model.named_parameters(remove_duplicate=False))
    excluded = set(exclude)
    skip_ids = {id(p) for n, p in params if n in excluded}  # a tied alias of an excluded name changes with it
    digest = hashlib.sha256(b"conditune-fingerprint-v1\n")
    for name, param in sorted(params, key=lambda np: np[0]):
        digest.update(f"{name}\t{tuple(param.shape)}\t{str(param.dtype).replace('torch.', '')}\n".encode())
        if id(param) not in skip_ids:
            digest.update(_edge_bytes(param))
    return digest.hexdigest()


def _edge_bytes(tensor: torch.Tensor) -> bytes:
    """First and last SAMPLE_BYTES bytes of a tensor (without copying the whole tensor to the CPU)."""
    if tensor.device.type == "meta" or tensor.numel() == 0:
        return b""
    flat = tensor.detach().reshape(-1)
    n = max(1, SAMPLE_BYTES // tensor.element_size())
    parts = [flat[:n]] if flat.numel() <= n else [flat[:n], flat[-n:]]
    return b"".join(p.cpu().contiguous().view(torch.uint8).numpy().tobytes() for p in parts)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _base_reference(model: torch.nn.Module) -> str | None:
    ref = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(ref) if ref else None


def save_delta(
    model: torch.nn.Module,
    directory: str | Path,
    names: Iterable[str] | None = None,
    *,
    prefix: str = "",
    base_reference: str | None = None,
    base_fingerprint: str | None = None,
) -> Path:
    """Write the trainable tensors of ``model`` (or the given ``names``) to ``directory`` as a delta.

    ``base_reference`` (default: the model's ``name_or_path``) says which checkpoint the delta applies
    to; ``base_fingerprint`` defaults to :func:`model_fingerprint` of ``model`` without the delta's
    tensors, which equals the base's when only those tensors were trained.
    """
    directory = Path(directory)
    by_name = dict(model.named_parameters(remove_duplicate=False))
    if names is None:
        wanted = [n for n, p in model.named_parameters() if p.requires_grad]
    else:
        wanted = qualify(names, prefix)
        missing = [n for n in wanted if n not in by_name]
        if missing:
            raise unknown_names_error(missing, by_name)
    wanted = _one_name_per_tensor(wanted, by_name)
    if not wanted:
        raise CondituneError("nothing to save: the model has no trainable parameters and no names were given")

    aliases = tied_aliases(model)
    tensors = {n: by_name[n].detach().to("cpu").contiguous() for n in wanted}
    dtypes = {_dtype_name(t.dtype) for t in tensors.values()}
    meta = {
        "format": FORMAT,
        "format_version": 1,
        "conditune_version": __version__,
        "base_model": base_reference if base_reference is not None else _base_reference(model),
        "base_fingerprint": base_fingerprint or model_fingerprint(model, exclude=wanted),
        "names": wanted,
        "tied": {n: [a for a in aliases[id(by_name[n])] if a != n] for n in wanted if id(by_name[n]) in aliases},
        "dtype": dtypes.pop() if len(dtypes) == 1 else "mixed",
        "tensors": {n: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)} for n, t in tensors.items()},
        "parameters": sum(t.numel() for t in tensors.values()),
    }
    directory.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):  # an old delta.json must not vouch for new tensors mid-write
        (directory / META_FILE).unlink()
    _atomic_save_file(tensors, directory / DELTA_FILE, {"format": "pt", "conditune": FORMAT})
    atomic_write_json(directory / META_FILE, meta)
    return directory


def _one_name_per_tensor(names: list[str], by_name: dict[str, torch.nn.Parameter]) -> list[str]:
    # safetensors refuses shared tensors, and a tied tensor only needs saving once
    seen: set[int] = set()
    unique = []
    for name in names:
        if id(by_name[name]) not in seen:
            seen.add(id(by_name[name]))
            unique.append(name)
    return unique


def _atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_delta_meta(directory: str | Path) -> dict:
    """``delta.json`` of a delta directory, checked to be one."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise CondituneError(f"{directory}: not a conditune delta (no {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise CondituneError(f"{meta_path}: corrupt ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("names"), list):
        raise CondituneError(f"{meta_path}: not a {FORMAT} description")
    if not (directory / DELTA_FILE).is_file():
        raise CondituneError(f"{directory}: {DELTA_FILE} is missing")
    return meta


def load_delta(model: torch.nn.Module, directory: str | Path, force: bool = False, *, prefix: str = "") -> list[str]:
    """Copy a delta's tensors into ``model`` in place (bit-exact when dtypes match); return their names.

    Refuses when ``model`` is not the base the delta was made from (its fingerprint differs), unless
    ``force=True``. Names and shapes must always match.
    """
    from safetensors import safe_open

    directory = Path(directory)
    meta = read_delta_meta(directory)
    by_name = dict(model.named_parameters(remove_duplicate=False))
    targets = dict(zip(meta["names"], qualify(meta["names"], prefix)))
    missing = [full for full in targets.values() if full not in by_name]
    if missing:
        raise unknown_names_error(missing, by_name)
    if not force:
        _check_base(model, meta, list(targets.values()), directory)

    with safe_open(str(directory / DELTA_FILE), framework="pt", device="cpu") as handle:
        if set(handle.keys()) != set(targets):
            raise CondituneError(f"{directory}: {DELTA_FILE} does not hold the tensors {META_FILE} lists")
        for name, full in targets.items():
            param = by_name[full]
            tensor = handle.get_tensor(name)
            if tuple(tensor.shape) != tuple(param.shape):
                raise CondituneError(
                    f"{directory}: {name} has shape {tuple(tensor.shape)} in the delta, "
                    f"{tuple(param.shape)} in the model"
                )
            with torch.no_grad():
                param.copy_(tensor)
    return list(targets.values())


def _check_base(model: torch.nn.Module, meta: dict, names: list[str], directory: Path) -> None:
    recorded = meta.get("base_fingerprint")
    if not recorded:
        return
    # A fingerprint passed in by hand may cover the delta tensors too: accept either form.
    actual = model_fingerprint(model, exclude=names)
    if actual == recorded or model_fingerprint(model) == recorded:
        return
    base = meta.get("base_model") or "an unnamed model"
    raise CondituneError(
        f"{directory}: delta was made for base {base} (fingerprint {recorded[:12]}), this model's is {actual[:12]}; "
        "use force=True (--force) to load it anyway"
    )


def load_pretrained(source: str | Path) -> torch.nn.Module:
    """Load a transformers checkpoint with its own architecture class and stored dtype."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(source)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    cls = cls or transformers.AutoModelForCausalLM
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # keep the checkpoint's dtype: bit-exact
    return cls.from_pretrained(source, **{dtype_kw: "auto"})


def merge_delta(
    base: str | Path | torch.nn.Module | None,
    delta_dir: str | Path,
    out_dir: str | Path,
    *,
    force: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a full checkpoint (``save_pretrained``) of ``base`` with the delta applied to ``out_dir``.

    ``base`` is a model, a checkpoint directory / hub id, or None for the delta's recorded base. For a
    directory, tokenizer files are copied along. ``out_dir`` appears complete or not at all.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CondituneError(f"{out_dir}: exists and is not empty (use overwrite=True / --overwrite)")
    if base is None:
        base = read_delta_meta(delta_dir).get("base_model")
        if not base:
            raise CondituneError(f"{delta_dir}: the delta names no base model; give one")
    model = base if isinstance(base, torch.nn.Module) else load_pretrained(base)
    load_delta(model, delta_dir, force=force)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        if not isinstance(base, torch.nn.Module) and Path(base).is_dir():
            for name in _TOKENIZER_FILES:
                if (Path(base) / name).is_file():
                    shutil.copy2(Path(base) / name, staging / name)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _replace_dir(staging: Path, target: Path) -> None:
    """Move ``staging`` to ``target``, replacing an existing ``target`` only after the move is possible."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
