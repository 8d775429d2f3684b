"""Global-batch-size ramp-up with Megatron-LM's ``--rampup-batch-size start increment samples`` semantics
(microbatches.py, RampupBatchsizeNumMicroBatchesCalculator; used for GPT-3, Brown et al. 2020).

The batch starts at ``start`` samples and grows by ``increment`` every ``samples / n`` consumed samples,
where n = (global_batch_size - start) / increment is the number of increments, until ``samples`` samples
have been consumed; from then on it is ``global_batch_size``. It is a pure function of the consumed samples,
so a resumed run continues the ramp exactly. Every size on the way must split into whole micro-batches on
every data-parallel rank (Megatron's consistency check); ``validate_rampup`` checks that before training
starts (invariant 6) instead of failing halfway through the ramp. That rule lives in config/validate.py.
"""
from megagopher.config.validate import rampup_steps, validate_rampup  # noqa: F401 (validate_rampup re-exported)




def global_batch_size_at(consumed_samples, global_batch_size, rampup=None, micro_batch_size=1, dp=1):
    """The global batch size of the step that starts after ``consumed_samples`` samples.

    ``rampup`` is [start, increment, samples] or empty/None for no ramp-up."""
    if not rampup:
        size = global_batch_size
    else:
        start, increment, samples, n = rampup_steps(rampup, global_batch_size)
        if n == 0 or consumed_samples > samples:
            size = global_batch_size
        else:
            steps = int(consumed_samples / (samples / n))
            size = min(start + steps * increment, global_batch_size)
    if size % (micro_batch_size * dp):
        raise ValueError(f"global batch size {size} (after {consumed_samples} samples) is not divisible by "
                         f"training.micro_batch_size * dp = {micro_batch_size} * {dp}")
    return size
