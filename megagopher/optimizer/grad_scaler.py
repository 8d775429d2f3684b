"""Dynamic loss scaling for fp16 training (Micikevicius et al. 2018, "Mixed Precision Training"), with
Megatron-LM's hysteresis.

fp16 has 5 exponent bits: small gradients underflow to zero. Multiplying the loss by a large scale S
shifts every gradient up by S; the optimizer divides it out in fp32 before using it. If S is too large a
gradient overflows to inf: that step is skipped and S is lowered. After ``growth_interval`` clean steps in
a row S is raised again, so it hovers just below the overflow point.

Hysteresis: the scale is lowered only after ``hysteresis`` overflowing steps since the last growth
(consecutive or not), so that one stray overflow does not halve it at once. The counter refills whenever
the scale grows.
"""
from megagopher.config.validate import validate_loss_scaler


class DynamicLossScaler:
    def __init__(self, initial_scale=2.0 ** 16, min_scale=1.0, growth_interval=1000, hysteresis=2,
                 growth_factor=2.0, backoff_factor=0.5):
        validate_loss_scaler(initial_scale, min_scale, growth_interval, hysteresis)  # the training.* rules
        self.scale = float(initial_scale)
        self.min_scale, self.growth_interval, self.hysteresis = float(min_scale), int(growth_interval), int(hysteresis)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_tracker = 0                 # clean steps since the last overflow or growth
        self.hysteresis_tracker = self.hysteresis  # overflows still tolerated before backing off

    def update(self, found_inf):
        """Called once per step, after the overflow check agreed on every rank."""
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.growth_tracker = 0
                self.hysteresis_tracker = self.hysteresis
                self.scale *= self.growth_factor

    def state_dict(self):
        return {"scale": self.scale, "growth_tracker": self.growth_tracker,
                "hysteresis_tracker": self.hysteresis_tracker}

    def load_state_dict(self, state):
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.hysteresis_tracker = int(state["hysteresis_tracker"])
