"""Optimizers with Megatron's mixed-precision contract.

`FP32Optimizer` steps the model's own fp32 parameters. `Float16Optimizer` serves a bf16 or fp16
model: it keeps fp32 master copies that AdamW updates, accumulates every micro-batch's gradient
into fp32 master gradients (no half-precision accumulation), unscales them, skips the step when any
rank saw an inf/nan (fp16 overflow), and copies the updated masters back into the model. Both expose
`scale_loss`, `accumulate_grads`, `step(reduce, clip)`, `zero_grad`, `param_groups` and `loss_scale`,
so the training loop does not branch on precision.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.distributed as dist


class ConstantLossScaler:
    def __init__(self, scale: float = 1.0):
        self.scale = float(scale)

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])


class DynamicLossScaler:
    """Megatron's dynamic scaler: halve after `hysteresis` overflows (never below min_scale),
    double after `window` clean steps in a row."""

    def __init__(self, initial_scale: float = 2.0 ** 32, min_scale: float = 1.0, window: int = 1000,
                 hysteresis: int = 2, backoff: float = 0.5, growth: float = 2.0):
        if initial_scale <= 0 or min_scale <= 0 or window < 1 or hysteresis < 1:
            raise ValueError("loss scaler: scales must be positive, window and hysteresis >= 1")
        self.scale = float(initial_scale)
        self.min_scale = float(min_scale)
        self.window = window
        self.hysteresis = hysteresis
        self.backoff = backoff
        self.growth = growth
        self._growth_tracker = 0
        self._hysteresis_tracker = hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff, self.min_scale)
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.window:
                self._growth_tracker = 0
                self._hysteresis_tracker = self.hysteresis
                self.scale *= self.growth

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_tracker": self._growth_tracker,
                "hysteresis_tracker": self._hysteresis_tracker}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self._growth_tracker = int(state["growth_tracker"])
        self._hysteresis_tracker = int(state["hysteresis_tracker"])


GradReducer = Callable[[list[torch.Tensor]], None]
GradClipper = Callable[[list[torch.nn.Parameter]], float]


class _WrappedOptimizer:
    """What the loop and the LR scheduler read: the inner optimizer's groups and the loss scale."""
    optimizer: torch.optim.Optimizer
    scaler: ConstantLossScaler | DynamicLossScaler

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale


class FP32Optimizer(_WrappedOptimizer):
    """The model's parameters are the master weights."""

    def __init__(self, param_groups: list[dict], make_optimizer: Callable[[list[dict]], torch.optim.Optimizer]):
        self.optimizer = make_optimizer(param_groups)
        self.scaler = ConstantLossScaler(1.0)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def accumulate_grads(self) -> None:
        pass  # autograd already accumulates in fp32

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, reduce_grads: GradReducer, clip: GradClipper) -> tuple[bool, float]:
        reduce_grads([p.grad for p in self.params if p.grad is not None])
        grad_norm = clip(self.params)
        self.optimizer.step()
        return True, grad_norm


class Float16Optimizer(_WrappedOptimizer):
    """fp32 master weights and gradients for a bf16/fp16 model, with loss scaling."""

    def __init__(self, param_groups: list[dict], make_optimizer: Callable[[list[dict]], torch.optim.Optimizer],
                 scaler):
        self.scaler = scaler
        self.model_params: list[torch.nn.Parameter] = []
        self.master_params: list[torch.nn.Parameter] = []
        master_groups = []
        for group in param_groups:
            masters = []
            for param in group["params"]:
                master = torch.nn.Parameter(param.detach().float().clone())
                for attribute in ("tensor_model_parallel", "partition_dim"):  # for clipping
                    if hasattr(param, attribute):
                        setattr(master, attribute, getattr(param, attribute))
                self.model_params.append(param)
                self.master_params.append(master)
                masters.append(master)
            master_groups.append({**group, "params": masters})
        self.optimizer = make_optimizer(master_groups)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scaler.scale

    def accumulate_grads(self) -> None:
        """Move this micro-batch's half-precision gradients into the fp32 master gradients."""
        for param, master in zip(self.model_params, self.master_params):
            if param.grad is None:
                continue
            if master.grad is None:
                master.grad = param.grad.float()
            else:
                master.grad.add_(param.grad)
            param.grad = None

    def zero_grad(self) -> None:
        for param, master in zip(self.model_params, self.master_params):
            param.grad = None
            master.grad = None

    def step(self, reduce_grads: GradReducer, clip: GradClipper) -> tuple[bool, float | None]:
        grads = [m.grad for m in self.master_params if m.grad is not None]
        reduce_grads(grads)
        inverse = 1.0 / self.scaler.scale
        found_inf = torch.zeros((), dtype=torch.float32)
        for grad in grads:
            grad.mul_(inverse)
            found_inf = torch.maximum(found_inf, (~torch.isfinite(grad)).any().float().cpu())
        if dist.is_initialized():  # one rank's overflow skips the step everywhere
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
        overflow = bool(found_inf.item())
        self.scaler.update(overflow)
        if overflow:
            return False, None
        grad_norm = clip(self.master_params)
        self.optimizer.step()
        with torch.no_grad():
            for param, master in zip(self.model_params, self.master_params):
                param.copy_(master)
        return True, grad_norm


def build_optimizer(param_groups: Iterable[dict], make_optimizer, params_dtype: torch.dtype,
                    scaler=None):
    """FP32Optimizer for an fp32 model, Float16Optimizer (with `scaler`, default constant 1) else."""
    groups = list(param_groups)
    if params_dtype == torch.float32:
        return FP32Optimizer(groups, make_optimizer)
    return Float16Optimizer(groups, make_optimizer, scaler or ConstantLossScaler(1.0))
