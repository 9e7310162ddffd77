"""Experiment configuration: the training config (``model``/``data``/``train``) plus an ``experiment`` section.

Every key can be overridden on the command line as ``section.key=value`` (``experiment.seeds=[0]``,
``train.max_steps=20``). The ``experiment`` section says which arms run, over which seeds, with which N,
and where the forgetting probes (held-out text, instructions) come from; ``model.trainable`` is set
per arm and ``train.seed`` / ``train.output_dir`` per run, so those keys are ignored if given.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conditune.errors import CondituneError

ARMS = ("lowest-kappa", "highest-kappa", "random", "lowest-kappa-norm", "adaptor-only", "lora", "kappa-lora", "full")
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ExperimentSection:
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    count: int = 100  # N: tensors trained by the selection arms (the paper's N for Llama 3 8B)
    scan: str | None = None  # scan file (CSV/JSON/parquet) of the LLM; None: scan it here (cached)
    exclude: list[str] = field(default_factory=list)  # regexes: tensors never selected (e.g. "embed|lm_head")
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    lora_rank: object = "match"  # "match": r chosen so LoRA's trainable count matches lowest-kappa's
    kappa_lora_rank: object = "match"  # the same for kappa-lora (LoRA on the lowest-kappa modules)
    lora_alpha_ratio: float = 2.0  # lora_alpha = ratio * r
    match_tolerance: float = 0.05  # the matched LoRA counts must be within this of lowest-kappa's
    heldout_text: dict[str, str] = field(default_factory=dict)  # language -> held-out text file (one sentence a line)
    heldout_limit: int | None = 64  # sentences per language
    max_tokens: int = 128  # per held-out sentence
    instructions: dict[str, list[str]] | None = None  # language -> prompts; None: DEFAULT_INSTRUCTIONS
    instructions_limit: int | None = 8  # prompts per language
    agreement_new_tokens: int = 24
    metric_batch: int = 8
    keep_checkpoints: bool = False  # False: delete a finished run's checkpoints/ (its final/ model stays)
    shard: str | None = None  # "i/n": this process runs only the runs with index % n == i (one process per GPU)


@dataclass
class ExperimentConfig:
    experiment: ExperimentSection
    train_data: dict[str, Any]  # the model/data/train sections, as given

    def validate(self) -> None:
        e = self.experiment
        if not e.arms:
            raise CondituneError("experiment.arms is empty")
        bad = [a for a in e.arms if a not in ARMS]
        if bad:
            raise CondituneError(
                f"unknown arm(s) {', '.join(map(str, bad))} in experiment.arms (known: {', '.join(ARMS)})"
            )
        if len(set(e.arms)) != len(e.arms):
            raise CondituneError("experiment.arms lists an arm twice")
        if not e.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in e.seeds):
            raise CondituneError("experiment.seeds must be a non-empty list of integers")
        if len(set(e.seeds)) != len(e.seeds):
            raise CondituneError("experiment.seeds lists a seed twice")
        if not isinstance(e.count, int) or e.count < 1:
            raise CondituneError(f"experiment.count must be a positive integer, not {e.count!r}")
        for key in ("lora_rank", "kappa_lora_rank"):
            value = getattr(e, key)
            if value != "match" and not (isinstance(value, int) and value >= 1):
                raise CondituneError(f"experiment.{key} must be 'match' or a positive integer, not {value!r}")
        if not isinstance(e.heldout_text, dict):
            raise CondituneError("experiment.heldout_text must map a language to a text file")
        for lang, path in e.heldout_text.items():
            if not Path(str(path)).is_file():
                raise CondituneError(f"experiment.heldout_text.{lang}: {path} not found")
        if e.scan is not None and not Path(e.scan).is_file():
            raise CondituneError(f"experiment.scan: {e.scan} not found")
        if e.shard is not None:
            parse_shard(e.shard)
        t = self.train_data.get("train") or {}
        if t.get("max_seconds") is not None:
            raise CondituneError("train.max_seconds must be null in an experiment: every arm trains the same steps")
        self.train_config_for(self.experiment.seeds[0], "/tmp/unused", {"mode": "none"})  # checks model/data/train

    def train_config_for(self, seed: int, output_dir: str | Path, trainable: dict[str, Any]):
        """The :class:`TrainConfig` of one run: same data, steps and schedule for every arm."""
        from conditune.training.config import TrainConfig

        data = copy.deepcopy(self.train_data)
        data.setdefault("model", {})["trainable"] = trainable
        t = data.setdefault("train", {})
        t.update({"seed": int(seed), "output_dir": str(output_dir), "max_seconds": None})
        every = t.get("eval_every") or 0
        t["save_every"] = every  # a checkpoint at every evaluation: a killed run redoes at most one interval
        t["keep_last"] = 1
        t.setdefault("progress", False)
        return TrainConfig.from_dict(data)


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise CondituneError(f"experiment.shard must look like i/n (e.g. 0/4), not {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise CondituneError(f"experiment.shard {text!r}: need 0 <= i < n")
    return i, n


def load_experiment_config(path: str | Path | dict, overrides: Sequence[str] | dict[str, Any] = ()) -> ExperimentConfig:
    from conditune.speech.config import build_dataclass
    from conditune.training.config import apply_overrides, parse_overrides, read_config_file

    data = copy.deepcopy(path) if isinstance(path, dict) else read_config_file(path, "experiment/model/data/train")
    if not isinstance(overrides, dict):
        overrides = parse_overrides(overrides)
    data = apply_overrides(data, overrides)
    unknown = sorted(set(data) - {"experiment", "model", "data", "train"})
    if unknown:
        raise CondituneError(f"unknown section(s) {', '.join(unknown)} (known: experiment, model, data, train)")
    section = build_dataclass(ExperimentSection, data.pop("experiment", None) or {}, "experiment", {})
    if isinstance(section.arms, str):
        section.arms = [a.strip() for a in section.arms.split(",") if a.strip()]
    if isinstance(section.seeds, int):
        section.seeds = [section.seeds]
    cfg = ExperimentConfig(section, data)
    cfg.validate()
    return cfg


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    return {"experiment": dataclasses.asdict(cfg.experiment), **copy.deepcopy(cfg.train_data)}
