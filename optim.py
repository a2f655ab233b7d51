"""The policy's optimizer: building it (fused kernels where torch has them), the learning-rate
schedule, fp16 loss scaling, and one clipped optimizer step.

Nothing here reads the config or knows about trainers: the trainer passes the optimizer class,
the settings and the functions that clip its gradient (which depend on how the policy is sharded)
and check that training has not diverged.
"""
import inspect
import math
from typing import Callable, Iterable, List, Optional

import torch

from utils import rank0_print


def build_torch_optimizer(optimizer_class, params: List[torch.nn.Parameter], lr: float):
    """The optimizer with its fused kernel where it has one for these parameters (plain float32
    or float64 tensors on CPU or CUDA): one pass per tensor instead of one per arithmetic step,
    e.g. AdamW on 2 CPU cores for a 20M-parameter model takes 15 ms per step instead of 56.
    Sharded (DTensor) or low-precision parameters keep the default implementation."""
    fusable = ("fused" in inspect.signature(optimizer_class).parameters and all(
        type(p) is torch.nn.Parameter and p.device.type in ("cpu", "cuda")
        and p.dtype in (torch.float32, torch.float64)
        for p in params))
    if fusable:
        try:
            return optimizer_class(params, lr=lr, fused=True)
        except (RuntimeError, ValueError):  # a combination this torch has no fused kernel for
            pass
    return optimizer_class(params, lr=lr)


def build(optimizer_class, params: List[torch.nn.Parameter], lr: float, warmup_steps: int,
          loss_scaling: bool):
    """(optimizer, LR schedule, LossScaler or None): build_torch_optimizer, warmup_schedule and,
    when `loss_scaling` (fp16), a LossScaler on the optimizer."""
    optimizer = build_torch_optimizer(optimizer_class, params, lr)
    return (optimizer, warmup_schedule(optimizer, warmup_steps),
            LossScaler(optimizer) if loss_scaling else None)


def warmup_schedule(optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_steps` updates, then constant (the DPO repository's)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / (warmup_steps + 1)))


def set_base_lr(optimizer, scheduler, lr: float):
    """Make `lr` the schedule's base rate after a checkpoint was loaded. A checkpoint's optimizer
    and scheduler carry the lr they were saved with, and `resume_from` into a new directory may
    start from one with another (e.g. a lower lr after a divergence); resuming a run in its own
    directory cannot change lr, and then the values set here are the restored ones exactly."""
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)  # LambdaLR's own formula


class LossScaler:
    """Dynamic loss scaling for fp16 (Micikevicius et al. 2018, "Mixed Precision Training",
    section 3.3; the defaults of torch.amp.GradScaler): the loss is multiplied by a power of two
    before backward, so that small gradients do not flush to zero in float16, and the gradients
    are divided by it again before clipping. A step whose gradient is not finite is skipped and
    the scale halved; after GROWTH_INTERVAL finite steps in a row it doubles. The scale and the
    count live in the optimizer's first param group, so every trainer saves and restores them
    with the optimizer state (torch's GradScaler keeps per-device overflow flags, which disagree
    between ranks under sharding; the global gradient norm from clip_gradient does not).

    Args:
        optimizer: the policy's optimizer.
    """
    INIT_SCALE, GROWTH_INTERVAL = 2.0 ** 16, 2000

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.group.setdefault("loss_scale", self.INIT_SCALE)
        self.group.setdefault("loss_scale_good_steps", 0)

    @property
    def group(self) -> dict:
        # looked up each time: optimizer.load_state_dict replaces the param group dicts
        return self.optimizer.param_groups[0]

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.group["loss_scale"]

    def unscale(self, parameters):
        inverse = 1.0 / self.group["loss_scale"]  # exact: the scale is a power of two
        with torch.no_grad():
            for p in parameters:
                if p.grad is not None:
                    p.grad.mul_(inverse)

    def update(self, grad_norm: float) -> bool:
        """Adjust the scale after a step's gradient norm; returns whether to take the step."""
        group = self.group
        if not math.isfinite(grad_norm):
            group["loss_scale"] /= 2
            group["loss_scale_good_steps"] = 0
            rank0_print(f"fp16: gradient overflow, step skipped; loss scale now {group['loss_scale']:g}")
            return False
        group["loss_scale_good_steps"] += 1
        if group["loss_scale_good_steps"] >= self.GROWTH_INTERVAL:
            group["loss_scale"] *= 2
            group["loss_scale_good_steps"] = 0
        return True


def clip_and_step(optimizer, loss_scaler: Optional[LossScaler], clip: Callable[[], float],
                  parameters: Callable[[], Iterable[torch.nn.Parameter]],
                  check_finite: Callable[[float], None]) -> float:
    """Clip the accumulated gradient and take the optimizer step. Under fp16 loss scaling the
    gradient is unscaled first, and a step whose gradient overflowed is skipped (the scaler lowers
    its scale) instead of counting as divergence.

    Args:
        optimizer: the policy's optimizer.
        loss_scaler: the fp16 loss scaler, or None.
        clip: clips the gradient to max_grad_norm and returns its norm before clipping.
        parameters: returns the policy's parameters (whose gradients are unscaled).
        check_finite: called with the gradient norm (0.0 for a skipped fp16 step); raises when
            training diverged.
    Returns:
        The gradient norm before clipping.
    """
    if loss_scaler is None:
        grad_norm = clip()
        check_finite(grad_norm)
        optimizer.step()
        return grad_norm
    loss_scaler.unscale(parameters())
    grad_norm = clip()
    finite = loss_scaler.update(grad_norm)
    check_finite(grad_norm if finite else 0.0)
    if finite:
        optimizer.step()
    return grad_norm
