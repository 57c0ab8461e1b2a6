"""Optimizers with Megatron's mixed-precision contract, over data-parallel gradient buffers.

Gradients accumulate in fp32 `param.main_grad` buffers (ascendspeed.core.distributed), whose
buckets are averaged over data parallelism during backward. `step()` then runs Megatron's
finalize sequence: wait for the buckets, sum sequence-parallel and shared-embedding gradients
across ranks, unscale, skip the step everywhere if any rank saw an inf/nan (half precision), clip
by the global norm, step AdamW, copy the masters back into the model.

`FP32Optimizer` steps the model's own fp32 parameters. `Float16Optimizer` serves a bf16 or fp16
model with fp32 master copies (fp16 with a loss scaler). `DistributedOptimizer`
(distrib_optimizer.py) is the ZeRO-1 variant of both. All expose `zero_grad(num_microbatches)`,
`scale_loss`, `step() -> (updated, grad_norm)`, `param_groups` and `loss_scale`, so the training
loop does not branch on precision or sharding.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from ascendspeed.core.distributed import DataParallelGrads, finalize_model_grads
from ascendspeed.optimizer.clip_grads import clip_grads, counts_toward_norm, global_grad_norm

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


MakeOptimizer = Callable[[list[dict]], torch.optim.Optimizer]
LossScaler = ConstantLossScaler | DynamicLossScaler


class MegatronOptimizer:
    """The step sequence; subclasses say which fp32 tensors the inner optimizer steps, where
    their gradients are, and how updated values reach the model."""
    optimizer: torch.optim.Optimizer
    sharded = False  # gradients (and the norm's sum of squares) split over DP

    def __init__(self, grads: DataParallelGrads, scaler: LossScaler, clip_grad: float,
                 check_for_overflow: bool):
        self.grads = grads
        self.scaler = scaler
        self.clip_grad = clip_grad
        self.check_for_overflow = check_for_overflow

    @property
    def param_groups(self) -> list[dict]:
        """The inner optimizer's groups: the LR scheduler writes `lr` here."""
        return self.optimizer.param_groups

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scaler.scale if self.scaler.scale != 1.0 else loss

    def zero_grad(self, num_microbatches: int = 1) -> None:
        """Begin a step of `num_microbatches` backward passes (the count finds each parameter's
        last gradient, which launches its bucket's reduction)."""
        self.grads.zero_grad(num_microbatches)

    def accumulate_grads(self) -> None:
        """No-op, kept for old loops: the gradient hooks accumulate into fp32 buffers."""

    # -- what subclasses provide
    def _main_grads(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Attach fp32 gradients to the stepped tensors; (all of them, those the norm counts)."""
        raise NotImplementedError

    def _copy_main_to_model(self) -> None:
        raise NotImplementedError

    # -- the step
    def step(self) -> tuple[bool, float | None]:
        self.grads.finish_grad_sync()
        finalize_model_grads(self.grads.params)
        grads, counted = self._main_grads()
        if self.scaler.scale != 1.0:
            torch._foreach_mul_(grads, 1.0 / self.scaler.scale)
        if self.check_for_overflow:
            overflow = self._found_inf(grads)
            self.scaler.update(overflow)
            if overflow:
                self._release_grads()
                return False, None
        grad_norm = global_grad_norm(counted, sharded=self.sharded)
        clip_grads(grads, self.clip_grad, grad_norm)
        self.optimizer.step()
        self._release_grads()
        self._copy_main_to_model()
        return True, grad_norm

    @staticmethod
    def _found_inf(grads: list[torch.Tensor]) -> bool:
        """Whether any rank's gradients hold an inf/nan: one overflow skips the step everywhere."""
        found = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
        for grad in grads:
            found = torch.maximum(found, (~torch.isfinite(grad)).any().float())
        if dist.is_initialized():
            dist.all_reduce(found, op=dist.ReduceOp.MAX)
        return bool(found.item())

    def state_bytes(self) -> int:
        """Bytes of the stepped fp32 tensors (masters, or master shards) and of the optimizer
        state on this rank: what ZeRO-1 divides by DP."""
        tensors = [p for g in self.optimizer.param_groups for p in g["params"]]
        tensors += [t for state in self.optimizer.state.values() for t in state.values()
                    if torch.is_tensor(t) and t.dim() > 0]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _release_grads(self) -> None:
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                param.grad = None


def _groups_like(param_groups: list[dict], replace) -> list[dict]:
    """The groups with each parameter mapped through `replace` (None drops it), options kept."""
    out = []
    for group in param_groups:
        params = [q for q in (replace(p) for p in group["params"]) if q is not None]
        out.append({**group, "params": params})
    return out


class FP32Optimizer(MegatronOptimizer):
    """The model's fp32 parameters are the master weights; their grads are the buffers."""

    def __init__(self, grads: DataParallelGrads, param_groups: list[dict],
                 make_optimizer: MakeOptimizer, clip_grad: float = 0.0):
        super().__init__(grads, ConstantLossScaler(1.0), clip_grad, check_for_overflow=False)
        self.optimizer = make_optimizer(_groups_like(param_groups, lambda p: p))
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]

    def _main_grads(self):
        grads = []
        for param in self.params:
            param.grad = param.main_grad
            grads.append(param.main_grad)
        return grads, [p.main_grad for p in self.params if counts_toward_norm(p)]

    def _copy_main_to_model(self) -> None:
        pass


class Float16Optimizer(MegatronOptimizer):
    """fp32 master weights for a bf16/fp16 model, with loss scaling and overflow skips."""

    def __init__(self, grads: DataParallelGrads, param_groups: list[dict],
                 make_optimizer: MakeOptimizer, scaler: LossScaler, clip_grad: float = 0.0):
        super().__init__(grads, scaler, clip_grad, check_for_overflow=True)
        self.masters: dict[torch.nn.Parameter, torch.nn.Parameter] = {}
        for group in param_groups:
            for param in group["params"]:
                self.masters[param] = torch.nn.Parameter(param.detach().float().clone())
        self.optimizer = make_optimizer(_groups_like(param_groups, self.masters.get))

    @property
    def model_params(self) -> list[torch.nn.Parameter]:
        return list(self.masters)

    @property
    def master_params(self) -> list[torch.nn.Parameter]:
        return list(self.masters.values())

    def _main_grads(self):
        grads = []
        for param, master in self.masters.items():
            master.grad = param.main_grad  # already fp32: a view, no copy
            grads.append(master.grad)
        return grads, [p.main_grad for p in self.masters if counts_toward_norm(p)]

    @torch.no_grad()
    def _copy_main_to_model(self) -> None:
        for param, master in self.masters.items():
            param.copy_(master)
