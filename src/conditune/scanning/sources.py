"""Checkpoint sources, read one tensor at a time (never the whole model in memory).

:func:`open_source` turns what the user points at into a :class:`TensorSource`:

* a Hugging Face model folder (single or sharded ``*.safetensors`` with an index; else
  ``pytorch_model*.bin``; else a single ``.gguf`` in it),
* a ``.safetensors`` file, a ``.gguf`` file, a PyTorch state dict (``.bin``/``.pt``/``.pth``),
* an in-memory ``torch.nn.Module`` (Python API),
* ``demo:<name>`` for the offline demo models (see :mod:`conditune.models`),
* a hub id ``org/name`` when it is no local path (needs network; never used in tests).

Every source lists its tensors (name, shape, dtype) without loading them, loads one on demand, and
has a fingerprint that changes whenever the checkpoint does (files, sizes, headers).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from conditune.errors import CondituneError


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape else 1


class TensorSource(ABC):
    """A checkpoint read tensor by tensor."""

    description: str

    @abstractmethod
    def infos(self) -> list[TensorInfo]:
        """All tensors, in checkpoint order, without loading them."""

    @abstractmethod
    def load(self, name: str) -> torch.Tensor:
        """One tensor on the CPU, in its stored dtype (float32 for dequantised GGUF)."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A hex digest that changes whenever the checkpoint's files or tensors change."""


# ----------------------------------------------------------------------------------------------
# safetensors

_SAFETENSORS_DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}


