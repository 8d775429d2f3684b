"""Learning-rate schedules: linear warmup, then cosine, linear, constant or WSD (warmup-stable-decay).

Follows Megatron-LM's OptimizerParamScheduler: the rate is a pure function of the iteration, so a resumed
run picks up exactly where it stopped. WSD (Hu et al. 2024, MiniCPM) holds the peak rate and decays only
over the last ``wsd_decay_fraction`` of the steps.
"""
import math

from megagopher.config.schema import DECAYS, check_value
from megagopher.config.validate import validate_lr_schedule


class LRSchedule:
    def __init__(self, lr, min_lr=0.0, warmup_iters=0, total_iters=1, decay="cosine", warmup_init_lr=0.0,
                 wsd_decay_fraction=0.1):
        check_value("optimizer", "decay", decay)  # the optimizer.* rules of config/validate.py
        validate_lr_schedule(lr, min_lr, warmup_iters, total_iters)
        self.lr, self.min_lr, self.warmup_iters, self.total_iters = lr, min_lr, warmup_iters, total_iters
        self.decay, self.warmup_init_lr, self.wsd_decay_fraction = decay, warmup_init_lr, wsd_decay_fraction

    def __call__(self, iteration):
        """The rate for 1-based ``iteration``."""
        if self.warmup_iters and iteration <= self.warmup_iters:
            return self.warmup_init_lr + (self.lr - self.warmup_init_lr) * iteration / self.warmup_iters
        if self.decay == "constant":
            return self.lr
        decay_steps = max(1, self.total_iters - self.warmup_iters)
        progress = min(1.0, (iteration - self.warmup_iters) / decay_steps)
        if self.decay == "cosine":
            coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif self.decay == "linear":
            coeff = 1.0 - progress
        else:  # wsd: stable at the peak, then linear decay over the final fraction
            decay_start = 1.0 - self.wsd_decay_fraction
            coeff = 1.0 if progress <= decay_start else 1.0 - (progress - decay_start) / self.wsd_decay_fraction
        return self.min_lr + (self.lr - self.min_lr) * coeff
