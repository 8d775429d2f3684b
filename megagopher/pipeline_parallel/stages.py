"""Splitting the model into pipeline stages and virtual-stage chunks (Narayanan et al. 2021).

The pp * vpp virtual stages each hold a contiguous range of layers: evenly split by default, or as
``parallel.pp_layers`` says: one count per pipeline stage (with vpp > 1 each rank's count is shared evenly
by its chunks), or one count per virtual stage, in pipeline order. Virtual stage
v = chunk * pp + pp_rank lives on pipeline rank v % pp, so rank r holds chunks r, r + pp, r + 2 pp, ...
The embedding is on virtual stage 0, the final norm, output head and loss on the last. With tied
embeddings the last stage holds a copy of the word embeddings that starts equal (same init name,
invariant 1) and whose gradient distributed/finalize.py sums with the first stage's. The multi-token
prediction modules (model/mtp.py, DeepSeek-V3) sit on the last virtual stage, after its layers and outside
the layer split; untied, that stage holds a copy of the word embeddings for them, kept equal the same way.
"""
from megagopher import parallel_state as ps
from megagopher.config.validate import layer_counts
from megagopher.model import GPTModel


def stage_layer_ranges(num_layers, pp, vpp=1, pp_layers=None):
    """[(start, end)] for each of the pp * vpp virtual stages, in pipeline order. The split rule (even, or
    ``parallel.pp_layers``) is config/validate.py's ``layer_counts``; it raises a ConfigError (a ValueError
    naming the keys) when the layers cannot be split that way."""
    ranges, start = [], 0
    for count in layer_counts(num_layers, pp, vpp, pp_layers):
        ranges.append((start, start + count))
        start += count
    return ranges


def build_model_chunks(model_cfg, sequence_parallel=False, recompute="none", recompute_num_layers=None,
                       pp_layers=None, seed=None):
    """The model chunks this rank holds: one GPTModel per virtual stage (vpp of them), uninitialised
    unless ``seed`` is given (then layout-independent, invariant 1)."""
    pp, vpp, rank = ps.get_pp_size(), ps.get_vpp_size(), ps.get_pp_rank()
    ranges = stage_layer_ranges(model_cfg.num_layers, pp, vpp, pp_layers)
    chunks = []
    for chunk in range(vpp):
        v = chunk * pp + rank
        model = GPTModel(model_cfg, sequence_parallel=sequence_parallel, pre_process=v == 0,
                         post_process=v == pp * vpp - 1, layer_range=ranges[v], recompute=recompute,
                         recompute_num_layers=recompute_num_layers or None)
        chunks.append(model.initialize(seed) if seed is not None else model)
    return chunks
