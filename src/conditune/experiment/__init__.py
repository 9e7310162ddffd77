"""Controlled comparisons of what to fine-tune: lowest-κ vs highest-κ, random, LoRA (matched), full, ... over seeds.

Components: the config (:mod:`~conditune.experiment.config`), what each arm trains
(:mod:`~conditune.experiment.arms`), the folder layout (:mod:`~conditune.experiment.runs`), the report
(:mod:`~conditune.experiment.report`), its statistics (:mod:`~conditune.experiment.evidence`: paired bootstrap
against lowest-kappa, the long-horizon verdict, the Pareto front) and plots (:mod:`~conditune.experiment.plots`). The recipe that runs them is :mod:`conditune.recipes.experiment`:

>>> from conditune.recipes.experiment import run_experiment
>>> run_experiment("configs/experiment_small.yaml", "runs/experiment", ["experiment.seeds=[0]"])
"""

from conditune.experiment.config import ARMS, ExperimentConfig, ExperimentSettings, load_experiment_config

__all__ = ["ARMS", "ExperimentConfig", "ExperimentSettings", "load_experiment_config"]
