"""Training checkpoints: complete or absent, never half-written.

``<output_dir>/checkpoints/step-00000120/`` holds the model files of
:meth:`~conditune.speech.modeling.SpeechLLM.save_pretrained` (config, adaptor and CTC head, LLM delta), plus
``optimizer.pt``, ``scheduler.pt``, ``rng.pt`` (Python, NumPy, torch and CUDA generator states),
``train_config.yaml`` and ``trainer_state.json`` (step, data position, counters). Everything is
written into a hidden staging folder that is renamed into place at the end, so a killed run leaves at
worst a stale ``.step-*`` folder (ignored, and removed by the next save).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from conditune.errors import CondituneError
from conditune.io import atomic_write, atomic_write_json, atomic_write_text

STATE_NAME = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for item in root.iterdir():
        match = _STEP_DIR.match(item.name)
        if match and (item / STATE_NAME).is_file():
            found.append((int(match.group(1)), item))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def latest_intact_checkpoint(output_dir: str | Path, log=lambda msg: None) -> Path | None:
    """The newest checkpoint whose files match their integrity record; each damaged newer one is reported
    through ``log`` and passed over (``--resume`` falls back instead of stopping)."""
    from conditune.integrity import latest_intact

    newest_first = [path for _, path in reversed(list_checkpoints(output_dir))]
    chosen, skipped = latest_intact(newest_first, missing_ok=True)  # 0.1.0 checkpoints have no record
    for path, reason in skipped:
        log(f"warning: checkpoint {path} is damaged ({reason}); resuming from an earlier one")
    return chosen


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(obj):
    return tuple(_tuples(x) for x in obj) if isinstance(obj, (list, tuple)) else obj


def _torch_save_atomic(obj: Any, path: Path) -> None:
    with atomic_write(path, "wb") as handle:
        torch.save(obj, handle)


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model,
    optimizer,
    scheduler,
    trainer_state: dict[str, Any],
    config_yaml: str,
    keep_last: int = 3,
) -> Path:
    root = checkpoints_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*"):  # left by a killed save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:08d}"
    staging = Path(tempfile.mkdtemp(prefix=f".step-{step:08d}-", dir=root))
    try:
        model.save_pretrained(staging)
        _torch_save_atomic(optimizer.state_dict(), staging / "optimizer.pt")
        _torch_save_atomic(scheduler.state_dict(), staging / "scheduler.pt")
        _torch_save_atomic(rng_state(), staging / "rng.pt")
        atomic_write_text(staging / "train_config.yaml", config_yaml)
        atomic_write_json(staging / STATE_NAME, trainer_state)  # marks the folder complete
        from conditune.integrity import write_manifest

        write_manifest(staging)  # size + sha256 of every file: damage found later is one line naming the file
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(root)
    prune_checkpoints(output_dir, keep_last)
    return final


def replace_folder(folder: Path, write: Callable[[Path], None]) -> None:
    """Write a folder through ``write(staging)`` into a hidden staging folder, then swap it in for ``folder``:
    a reader sees the old folder or the new one, never a mix."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write(staging)
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}-old-{os.getpid()}")
            os.replace(folder, old)
        os.replace(staging, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(folder.parent)


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> None:
    if keep_last is None or keep_last < 1:
        return
    for _, path in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / STATE_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CondituneError(f"{checkpoint}: not a complete checkpoint (no {STATE_NAME})") from None
    except json.JSONDecodeError as exc:
        raise CondituneError(f"{path}: corrupt ({exc})") from None


def load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CondituneError(f"checkpoint file {path} is missing") from None
    except Exception as exc:  # noqa: BLE001 - corrupt file
        raise CondituneError(f"checkpoint file {path} is unreadable: {' '.join(str(exc).split())[:200]}") from None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def find_model_dir(path: str | Path) -> Path:
    """A model folder, a checkpoint, or a training output folder (its ``final/`` or latest checkpoint)."""
    from conditune.speech.configuration import read_model_config

    path = Path(path)
    if not path.exists():
        raise CondituneError(f"{path} does not exist")
    for candidate in (path, path / "final"):
        try:
            read_model_config(candidate)
            return candidate
        except CondituneError:
            continue
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    raise CondituneError(f"{path}: not a speech model, checkpoint or training output folder")


def tensors_sha(tensors: dict[str, Any]) -> str:
    """sha256 over named tensors (names sorted; each name, dtype, shape and raw bytes): equal exactly when every
    tensor is bit-identical. Non-tensor values (an optimizer's step counts as numbers) are hashed by their repr."""
    import hashlib

    digest = hashlib.sha256(b"conditune-tensors-v1\n")
    for name in sorted(tensors):
        value = tensors[name]
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"{name}\t{t.dtype}\t{tuple(t.shape)}\n".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            digest.update(f"{name}\t{value!r}\n".encode())
    return digest.hexdigest()
