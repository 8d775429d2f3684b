"""Splitting the model into pipeline stages and virtual-stage chunks (Narayanan et al. 2021).

The pp * vpp virtual stages each hold a contiguous range of layers: evenly split by default, or as
``parallel.pp_layers`` says: one count per pipeline stage (with vpp > 1 each rank's count is shared evenly
by its chunks), or one count per virtual stage, in pipeline order. Virtual stage
v = chunk * pp + pp_rank lives on pipeline rank v % pp, so rank r holds chunks r, r + pp, r + 2 pp, ...
The embedding is on virtual stage 0, the final norm, output head and loss on the last. With tied
embeddings the last stage holds a copy of the word embeddings that starts equal (same init name,
invariant 1) and whose gradient distributed/finalize.py sums with the first stage's.
"""
from megagopher import parallel_state as ps
from megagopher.model import GPTModel


def stage_layer_ranges(num_layers, pp, vpp=1, pp_layers=None):
    """[(start, end)] for each of the pp * vpp virtual stages, in pipeline order. Raises ValueError
    (naming the keys) when the layers cannot be split that way."""
    stages = pp * vpp
    if pp_layers:
        counts = list(pp_layers)
        if any(not isinstance(c, int) or isinstance(c, bool) or c < 0 for c in counts):
            raise ValueError(f"parallel.pp_layers = {counts} must be non-negative integers")
        if vpp > 1 and len(counts) == pp:  # per pipeline rank: each rank's chunks share its layers evenly
            if any(c % vpp for c in counts):
                raise ValueError(f"parallel.pp_layers = {counts} gives layers per pipeline rank; each must be "
                                 f"divisible by parallel.vpp = {vpp} (or give pp * vpp = {stages} counts, one "
                                 "per virtual stage)")
            counts = [counts[v % pp] // vpp for v in range(stages)]
        if len(counts) != stages:
            raise ValueError(f"parallel.pp_layers = {counts} has {len(counts)} entries; it needs one per pipeline "
                             f"stage (parallel.pp = {pp}) or one per virtual stage (parallel.pp * parallel.vpp = "
                             f"{stages})")
        if sum(counts) != num_layers:
            raise ValueError(f"parallel.pp_layers = {counts} sums to {sum(counts)}, but model.num_layers = "
                             f"{num_layers}")
    else:
        if num_layers % stages:
            raise ValueError(f"model.num_layers = {num_layers} is not divisible by parallel.pp * parallel.vpp = "
                             f"{pp} * {vpp} = {stages}; set parallel.pp_layers for an uneven split")
        counts = [num_layers // stages] * stages
    ranges, start = [], 0
    for count in counts:
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
