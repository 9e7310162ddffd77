"""Experiment configuration: a training recipe (``model``/``data``/``optimizer``/``training``/``evaluation``)
plus an ``experiment`` section.

Every key can be overridden on the command line as ``section.key=value`` (``experiment.seeds=[0]``,
``training.max_steps=20``). The ``experiment`` section says which arms run, over which seeds, with which
N, and where the forgetting probes (held-out text, instructions) come from; ``model.trainable`` is set
per arm and ``training.seed`` / ``output.dir`` per run, so those keys are ignored if given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conditune.config import load_config
from conditune.errors import CondituneError
from conditune.speech.configuration import TrainableConfig
from conditune.training.config import TrainConfig, training_part
from conditune.validation import require_choice, require_range

ARMS = ("lowest-kappa", "highest-kappa", "random", "lowest-kappa-norm", "adaptor-only", "lora", "kappa-lora", "full",
        "spectrum", "pissa", "osf")  # fmt: skip
DEFAULT_ARMS = ARMS[:8]  # the arms of 0.1.0; the peers (spectrum, pissa, osf) are asked for by name
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LongHorizonSettings:
    """The paper's Figure 1: a few arms trained for ``steps_multiplier`` × the main steps, evaluated at least
    ``evaluations`` times, in their own run folders (``runs/_long/<arm>/seed<k>``). No arms: not run."""

    arms: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)  # empty: experiment.seeds
    steps_multiplier: int = 4
    evaluations: int = 8

    def validate(self) -> None:
        bad = [a for a in self.arms if a not in ARMS]
        if bad:
            raise CondituneError(f"unknown arm(s) {', '.join(map(str, bad))} in experiment.long_horizon.arms")
        if len(set(self.arms)) != len(self.arms) or len(set(self.seeds)) != len(self.seeds):
            raise CondituneError("experiment.long_horizon lists an arm or a seed twice")
        require_range(self.steps_multiplier, "experiment.long_horizon.steps_multiplier", low=1, allow_none=True)
        require_range(self.evaluations, "experiment.long_horizon.evaluations", low=1, allow_none=True)


@dataclass
class ExperimentSettings:
    arms: list[str] = field(default_factory=lambda: list(DEFAULT_ARMS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    count: int = 100  # N: tensors trained by the selection arms (the paper's N for Llama 3 8B)
    scan: str | None = None  # scan file (CSV/JSON/parquet) of the LLM; None: scan it here (cached)
    exclude: list[str] = field(default_factory=list)  # regexes: tensors never selected (e.g. "embed|lm_head")
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    lora_rank: Any = "match"  # "match": r chosen so LoRA's trainable count matches lowest-kappa's; or an integer
    kappa_lora_rank: Any = "match"  # the same for kappa-lora (LoRA on the lowest-kappa modules)
    lora_alpha_ratio: float = 2.0  # lora_alpha = ratio * r
    match_tolerance: float = 0.05  # the matched LoRA / OSF counts must be within this of lowest-kappa's
    pissa_init: str = "pissa_niter_4"  # the pissa arm: LoRA on lora_targets at the lora arm's ranks, this init
    osf_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))  # module suffixes for osf
    osf_rank: Any = "match"  # "match": trainable ranks chosen so OSF's count matches lowest-kappa's; or an integer
    heldout_text: dict[str, str] = field(default_factory=dict)  # language -> held-out text file (a sentence a line)
    heldout_limit: int | None = 64  # sentences per language
    max_tokens: int = 128  # per held-out sentence
    instructions: dict[str, list[str]] | None = None  # language -> prompts; None: DEFAULT_INSTRUCTIONS
    instructions_limit: int | None = 8  # prompts per language
    agreement_new_tokens: int = 24
    metric_batch: int = 8
    # knowledge probe: an mmlu.jsonl-format file (question, answer_a..d, correct_answer), or null to skip it
    knowledge_probe: str | None = None
    knowledge_questions: int | None = 500  # a fixed subset (drawn with knowledge_seed); null: every question
    knowledge_seed: int = 0
    knowledge_max_tokens: int = 320  # question + answer tokens; longer questions are left out before the draw
    knowledge_at: str = "every"  # every: at every evaluation; last: at the last one only (it costs the most)
    share_alignment: bool = True  # one CTC alignment stage per seed (runs/_align/seed<k>), every arm starts from it
    long_horizon: LongHorizonSettings = field(default_factory=LongHorizonSettings)
    keep_checkpoints: bool = False  # False: delete a finished run's checkpoints/ (its final/ model stays)
    shard: str | None = None  # "i/n": this process runs only the runs with index % n == i (one process per GPU)

    def validate(self) -> None:
        if not self.arms:
            raise CondituneError("experiment.arms is empty")
        bad = [a for a in self.arms if a not in ARMS]
        if bad:
            raise CondituneError(
                f"unknown arm(s) {', '.join(map(str, bad))} in experiment.arms (known: {', '.join(ARMS)})"
            )
        if len(set(self.arms)) != len(self.arms):
            raise CondituneError("experiment.arms lists an arm twice")
        if not self.seeds:
            raise CondituneError("experiment.seeds must be a non-empty list of integers")
        if len(set(self.seeds)) != len(self.seeds):
            raise CondituneError("experiment.seeds lists a seed twice")
        require_range(self.count, "experiment.count", low=1, allow_none=True)
        for key in ("lora_rank", "kappa_lora_rank", "osf_rank"):
            value = getattr(self, key)
            if value != "match" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise CondituneError(f"experiment.{key} must be 'match' or a positive integer, not {value!r}")
        require_range(self.lora_alpha_ratio, "experiment.lora_alpha_ratio", low=0, low_open=True, allow_none=True)
        require_range(self.match_tolerance, "experiment.match_tolerance", low=0, allow_none=True)
        keys = ("heldout_limit", "max_tokens", "instructions_limit", "agreement_new_tokens", "metric_batch",
                "knowledge_questions", "knowledge_max_tokens")  # fmt: skip
        for key in keys:
            require_range(getattr(self, key), f"experiment.{key}", low=1, allow_none=True)
        from conditune.speech.configuration import lora_init_option

        lora_init_option(self.pissa_init)
        require_choice(self.knowledge_at, "experiment.knowledge_at", ("every", "last"))
        if self.knowledge_probe is not None and not Path(self.knowledge_probe).is_file():
            raise CondituneError(f"experiment.knowledge_probe: {self.knowledge_probe} not found")
        self.long_horizon.validate()
        for lang, path in self.heldout_text.items():
            if not Path(str(path)).is_file():
                raise CondituneError(f"experiment.heldout_text.{lang}: {path} not found")
        if self.scan is not None and not Path(self.scan).is_file():
            raise CondituneError(f"experiment.scan: {self.scan} not found")
        if self.shard is not None:
            parse_shard(self.shard)


@dataclass
class ExperimentConfig(TrainConfig):
    experiment: ExperimentSettings = field(default_factory=ExperimentSettings)

    def validate(self) -> None:
        self.experiment.validate()
        if self.training.max_seconds is not None:
            raise CondituneError("training.max_seconds must be null in an experiment: every arm trains the same steps")
        if self.training.init_from is not None:
            raise CondituneError("training.init_from is set per run in an experiment (the shared alignment stage)")
        if self.experiment.long_horizon.arms and not self.training.max_steps:
            raise CondituneError("experiment.long_horizon needs training.max_steps (it trains a multiple of them)")
        self.train_config_for(self.experiment.seeds[0], "unused", {"mode": "none"}).validate()

    def recipe(self) -> TrainConfig:
        """The training sections alone (what every arm shares)."""
        return training_part(self)

    def train_config_for(
        self,
        seed: int,
        output_dir: str | Path,
        trainable: Mapping[str, Any],
        *,
        init_from: str | Path | None = None,
        long_horizon: bool = False,
    ) -> TrainConfig:
        """The :class:`TrainConfig` of one run: same data, steps and schedule for every arm.

        ``init_from``: the shared alignment checkpoint the main phase starts from; ``long_horizon``: the main
        steps times ``long_horizon.steps_multiplier``, evaluated at least ``long_horizon.evaluations`` times."""
        from conditune.config import build

        cfg = self.recipe()
        cfg.model.trainable = build(TrainableConfig, trainable, "model.trainable")
        cfg.training.seed = int(seed)
        cfg.training.max_seconds = None
        cfg.training.init_from = str(init_from) if init_from is not None else None
        if long_horizon:
            h = self.experiment.long_horizon
            cfg.training.max_steps = (cfg.training.max_steps or 1) * h.steps_multiplier
            cfg.evaluation.every = max(1, cfg.training.max_steps // h.evaluations)
        cfg.output.dir = str(output_dir)
        cfg.output.save_every = cfg.evaluation.every  # a checkpoint at every evaluation: a kill redoes one interval
        cfg.output.keep_last = 1
        cfg.output.progress = False
        return cfg


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise CondituneError(f"experiment.shard must look like i/n (e.g. 0/4), not {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise CondituneError(f"experiment.shard {text!r}: need 0 <= i < n")
    return i, n


def load_experiment_config(
    path: str | Path | Mapping[str, Any], overrides: Sequence[str] | Mapping[str, Any] = ()
) -> ExperimentConfig:
    return load_config(ExperimentConfig, path, overrides)
