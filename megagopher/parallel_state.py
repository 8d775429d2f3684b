"""Process groups for 3D (+context) parallelism, after Megatron-LM's parallel_state.

Ranks are laid out tp-cp-dp-pp with TP varying fastest:

    rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))

so the ranks of one tensor-parallel group are neighbours (on GPUs: the same node, NVLink), and pipeline
stages are the slowest-varying coordinate (they cross nodes).

Expert parallelism (MoE, docs/moe.md) lives inside the data-parallel coordinate, as Megatron-Core's does:
dp_rank = edp_rank * ep + ep_rank, so the ep ranks of one expert-parallel group are data-parallel
neighbours. They hold different experts and exchange tokens (all-to-all); the ranks that hold the same
experts (same tp, pp and ep_rank, any edp_rank and cp_rank) form the expert-data-parallel group
("edp_cp") over which expert gradients are summed, as the dense ones are over "dp_cp". This module is the one place that holds
the groups; everything else asks it through the getters below.

The layout rule (``validate_layout``) lives with every other config rule in megagopher/config/validate.py;
``initialize_model_parallel`` applies the same rule, so a library user gets the same message as a run.
"""
from dataclasses import dataclass, field

import torch.distributed as dist

from megagopher.common import pick_device
from megagopher.config.validate import ParallelConfigError, validate_layout  # noqa: F401 (re-exported)


@dataclass
class _State:
    tp: int = 1
    cp: int = 1
    dp: int = 1
    pp: int = 1
    vpp: int = 1
    ep: int = 1
    coords: dict = field(default_factory=dict)  # this rank's tp/cp/dp/pp coordinates
    groups: dict = field(default_factory=dict)  # name -> (process group, list of global ranks)


_state = None


