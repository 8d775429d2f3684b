"""Dropout that respects the tensor-parallel RNG streams (invariant 5)."""
import torch.nn.functional as F

from megagopher.tensor_parallel import get_rng_tracker


def dropout(x, p, training, sharded):
    """Dropout on the shared stream for replicated activations, on the per-TP-rank stream for sharded
    ones (invariant 5)."""
    if p == 0.0 or not training:
        return x
    if sharded:
        with get_rng_tracker().fork():
            return F.dropout(x, p, True)
    return F.dropout(x, p, True)
