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

Checkpoints: `state_dict(param_names)` / `load_state_dict(state, param_names, strict=True)`, with
`param_names` {model parameter: unique name} built by the caller from the model chunks. States
are matched by name and saved full-size, so they do not depend on buckets, DP size or ZeRO; the
dict is plain data (loads with torch.load(weights_only=True)), tensors on the CPU:

    {"format": "ascendspeed-optimizer-v1",
     "param_groups": [{<every option of the inner torch group: lr, betas (list), eps,
                        weight_decay, amsgrad, ..., wd_mult, lr_mult, name>,
                       "params": [names of the group's parameters]}, ...],
     "state": {name: {"step": float, "exp_avg": fp32 tensor shaped like the parameter,
                      "exp_avg_sq": same (and any other per-element AdamW state, e.g.
                      max_exp_avg_sq),
                      "master": same, only where the fp32 master is separate from the model
                      (Float16Optimizer; DistributedOptimizer over half-precision parameters)}},
     "loss_scaler": scaler.state_dict()}

A parameter without AdamW state yet (no step taken) is absent from "state". `state_dict` is
returned on DP rank 0 and None on the other DP ranks (for DistributedOptimizer it is a
collective over DP that every DP rank must call). `load_state_dict`: every DP rank passes the
same full state; load the model weights first (see there). The next `step()` is then bitwise the
uninterrupted run's.
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.distributed as dist

from ascendspeed import device
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
        if "scale" not in state:
            raise ValueError(f"loss scaler state lacks 'scale' (got keys {sorted(state)})")
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
        missing = [k for k in ("scale", "growth_tracker", "hysteresis_tracker") if k not in state]
        if missing:
            raise ValueError(f"dynamic loss scaler state lacks {missing} (got keys {sorted(state)}): "
                             f"it was saved by a constant scaler")
        self.scale = float(state["scale"])
        self._growth_tracker = int(state["growth_tracker"])
        self._hysteresis_tracker = int(state["hysteresis_tracker"])


MakeOptimizer = Callable[[list[dict]], torch.optim.Optimizer]
LossScaler = ConstantLossScaler | DynamicLossScaler

STATE_FORMAT = "ascendspeed-optimizer-v1"
# Group options that say how torch runs the step on this machine, not what it computes: kept from
# the optimizer being loaded into rather than taken from the saved groups.
_IMPLEMENTATION_OPTIONS = frozenset({"foreach", "fused", "capturable", "differentiable"})

try:
    from torch.optim.optimizer import _get_scalar_dtype
except ImportError:  # older torch: AdamW's step is a float32 tensor
    def _get_scalar_dtype(is_fused=None):
        return torch.float32


def _plain(value):
    """A group option as plain data (tuples as lists, tensors detached on the CPU)."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if torch.is_tensor(value):
        return value.detach().cpu().clone()
    return value


def _step_tensor(value: float, group: dict, device: torch.device) -> torch.Tensor:
    """`step` as torch's AdamW would have created it (a float32 CPU scalar, or on the
    parameter's device for capturable / fused)."""
    if group.get("capturable") or group.get("fused"):
        return torch.tensor(value, dtype=_get_scalar_dtype(is_fused=True), device=device)
    return torch.tensor(value, dtype=_get_scalar_dtype())


class MegatronOptimizer:
    """The step sequence; subclasses say which fp32 tensors the inner optimizer steps, where
    their gradients are, and how updated values reach the model."""
    optimizer: torch.optim.Optimizer
    sharded = False  # gradients (and the norm's sum of squares) split over DP
    # Unscale and check for inf/nan in one fused foreach kernel (torch's GradScaler op) instead of
    # a multiply plus four small kernels per gradient; False: the plain reference.
    fused_unscale = True
    # --check-for-nan-in-loss-and-grad: a non-finite gradient norm leaves the parameters untouched
    # (step returns (False, norm)) and `local_grads_finite` says whether this rank's were finite.
    stop_on_non_finite_norm = False
    local_grads_finite = True

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
        if self.check_for_overflow:
            overflow = self._unscale_and_find_inf(grads)
            self.scaler.update(overflow)
            if overflow:
                self._release_grads()
                return False, None
        elif self.scaler.scale != 1.0:
            torch._foreach_mul_(grads, 1.0 / self.scaler.scale)
        grad_norm = global_grad_norm(counted, sharded=self.sharded)
        if self.stop_on_non_finite_norm and not math.isfinite(grad_norm):
            self.local_grads_finite = all(bool(torch.isfinite(grad).all()) for grad in counted)
            self._release_grads()
            return False, grad_norm
        clip_grads(grads, self.clip_grad, grad_norm)
        self.optimizer.step()
        self._release_grads()
        self._copy_main_to_model()
        return True, grad_norm

    def _unscale_and_find_inf(self, grads: list[torch.Tensor]) -> bool:
        """Divide the gradients by the loss scale; whether any rank's hold an inf/nan (one
        overflow skips the step everywhere)."""
        # every rank's flag on the device its peers use, even with no gradients of its own
        on = grads[0].device if grads else device.current_device()
        found = torch.zeros(1, dtype=torch.float32, device=on)
        if self.fused_unscale and grads:
            inverse = torch.full((1,), 1.0 / self.scaler.scale, dtype=torch.float32, device=on)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inverse)
        else:
            if self.scaler.scale != 1.0:
                torch._foreach_mul_(grads, 1.0 / self.scaler.scale)
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

    # -- layout-independent state (checkpoints)
    #
    # Subclasses set `group_params` (the model parameters of each inner group, in order, on every
    # rank) and provide `_local_entries()`: for each model parameter this rank steps, the tensor
    # the inner optimizer steps, the flat range [lo, hi) of the parameter it covers (None: all of
    # it), and whether that tensor is an fp32 master separate from the model weights.
    group_params: list[list[torch.nn.Parameter]]

    def reload_model_params(self) -> None:
        """fp32 masters <- model weights, after loading weights without an optimizer state
        (no-op where the masters are the model's own parameters)."""

    def _local_entries(self) -> list[tuple[torch.nn.Parameter, torch.Tensor,
                                           tuple[int, int] | None, bool]]:
        raise NotImplementedError

    def _keeps_master(self, param: torch.nn.Parameter) -> bool:
        """Whether the state of `param` includes an fp32 "master" separate from the model."""
        raise NotImplementedError

    def _names(self, param_names: dict) -> dict[torch.nn.Parameter, str]:
        """The name of every parameter the optimizer serves (checked complete and unique)."""
        names, seen = {}, {}
        for params in self.group_params:
            for param in params:
                name = param_names.get(param)
                if not isinstance(name, str):
                    raise ValueError(f"param_names has no name for a parameter of shape "
                                     f"{tuple(param.shape)} that the optimizer steps")
                if name in seen:
                    raise ValueError(f"param_names gives the name {name!r} to two parameters")
                seen[name] = param
                names[param] = name
        return names

    def _pack(self, names: dict, state: dict) -> dict:
        groups = []
        for group, params in zip(self.optimizer.param_groups, self.group_params):
            saved = {key: _plain(value) for key, value in group.items() if key != "params"}
            saved["params"] = [names[p] for p in params]
            groups.append(saved)
        return {"format": STATE_FORMAT, "param_groups": groups, "state": state,
                "loss_scaler": dict(self.scaler.state_dict())}

    @torch.no_grad()
    def state_dict(self, param_names: dict[torch.nn.Parameter, str]) -> dict | None:
        """The optimizer state by parameter name, full-size, on the CPU (see module docstring):
        independent of bucket layout, DP size and ZeRO. Returned on DP rank 0, None on the other
        DP ranks (which hold the same state), as for the distributed optimizer."""
        names = self._names(param_names)
        if self.grads.dp_rank != 0:
            return None
        state = {}
        for param, tensor, _, separate in self._local_entries():
            inner = self.optimizer.state.get(tensor)
            if not inner:
                continue
            entry = {}
            for key, value in inner.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    entry[key] = value.detach().float().cpu().clone().view(param.shape)
                else:
                    entry[key] = float(value)
            if separate:
                entry["master"] = tensor.detach().float().cpu().clone().view(param.shape)
            state[names[param]] = entry
        return self._pack(names, state)

    def _check_state(self, state, names: dict, strict: bool) -> dict:
        """Validate a saved state against this model; {name: entry} of the saved states."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"optimizer state has format {got!r}, expected {STATE_FORMAT!r}")
        for key in ("param_groups", "state", "loss_scaler"):
            if key not in state:
                raise ValueError(f"optimizer state ({STATE_FORMAT}) lacks {key!r}")
        grouped = [n for g in state["param_groups"] for n in g["params"]]
        entries = state["state"]
        ours = {name: param for param, name in names.items()}
        if strict:
            for name, param in ours.items():
                if name not in grouped:
                    raise ValueError(f"parameter {name!r} (shape {tuple(param.shape)}) is missing "
                                     f"from the saved optimizer state's param_groups")
                if entries and name not in entries:
                    raise ValueError(f"parameter {name!r} (shape {tuple(param.shape)}) is missing "
                                     f"from the saved optimizer state")
            for name in list(grouped) + list(entries):
                if name not in ours:
                    raise ValueError(f"the saved optimizer state has parameter {name!r}, which "
                                     f"this model does not have")
        for name, param in ours.items():
            entry = entries.get(name)
            if entry is None:
                continue
            if not isinstance(entry, dict) or "step" not in entry:
                raise ValueError(f"optimizer state of parameter {name!r} has no 'step'")
            for key, value in entry.items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(f"optimizer state {key!r} of parameter {name!r} has shape "
                                     f"{tuple(value.shape)}, expected the parameter's shape "
                                     f"{tuple(param.shape)}")
            if strict and self._keeps_master(param) and "master" not in entry:
                raise ValueError(f"optimizer state of parameter {name!r} has no fp32 'master' "
                                 f"(saved by an fp32 optimizer?): load with strict=False to take "
                                 f"the masters from the model weights")
        return {name: entries[name] for name in ours if name in entries}

    def _group_options(self, saved_groups: list[dict], names: dict,
                       strict: bool) -> list[tuple[dict, dict]]:
        """(inner group, saved options to set) for each group: the saved group holding its
        parameters (by name), else the one at the same index."""
        where = {n: i for i, g in enumerate(saved_groups) for n in g["params"]}
        updates = []
        for index, (group, params) in enumerate(zip(self.optimizer.param_groups,
                                                    self.group_params)):
            found = sorted({where[names[p]] for p in params if names[p] in where})
            if len(found) > 1 and strict:
                raise ValueError(f"the parameters of group {index} ({group.get('name', '')!r}) are "
                                 f"spread over saved groups {found}")
            if found:
                saved = saved_groups[found[0]]
            elif index < len(saved_groups):
                saved = saved_groups[index]
            else:
                continue
            options = {}
            for key, value in saved.items():
                if key == "params" or key in _IMPLEMENTATION_OPTIONS:
                    continue
                if isinstance(group.get(key), tuple) and isinstance(value, list):
                    value = tuple(value)
                elif torch.is_tensor(value):
                    value = value.clone()
                options[key] = value
            updates.append((group, options))
        return updates

    @torch.no_grad()
    def load_state_dict(self, state: dict, param_names: dict[torch.nn.Parameter, str],
                        strict: bool = True) -> None:
        """Restore a state from `state_dict` (of any layout: DP size, ZeRO on/off, buckets).

        Every DP rank passes the same full state and keeps what it steps. The model weights are
        loaded by the caller; load them BEFORE this call: fp32 masters are restored from the
        saved "master" where the state has one, else (an fp32 checkpoint, with strict=False, or
        a parameter that has no state yet) copied from the model weights as they are now.
        The model weights themselves are never written here. Group options (lr, betas, ...) are
        restored, except how torch runs the step (foreach, fused, capturable, differentiable).

        strict=True: the saved names must be exactly this model's and, once any step was
        taken, every parameter must have a state (and a master where this optimizer keeps one).
        strict=False: missing parameters start fresh, unknown ones are ignored. Shapes are
        always checked. Errors are ValueErrors naming the parameter, raised before anything
        is changed."""
        names = self._names(param_names)
        entries = self._check_state(state, names, strict)
        options = self._group_options(state["param_groups"], names, strict)
        copy.deepcopy(self.scaler).load_state_dict(state["loss_scaler"])  # raises if unfit
        groups = {id(t): g for g in self.optimizer.param_groups for t in g["params"]}
        new_state = {}
        for param, tensor, span, separate in self._local_entries():
            entry = entries.get(names[param])

            def piece(full: torch.Tensor) -> torch.Tensor:
                flat = full.reshape(-1)
                return flat if span is None else flat[span[0]:span[1]]

            if separate:
                source = entry["master"] if entry is not None and "master" in entry \
                    else param.detach()
                tensor.copy_(piece(source).view_as(tensor))
            if entry is None:
                continue
            inner = {}
            for key, value in entry.items():
                if key == "master":
                    continue
                if key == "step":
                    inner[key] = _step_tensor(float(value), groups[id(tensor)], tensor.device)
                elif torch.is_tensor(value) and value.dim() > 0:
                    inner[key] = piece(value).to(device=tensor.device, dtype=tensor.dtype,
                                                 copy=True).view_as(tensor)
                else:
                    inner[key] = value
            new_state[tensor] = inner
        for group, saved in options:
            group.update(saved)
        self.scaler.load_state_dict(state["loss_scaler"])
        self.optimizer.state.clear()
        self.optimizer.state.update(new_state)


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
        self.group_params = [list(g["params"]) for g in param_groups]

    def _local_entries(self):
        return [(p, p, None, False) for p in self.params]

    def _keeps_master(self, param):
        return False

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
        self.group_params = [list(g["params"]) for g in param_groups]

    def _local_entries(self):
        return [(p, master, None, True) for p, master in self.masters.items()]

    def _keeps_master(self, param):
        return True

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """Masters <- model weights (after loading weights without an optimizer state)."""
        for param, master in self.masters.items():
            master.copy_(param)

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