def _coords(rank, tp, cp, dp, ep=1):
    """The (tp, cp, dp, pp) coordinates of a global rank, the inverse of the formula above, and dp's
    expert-parallel parts (ep, edp)."""
    c = dict(tp=rank % tp, cp=(rank // tp) % cp, dp=(rank // (tp * cp)) % dp, pp=rank // (tp * cp * dp))
    c.update(ep=c["dp"] % ep, edp=c["dp"] // ep)
    return c


# Group name -> the coordinates its ranks may differ in. dp is (ep, edp) together: a group varying dp varies
# both, one varying ep or edp alone also lets dp vary and fixes the other part.
_SPECS = {"tp": ("tp",), "cp": ("cp",), "dp": ("dp", "ep", "edp"), "pp": ("pp",), "dp_cp": ("dp", "ep", "edp", "cp"),
          "mp": ("tp", "pp"), "ep": ("ep", "dp"), "edp_cp": ("edp", "dp", "cp")}


def initialize_model_parallel(tp=1, pp=1, vpp=1, cp=1, ep=1):
    """Creates every process group on top of the initialised default group. Collective: all ranks call it."""
    global _state
    if not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel: call torch.distributed.init_process_group first")
    world = dist.get_world_size()
    dp = validate_layout(world, tp=tp, pp=pp, cp=cp, vpp=vpp, ep=ep)
    rank = dist.get_rank()
    state = _State(tp=tp, cp=cp, dp=dp, pp=pp, vpp=vpp, ep=ep)
    state.coords = _coords(rank, tp, cp, dp, ep)

    def all_ranks(varying):
        """Groups of ranks that differ only in the coordinates named in ``varying``."""
        fixed = [d for d in ("tp", "cp", "dp", "ep", "edp", "pp") if d not in varying]
        buckets = {}
        for r in range(world):
            c = _coords(r, tp, cp, dp, ep)
            buckets.setdefault(tuple(c[d] for d in fixed), []).append(r)
        return list(buckets.values())

    specs = _SPECS
    # Every rank must create every group, in the same order (a requirement of new_group).
    for name, varying in specs.items():
        for ranks in all_ranks(varying):
            group = dist.new_group(ranks) if world > 1 else dist.group.WORLD
            if rank in ranks:
                state.groups[name] = (group, ranks)
    # Embedding group: first and last pipeline stage, for tied input/output embeddings.
    for ranks in all_ranks(("pp",)):
        emb = sorted({ranks[0], ranks[-1]})
        group = dist.new_group(emb) if world > 1 else dist.group.WORLD
        if rank in emb:
            state.groups["embedding"] = (group, emb)
    _state = state


def is_initialized():
    return _state is not None


def destroy_model_parallel():
    """Forgets the layout and destroys the groups it created. Each group holds communicator resources (gloo:
    a device thread and worker threads; NCCL: buffers on the GPU) that outlive the layout unless destroyed,
    so a process that changes layout (a staged run, a test) would otherwise gather them. Local, no
    collective: call it once this rank's collectives on the layout are done."""
    global _state
    state, _state = _state, None
    if state is None or not dist.is_initialized():
        return
    owned = {id(group): group for group, _ in state.groups.values() if group is not dist.group.WORLD}
    for group in owned.values():
        if group in dist.distributed_c10d._world.pg_map:
            dist.destroy_process_group(group)


def shutdown():
    """Ends a finished job's communication in order on every rank: a barrier (every rank is done with every
    collective), then the groups are destroyed. A process that exits with its gloo groups alive can abort
    in their destructors ("terminate called ...") while a peer closes its sockets. Collective."""
    if dist.is_initialized():
        dist.barrier()
    destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _get():
    if _state is None:
        raise RuntimeError("parallel_state: initialize_model_parallel has not been called")
    return _state


def _group(name):
    return _get().groups[name][0]


def _group_ranks(name):
    return _get().groups[name][1]


def get_tp_group(): return _group("tp")
def get_pp_group(): return _group("pp")
def get_dp_group(): return _group("dp")
def get_cp_group(): return _group("cp")
def get_dp_cp_group(): return _group("dp_cp")
def get_model_parallel_group(): return _group("mp")
def get_ep_group(): return _group("ep")
def get_expert_dp_group():
    """The ranks holding this rank's experts (expert data parallel x context parallel)."""
    return _group("edp_cp")


def get_embedding_group():
    """The first and last pipeline stage of this rank's pipeline; None on the middle stages."""
    entry = _get().groups.get("embedding")
    return entry[0] if entry else None


def get_pp_ranks(): return _group_ranks("pp")
def get_tp_ranks(): return _group_ranks("tp")

def get_tp_size(): return _get().tp if _state else 1
def get_pp_size(): return _get().pp if _state else 1
def get_dp_size(): return _get().dp if _state else 1
def get_cp_size(): return _get().cp if _state else 1
def get_vpp_size(): return _get().vpp if _state else 1
def get_ep_size(): return _get().ep if _state else 1
def get_ep_rank(): return _get().coords["ep"] if _state else 0
def get_tp_rank(): return _get().coords["tp"] if _state else 0
def get_pp_rank(): return _get().coords["pp"] if _state else 0
def get_dp_rank(): return _get().coords["dp"] if _state else 0
def get_cp_rank(): return _get().coords["cp"] if _state else 0


def is_pipeline_first_stage(): return get_pp_rank() == 0
def is_pipeline_last_stage(): return get_pp_rank() == get_pp_size() - 1


def get_pp_next_rank():
    ranks = get_pp_ranks()
    return ranks[(get_pp_rank() + 1) % len(ranks)]


def get_pp_prev_rank():
    ranks = get_pp_ranks()
    return ranks[(get_pp_rank() - 1) % len(ranks)]


def get_device():
    """The device of this rank's collectives: its CUDA device when the default group runs NCCL, else CPU
    (common.pick_device, the one device resolution; invariant 7: no torch.cuda call on a CPU run)."""
    return pick_device("cuda" if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu")
