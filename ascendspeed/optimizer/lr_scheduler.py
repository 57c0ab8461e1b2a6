"""Megatron-LM's learning-rate schedule (OptimizerParamScheduler, formerly AnnealingLR).

    warm-up   num_steps <= warmup_steps:  init_lr + (max_lr - init_lr) * num_steps / warmup_steps
    constant  afterwards:                 max_lr
    after     num_steps > decay_steps:    min_lr
    decay     ratio = (num_steps - warmup_steps) / (decay_steps - warmup_steps)
              linear: min_lr + (max_lr - min_lr) * (1 - ratio)
              cosine: min_lr + (max_lr - min_lr) * 0.5 * (cos(pi * ratio) + 1)
              inverse-square-root: max(min_lr, max_lr * sqrt(max(warmup, 1)) / sqrt(max(steps, 1)))

A step is whatever unit the caller counts in. The trainer follows Megatron-LM and counts samples
in both modes: `LRScheduleConfig` converts iteration flags to samples (x global batch size) and
each iteration calls `step(increment=global_batch_size)`. Every optimizer param group gets
`lr = get_lr() * group.get("lr_mult", 1.0)`; weight decay is left to the groups.
"""
from __future__ import annotations

import math

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")

# state_dict keys: Megatron-LM's, and the older AnnealingLR names read on load (Megatron-DeepSpeed
# and BigScience checkpoints).
_LEGACY_KEYS = {"max_lr": ("start_lr",), "lr_warmup_steps": ("warmup_steps", "warmup_iter"),
                "lr_decay_steps": ("decay_steps", "end_iter"), "lr_decay_style": ("decay_style",),
                "num_steps": ("num_iters",)}


class OptimizerParamScheduler:
    def __init__(self, optimizer, *, max_lr: float, min_lr: float, lr_warmup_steps: float,
                 lr_decay_steps: float, lr_decay_style: str, init_lr: float = 0.0,
                 use_checkpoint_opt_param_scheduler: bool = False,
                 override_opt_param_scheduler: bool = False):
        if lr_decay_style not in DECAY_STYLES:
            raise ValueError(f"lr_decay_style {lr_decay_style!r}: expected one of "
                             f"{', '.join(DECAY_STYLES)}")
        if not 0.0 <= min_lr <= max_lr:
            raise ValueError(f"need 0 <= min_lr ({min_lr}) <= max_lr ({max_lr})")
        if lr_decay_steps <= 0:
            raise ValueError(f"lr_decay_steps must be positive, got {lr_decay_steps}")
        if not 0 <= lr_warmup_steps < lr_decay_steps:
            raise ValueError(f"need 0 <= lr_warmup_steps ({lr_warmup_steps}) < lr_decay_steps "
                             f"({lr_decay_steps})")
        if use_checkpoint_opt_param_scheduler and override_opt_param_scheduler:
            raise ValueError("use_checkpoint_opt_param_scheduler and override_opt_param_scheduler "
                             "exclude each other")
        self.optimizer = optimizer
        self.init_lr = init_lr
        self.max_lr = float(max_lr)
        self.min_lr = min_lr
        self.lr_warmup_steps = lr_warmup_steps
        self.lr_decay_steps = lr_decay_steps
        self.lr_decay_style = lr_decay_style
        self.use_checkpoint_opt_param_scheduler = use_checkpoint_opt_param_scheduler
        self.override_opt_param_scheduler = override_opt_param_scheduler
        self.num_steps = 0
        self.step(0)

    @classmethod
    def from_config(cls, optimizer, config) -> "OptimizerParamScheduler":
        """From a PretrainConfig (its .optimizer and .lr_schedule); steps are samples."""
        schedule = config.lr_schedule
        return cls(optimizer, max_lr=config.optimizer.lr, min_lr=config.optimizer.min_lr,
                   lr_warmup_steps=schedule.warmup_steps, lr_decay_steps=schedule.decay_steps,
                   lr_decay_style=schedule.style, init_lr=schedule.warmup_init)

    def get_lr(self) -> float:
        if self.lr_warmup_steps > 0 and self.num_steps <= self.lr_warmup_steps:
            return self.init_lr + ((self.max_lr - self.init_lr) * float(self.num_steps)
                                   / float(self.lr_warmup_steps))
        if self.lr_decay_style == "constant":
            return self.max_lr
        if self.num_steps > self.lr_decay_steps:
            return self.min_lr
        if self.lr_decay_style == "inverse-square-root":
            warmup_steps = max(self.lr_warmup_steps, 1)
            num_steps = max(self.num_steps, 1)
            return max(self.min_lr, self.max_lr * warmup_steps ** 0.5 / num_steps ** 0.5)
        decay_ratio = (float(self.num_steps - self.lr_warmup_steps)
                       / float(self.lr_decay_steps - self.lr_warmup_steps))
        if self.lr_decay_style == "linear":
            coeff = 1.0 - decay_ratio
        else:  # cosine
            coeff = 0.5 * (math.cos(math.pi * decay_ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def step(self, increment: float = 1) -> float:
        """Advance by `increment` steps (the global batch size, in the trainer); set the lr of
        every param group and return it."""
        self.num_steps += increment
        new_lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = new_lr * group.get("lr_mult", 1.0)
        return new_lr

    def state_dict(self) -> dict:
        return {"max_lr": self.max_lr, "lr_warmup_steps": self.lr_warmup_steps,
                "num_steps": self.num_steps, "lr_decay_style": self.lr_decay_style,
                "lr_decay_steps": self.lr_decay_steps, "min_lr": self.min_lr}

    def _check_and_set(self, value, saved, name: str):
        """Megatron's rule: override -> keep ours; use_checkpoint -> take the checkpoint's;
        otherwise they must agree."""
        if self.override_opt_param_scheduler:
            return value
        if not self.use_checkpoint_opt_param_scheduler and value != saved:
            raise ValueError(f"learning-rate schedule: {name} is {value} here but {saved} in the "
                             f"checkpoint (pass override_opt_param_scheduler to keep this run's "
                             f"value, or use_checkpoint_opt_param_scheduler to take the "
                             f"checkpoint's)")
        return saved

    @staticmethod
    def _saved(state_dict: dict, key: str):
        for name in (key,) + _LEGACY_KEYS.get(key, ()):
            if name in state_dict:
                return state_dict[name]
        raise KeyError(f"learning-rate scheduler state has no {key!r} (keys: "
                       f"{', '.join(sorted(state_dict))})")

    def load_state_dict(self, state_dict: dict) -> None:
        self.max_lr = self._check_and_set(self.max_lr, self._saved(state_dict, "max_lr"),
                                          "max_lr")
        self.min_lr = self._check_and_set(self.min_lr, state_dict["min_lr"], "min_lr")
        self.lr_warmup_steps = self._check_and_set(
            self.lr_warmup_steps, self._saved(state_dict, "lr_warmup_steps"), "lr_warmup_steps")
        self.lr_decay_steps = self._check_and_set(
            self.lr_decay_steps, self._saved(state_dict, "lr_decay_steps"), "lr_decay_steps")
        self.lr_decay_style = self._check_and_set(
            self.lr_decay_style, self._saved(state_dict, "lr_decay_style"), "lr_decay_style")
        self.num_steps = 0
        self.step(increment=self._saved(state_dict, "num_steps"))


AnnealingLR = OptimizerParamScheduler  # Megatron-DeepSpeed's name
