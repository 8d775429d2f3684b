"""Optimizers, mixed precision, loss scaling, gradient clipping, LR schedules and batch-size ramp-up."""
from .batch_rampup import global_batch_size_at, validate_rampup
from .clip import clip_by_norm, counts_once, global_norm
from .grad_scaler import DynamicLossScaler
from .lr_schedule import LRSchedule
from .optimizer import Optimizer, build_optimizer

__all__ = ["Optimizer", "build_optimizer", "DynamicLossScaler", "LRSchedule", "global_norm",
           "clip_by_norm", "counts_once", "global_batch_size_at", "validate_rampup"]