def read_safetensors_header(path: Path) -> tuple[dict, bytes]:
    """Parse and validate a safetensors header; a truncated or corrupt file raises CondituneError."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CondituneError(f"{path}: not a safetensors file (too short: {size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, 100 * 2**20):
            raise CondituneError(
                f"{path}: corrupt safetensors header (declared length {header_len} bytes, file {size} bytes)"
            )
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CondituneError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise CondituneError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - header_len
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = entry["data_offsets"]
            expected = math.prod(entry["shape"]) * _SAFETENSORS_DTYPE_SIZES.get(entry["dtype"], 0)
        except (KeyError, TypeError, ValueError):
            raise CondituneError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if end > data_size:
            raise CondituneError(
                f"{path}: truncated: tensor {name!r} ends at byte {end} of a {data_size}-byte data section"
            )
        if expected and end - start != expected:
            raise CondituneError(
                f"{path}: corrupt safetensors entry {name!r}: {end - start} bytes for shape {entry['shape']}"
            )
    return header, raw


class SafetensorsSource(TensorSource):
    def __init__(self, files: list[Path], description: str):
        from safetensors import safe_open

        self._safe_open = safe_open
        self.files = files
        self.description = description
        self._infos: list[TensorInfo] = []
        self._file_of: dict[str, Path] = {}
        self._headers: list[bytes] = []
        for path in files:
            header, raw = read_safetensors_header(path)
            self._headers.append(raw)
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                self._infos.append(TensorInfo(name, tuple(entry["shape"]), entry["dtype"].lower()))
                self._file_of[name] = path

    def infos(self) -> list[TensorInfo]:
        return self._infos

    def load(self, name: str) -> torch.Tensor:
        path = self._file_of[name]
        try:
            # A fresh (memory-mapped) handle per call: cheap, and safe from several threads.
            with self._safe_open(str(path), framework="pt") as handle:
                return handle.get_tensor(name)
        except Exception as exc:
            raise CondituneError(f"{path}: cannot read tensor {name!r} ({exc})") from exc

    def fingerprint(self) -> str:
        # Headers say which tensors, shapes and dtypes; the first and last 4 KiB of every tensor's
        # bytes tell two checkpoints of one architecture apart (fine-tuning changes every element
        # of a trained tensor). A few MB of reads even for a 16 GB checkpoint.
        digest = hashlib.sha256(b"safetensors\0")
        for path, raw in zip(self.files, self._headers):
            digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
            digest.update(hashlib.sha256(raw).digest())
            data_start = 8 + len(raw)
            with open(path, "rb") as handle:
                for name, entry in json.loads(raw).items():
                    if name != "__metadata__":
                        start, end = entry["data_offsets"]
                        _digest_ends(digest, handle, data_start + start, data_start + end)
        return digest.hexdigest()


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CondituneError(f"{index}: corrupt index ({exc})") from None
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CondituneError(f"{index}: shard(s) missing: {', '.join(missing)}")
        return files
    return sorted(folder.glob("*.safetensors"))


# ----------------------------------------------------------------------------------------------
# PyTorch state dicts (pickle-free: weights_only=True)


class TorchStateDictSource(TensorSource):
    def __init__(self, files: list[Path], description: str):
        self.files = files
        self.description = description
        self._tensors: dict[str, torch.Tensor] = {}
        for path in files:
            self._tensors.update(_load_state_dict(path))
        self._infos = [
            TensorInfo(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in self._tensors.items()
        ]

    def infos(self) -> list[TensorInfo]:
        return self._infos

    def load(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def fingerprint(self) -> str:
        return _tensors_fingerprint(b"torch\0", self.files, self._tensors)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        # mmap keeps tensors on disk until touched, so memory stays near one tensor at a time.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        try:  # legacy (non-zip) format cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CondituneError(
                f"{path}: cannot load state dict safely ({type(exc).__name__}: {str(exc).splitlines()[0]})"
            ) from exc
    except Exception as exc:
        raise CondituneError(
            f"{path}: cannot load state dict safely ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        ) from exc
    for key in ("state_dict", "model", "module"):  # common training-checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CondituneError(f"{path}: not a state dict (a {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


SAMPLE_BYTES = 4096


def _digest_ends(digest, handle, start: int, end: int) -> None:
    """Feed the first and last SAMPLE_BYTES of the byte range [start, end) of a file."""
    handle.seek(start)
    digest.update(handle.read(min(SAMPLE_BYTES, end - start)))
    if end - start > SAMPLE_BYTES:
        handle.seek(max(start + SAMPLE_BYTES, end - SAMPLE_BYTES))
        digest.update(handle.read(end - max(start + SAMPLE_BYTES, end - SAMPLE_BYTES)))


def _tensors_fingerprint(tag: bytes, files: list[Path], tensors: dict[str, torch.Tensor]) -> str:
    """Files (names, sizes) plus each tensor's name, shape, dtype and first and last values."""
    digest = hashlib.sha256(tag)
    for path in files:
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
    for name, tensor in tensors.items():
        flat = tensor.detach().reshape(-1)
        count = SAMPLE_BYTES // max(1, flat.element_size())
        digest.update(f"{name}\0{tuple(tensor.shape)}\0{tensor.dtype}\0".encode())
        for part in (flat[:count], flat[-count:]):
            digest.update(part.to("cpu", torch.float64).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# GGUF (llama.cpp), reported under the names transformers gives the loaded model


class GGUFSource(TensorSource):
    def __init__(self, path: Path):
        try:
            import gguf
        except ImportError:
            raise CondituneError("reading .gguf needs the 'gguf' package: pip install gguf") from None
        self.path = path
        self.description = f"GGUF file {path}"
        try:
            self._reader = gguf.GGUFReader(str(path))
        except Exception as exc:
            raise CondituneError(f"{path}: corrupt GGUF file ({type(exc).__name__}: {exc})") from exc
        self._gguf = gguf
        self._processor, self._name_map, self._parsed = _gguf_name_mapping(path)
        self._tensors = {}
        self._infos = []
        for tensor in self._reader.tensors:
            hf_name = self._name_map.get(tensor.name)
            if hf_name is None:
                continue  # not a model parameter (transformers skips it too)
            shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF lists ne0 (innermost) first
            self._tensors[hf_name] = tensor
            self._infos.append(TensorInfo(hf_name, shape, tensor.tensor_type.name))

    def infos(self) -> list[TensorInfo]:
        return self._infos

    def load(self, name: str) -> torch.Tensor:
        import numpy as np

        tensor = self._tensors[name]
        try:
            weights = self._gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise CondituneError(
                f"{self.path}: tensor {tensor.name!r} uses GGUF quant type {tensor.tensor_type.name}, which gguf cannot dequantise"
            ) from None
        # The same per-tensor fix-ups transformers applies when loading (e.g. Llama q/k un-permute).
        result = self._processor.process(
            weights=weights, name=tensor.name, tensor_key_mapping=self._name_map, parsed_parameters=self._parsed
        )
        return torch.from_numpy(np.ascontiguousarray(result.weights, dtype=np.float32))

    def fingerprint(self) -> str:
        digest = hashlib.sha256(f"gguf\0{self.path.name}\0{self.path.stat().st_size}\0".encode())
        with open(self.path, "rb") as handle:
            for tensor in self._reader.tensors:
                digest.update(f"{tensor.name}\0{tensor.tensor_type.name}\0{tensor.shape.tolist()}\0".encode())
                _digest_ends(digest, handle, int(tensor.data_offset), int(tensor.data_offset) + int(tensor.n_bytes))
        return digest.hexdigest()


def _gguf_name_mapping(path: Path):
    """GGUF tensor name -> transformers parameter name, via an empty (meta) model of the GGUF's config."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    try:
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
        config = AutoConfig.for_model(**parsed["config"])  # what from_pretrained(gguf_file=) builds
    except Exception as exc:
        raise CondituneError(f"{path}: transformers cannot read this GGUF ({type(exc).__name__}: {exc})") from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    architecture = parsed["config"].get("model_type", "")
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    with _memoised_gguf_name_map():
        return processor, get_gguf_hf_weights_map(model, processor), parsed


@contextlib.contextmanager
def _memoised_gguf_name_map():
    """transformers rebuilds gguf's (costly) name map once per submodule; build it once instead."""
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


# ----------------------------------------------------------------------------------------------
# in-memory modules


class ModuleSource(TensorSource):
    def __init__(self, module: torch.nn.Module, description: str | None = None):
        self.module = module
        self.description = description or f"in-memory {type(module).__name__}"
        self._params = dict(module.named_parameters())  # tied parameters appear once
        self._infos = [
            TensorInfo(n, tuple(p.shape), str(p.dtype).removeprefix("torch.")) for n, p in self._params.items()
        ]

    def infos(self) -> list[TensorInfo]:
        return self._infos

    def load(self, name: str) -> torch.Tensor:
        return self._params[name].detach()

    def fingerprint(self) -> str:
        return _tensors_fingerprint(b"module\0", [], self._params)


# ----------------------------------------------------------------------------------------------
# resolution

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_PATTERNS = ["*.safetensors", "*.json"]


def open_source(source) -> TensorSource:
    """Turn a path, ``demo:<name>``, hub id or nn.Module into a TensorSource (see module docstring)."""
    if isinstance(source, TensorSource):
        return source
    if isinstance(source, torch.nn.Module):
        return ModuleSource(source)
    text = os.fspath(source)
    if text.startswith("demo:"):
        from conditune import models

        return open_source(models.fetch(text.removeprefix("demo:")))
    path = Path(text).expanduser()
    if path.is_dir():
        return _open_folder(path)
    if path.is_file():
        return _open_file(path)
    if _HUB_ID.match(text) and not text.startswith((".", "/")):
        return _open_hub(text)
    raise CondituneError(f"{text}: no such file or directory")


def _open_file(path: Path) -> TensorSource:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return SafetensorsSource([path], f"safetensors file {path}")
    if suffix == ".gguf":
        return GGUFSource(path)
    if suffix in {".bin", ".pt", ".pth"}:
        return TorchStateDictSource([path], f"PyTorch state dict {path}")
    raise CondituneError(
        f"{path}: unknown checkpoint format {suffix!r} (expected .safetensors, .gguf, .bin, .pt or .pth)"
    )


def _open_folder(folder: Path) -> TensorSource:
    files = _safetensors_files(folder)
    if files:
        return SafetensorsSource(
            files, f"safetensors folder {folder} ({len(files)} file{'s' if len(files) > 1 else ''})"
        )
    bins = _torch_files(folder)
    if bins:
        return TorchStateDictSource(bins, f"PyTorch folder {folder} ({len(bins)} file{'s' if len(bins) > 1 else ''})")
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return GGUFSource(ggufs[0])
    if len(ggufs) > 1:
        raise CondituneError(f"{folder}: {len(ggufs)} .gguf files; name the one to scan")
    raise CondituneError(f"{folder}: no weights found (no .safetensors, pytorch_model*.bin or .gguf)")


def _torch_files(folder: Path) -> list[Path]:
    index = folder / "pytorch_model.bin.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({folder / f for f in weight_map.values()})
    return sorted(folder.glob("pytorch_model*.bin"))


def _open_hub(repo_id: str) -> TensorSource:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, allow_patterns=_WEIGHT_PATTERNS)
    except Exception as exc:
        raise CondituneError(
            f"{repo_id}: not a local path, and the hub download failed ({type(exc).__name__})"
        ) from exc
    return _open_folder(Path(folder))


def iter_matrices(info: TensorInfo, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """The 2-D matrices a tensor is scanned as (see README, "Tensors with more than 2 dims").

    * 2-D: itself.
    * 3-D named like a convolution (``conv`` in the name): a Conv1d kernel (out, in, k) -> (out, in*k).
    * other 3-D (fused MoE experts, stacked heads): one matrix per leading index, named ``name[i]``.
    * 4-D and more (Conv2d/3d kernels): (out, rest).
    """
    if tensor.dim() == 2:
        yield info.name, tensor
    elif tensor.dim() == 3 and "conv" not in info.name.lower():
        for i in range(tensor.shape[0]):
            yield f"{info.name}[{i}]", tensor[i]
    else:
        yield info.name, tensor.reshape(tensor.shape[0], -1)
