"""Controlled comparisons of what to fine-tune: lowest-κ vs highest-κ, random, LoRA (matched), full, ... over seeds.

>>> from conditune.experiment import run_experiment
>>> run_experiment("configs/experiment_small.yaml", "runs/experiment", ["experiment.seeds=[0]"])
"""

from conditune.experiment.config import ARMS, ExperimentConfig, load_experiment_config
from conditune.experiment.runner import run_experiment

__all__ = ["ARMS", "ExperimentConfig", "load_experiment_config", "run_experiment"]
