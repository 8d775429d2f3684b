"""Splitting the model into pipeline stages (and virtual-stage chunks)."""
from megagopher import parallel_state as ps
from megagopher.model import GPTModel


def build_model_chunks(model_cfg, sequence_parallel=False, recompute="none", recompute_num_layers=None,
                       pp_layers=None):
    """The model chunks this rank holds: one GPTModel per virtual stage."""
    if ps.get_pp_size() != 1:
        raise ValueError("pipeline parallelism is not available yet")
    return [GPTModel(model_cfg, sequence_parallel=sequence_parallel, recompute=recompute,
                     recompute_num_layers=recompute_num_layers)]
