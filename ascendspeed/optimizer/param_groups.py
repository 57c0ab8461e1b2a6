"""AdamW parameter groups with Megatron-LM's weight-decay rule.

No weight decay for biases and norm parameters: any parameter whose name ends in "bias" or whose
tensor has one dimension (LayerNorm weight and bias, biases). Everything else (Linear and
Embedding weights) decays. Parameters with requires_grad=False are left out; a parameter shared
by several modules (tied embeddings) appears once.
"""
from __future__ import annotations


def _no_weight_decay(name: str, param) -> bool:
    return name.endswith("bias") or len(param.shape) == 1


def get_param_groups(model, weight_decay: float | None = None) -> list[dict]:
    """[decay group, no-decay group] for `torch.optim.AdamW(groups, ...)`.

    `model` is a module or a list of modules (model chunks). The no-decay group has weight_decay
    0.0; the decay group has `weight_decay` when given, else the optimizer's default. Both carry
    Megatron's `wd_mult` / `lr_mult` and a `name`. An empty group is left out."""
    modules = model if isinstance(model, (list, tuple)) else [model]
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for name, param in module.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if _no_weight_decay(name, param) else decay).append(param)
    decay_group = {"name": "decay", "params": decay, "wd_mult": 1.0, "lr_mult": 1.0}
    if weight_decay is not None:
        decay_group["weight_decay"] = weight_decay
    no_decay_group = {"name": "no_decay", "params": no_decay, "weight_decay": 0.0,
                      "wd_mult": 0.0, "lr_mult": 1.0}
    return [group for group in (decay_group, no_decay_group) if group["params"]]
