"""AdamW over the trainable parameters (adaptor and LLM groups) and the two-phase learning-rate schedule."""

from __future__ import annotations

import math

import torch

from conditune.errors import CondituneError

ADAPTOR_PREFIX = "adaptor."  # the adaptor and its CTC head train at optimizer.lr; the LLM at optimizer.llm_lr


def build_optimizer(model: torch.nn.Module, config) -> torch.optim.Optimizer:
    """AdamW with one group per (part, learning rate, weight decay); no decay on biases, norms and scalars."""
    o = config.optimizer
    groups: dict[tuple[str, float, float], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "adaptor" if name.startswith(ADAPTOR_PREFIX) else "llm"
        lr = o.lr if part == "adaptor" or o.llm_lr is None else o.llm_lr
        decay = o.weight_decay if param.ndim >= 2 else 0.0
        groups.setdefault((part, lr, decay), []).append(param)
    if not groups:
        raise CondituneError("nothing to train: no trainable parameters")
    params = [{"params": p, "lr": lr, "weight_decay": wd, "name": part} for (part, lr, wd), p in sorted(groups.items())]
    return torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), fused=o.fused or None)


def schedule_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Learning-rate multiplier after ``step`` scheduler steps: linear warmup, then cosine/linear decay or constant
    (the shapes of transformers' ``get_*_schedule_with_warmup``)."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return max(0.0, 1.0 - progress)


def build_scheduler(optimizer: torch.optim.Optimizer, config, total_steps: int):
    """Two phases: ``align_steps`` at a constant (warmed-up) adaptor rate, then the main schedule over the rest."""
    o, t = config.optimizer, config.training
    align = min(t.align_steps, total_steps)
    main = total_steps - align
    align_ratio = (o.align_lr / o.lr) if o.align_lr else 1.0

    def main_factor(step: int) -> float:
        if step < align:
            return schedule_factor(step, min(o.warmup_steps, align), align, "constant")
        return schedule_factor(step - align, min(o.warmup_steps, main), main, o.schedule)

    def adaptor_factor(step: int) -> float:
        return main_factor(step) * (align_ratio if step < align else 1.0)

    lambdas = [adaptor_factor if group.get("name") == "adaptor" else main_factor for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """``{"lr": adaptor rate, "llm_lr": LLM rate}`` as they stand (for the metrics log)."""
    rates: dict[str, float] = {}
    for group in optimizer.param_groups:
        rates.setdefault("lr" if group.get("name") == "adaptor" else "llm_lr", group["lr"])
    return rates


def scheduler_at(scheduler, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Put ``scheduler`` (and its optimizer's learning rates) where ``step`` scheduler steps from the start leave
    them: each group at ``initial lr · factor(step)``, the value ``LambdaLR`` computes after that many steps."""
    rates = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    state = scheduler.state_dict()
    state.update({"last_epoch": step, "_step_count": step + 1, "_last_lr": list(rates)})
    scheduler.load_state_dict(state)
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate


def adaptor_groups(optimizer: torch.optim.Optimizer) -> list[int]:
    """Indices of the optimizer's adaptor groups (the adaptor and its CTC head), in order."""
    return [i for i, group in enumerate(optimizer.param_groups) if group.get("name") == "adaptor"]
