"""Recipes: the demo and the experiment, thin wiring of the components (data, speech, training, evaluation).

Each recipe reads one YAML config (shipped in :data:`CONFIG_DIR`, ``configs/`` in a source checkout) plus
``section.key=value`` overrides.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def config_path(name: str) -> Path:
    """A shipped config by name (``speech_demo`` or ``speech_demo.yaml``)."""
    path = CONFIG_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not path.is_file():
        from conditune.errors import CondituneError

        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise CondituneError(f"no shipped config {name!r} (known: {known})")
    return path
