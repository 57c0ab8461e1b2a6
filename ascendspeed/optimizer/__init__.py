"""Optimizer pieces: weight-decay parameter groups and the learning-rate schedule."""
from ascendspeed.optimizer.lr_scheduler import AnnealingLR, OptimizerParamScheduler
from ascendspeed.optimizer.param_groups import get_param_groups

__all__ = ["AnnealingLR", "OptimizerParamScheduler", "get_param_groups"]
