"""Building blocks of the FlashAttention-2 kernels (attention.py forward, attention_bwd.py backward): tile loads
through tensor descriptors padded to a power-of-two head dim, the key (or query) range each row attends to
under causal, packed-document and sliding-window masking, the split of a program's blocks into those that
need the mask and those that do not, the autotune lists, and the checks and host-side metadata shared by the launches.

Head dim: the kernels run on HEAD_DIM = the next power of two (tl.dot and tl.arange need one), at least 16;
the real D masks every store, so the padded columns are never written. V (and O, dO, dV) may have a head dim
of its own, DV padded to HEAD_DIM_V: multi-head latent attention (DeepSeek-V2/V3, Liu et al. 2024) has
192-channel queries and keys and 128-channel values. Up to a padded head dim of 128
(TMA_MAX_HEAD_DIM) Q, K, V and dO are read through tensor descriptors (Triton's TensorDescriptor over the
(b, s, h, d) tensor, block [1, rows, 1, HEAD_DIM]): on Hopper and Blackwell each tile is one TMA copy into
shared memory, issued by one thread instead of address arithmetic and predicates in every thread, and the
copy zero-fills the rows past s and the columns past d. The registers that frees are what lets a 64-key
dK/dV block issue wgmma without spilling (tools/check_kernels.py). Older GPUs and the interpreter lower the
same descriptor to masked loads. The block shape is the autotune config's, set by its pre_hook
(set_block_shapes) just before each launch. At 256 the kernels take pointers and masked loads (load_tile).
Masks: query i attends to keys [key_lo(i), key_hi(i)): its document ([0, s_k) without cu_seqlens), cut at
i + 1 if causal and at i - window on the left. Both bounds rise with i, so a block of rows visits the keys
from its first row's lo to its last row's hi, and the key blocks inside [max lo, min hi) need no mask: key
blocks outside every row's range are skipped, not masked.
"""
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._common import (DTYPE_NAMES, check_device, check_float, check_nonempty, dot_in_fp32, dot_precision,
                      next_pow2, prune_by_head_dim, tile_configs)
from .attention_args import check_cu_seqlens, window_left
from .dispatch import Unsupported

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
# Tiles through tensor descriptors up to this padded head dim. At 256 the TMA-loaded tiles cost more
# registers than masked loads (every d=256 config spills with them, 240 to 1456 bytes, none without).
TMA_MAX_HEAD_DIM = 128

# Which block dimension each descriptor argument's tile spans (queries or keys), and its padded head dim.
DESCRIPTOR_BLOCKS = {"Q": ("BLOCK_M", "HEAD_DIM"), "DO": ("BLOCK_M", "HEAD_DIM_V"), "K": ("BLOCK_N", "HEAD_DIM"),
                     "V": ("BLOCK_N", "HEAD_DIM_V")}


def set_block_shapes(nargs):
    """Autotune pre_hook: the descriptors' block shapes from the config about to run."""
    for name, (block, width) in DESCRIPTOR_BLOCKS.items():
        if isinstance(nargs.get(name), TensorDescriptor):
            nargs[name].block_shape = [1, nargs[block], 1, nargs[width]]


def operands(meta, *tensors):
    """The (b, s, h, d) operands as the kernels read them, each with its three row strides: with meta["TMA"] a
    TensorDescriptor (its block shape set per config by set_block_shapes); TMA needs a 16-byte aligned base
    and row strides, so a view that has neither (rare: head dims are multiples of 8) is copied first."""
    out = []
    for t in tensors:
        if not meta["TMA"]:
            out += [t, *strides(t)]
            continue
        size = t.element_size()
        if t.data_ptr() % 16 or any(st * size % 16 for st in t.stride()[:-1]):
            t = torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)
        out += [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 16, 1, padded_head_dim(t.shape[-1])]),
                *strides(t)]
    return out


# (BLOCK_M, BLOCK_N, num_warps, num_stages, smallest and largest padded head dim). Every config compiles without
# register spills and within shared memory at each head dim it may be picked for (prune_by_head_dims), bf16 and
# fp16, causal or not, packed or not, head dims padded or not, MLA's 192/128, sm_90a and sm_100a
# (tools/check_kernels.py: 468 attention compilations, clean). Through descriptors (d <= 128) dK/dV issues wgmma at
# d=128 with 64-key blocks of 16 queries (8 warps, 250 registers on sm_90a); 32-query blocks spill there (80-120
# bytes), and at d=64 8-warp 64-key tiles spill on sm_100a (4-8 bytes) where 4 warps do not. The 128 x 64 forward
# tile with 8 warps spills at d=64 on sm_100a (8-16 bytes), with 4 warps not. The 64 x 32 dK/dV and 32 x 32 4-warp
# dQ tiles spill at d=128 with descriptors (8-40 bytes) and stay where they are clean. At d=256 (pointer loads) the
# big tiles spill (128-row forward, 64-row dK/dV, 16-row dQ: 8 to 288 bytes) and are not listed.
FWD_TILES = tile_configs([(128, 64, 8, 2, 16, 32), (128, 64, 4, 2, 64, 64), (128, 32, 8, 2, 128, 128),
                          (64, 32, 4, 2, 16, 128), (64, 32, 8, 2, 256, 256), (64, 32, 8, 3, 256, 256),
                          (32, 32, 8, 2, 16, 256)],
                         set_block_shapes)
DKDV_TILES = tile_configs([(32, 64, 4, 2, 16, 64), (16, 64, 8, 2, 128, 128), (64, 32, 8, 2, 16, 64),
                           (32, 32, 8, 2, 16, 256)],
                          set_block_shapes)
DQ_TILES = tile_configs([(64, 64, 8, 2, 16, 128), (64, 32, 8, 2, 16, 128), (32, 64, 8, 2, 16, 256),
                         (32, 32, 4, 2, 256, 256), (16, 32, 4, 2, 16, 128)], set_block_shapes)
# At MLA's head dims (queries and keys padded to 256, values to 128) the 4-warp 32 x 32 dQ tile spills on
# sm_90a (16-24 bytes) where it is clean at 256/256: it serves equal head dims only (prune_by_head_dims).
for _config in DQ_TILES:
    _config.equal_head_dims_only = _config.num_warps == 4 and _config.kwargs == {"BLOCK_M": 32, "BLOCK_N": 32}
# Under the interpreter every program is a Python loop: few, mid-sized blocks keep the tests quick while
# sequence lengths 17, 129, 257 still cross block boundaries.
INTERP_TILE = tile_configs([(32, 32, 4, 1, 16, 256)], set_block_shapes)[0]
KEY = ["HEAD_DIM", "HEAD_DIM_V", "CAUSAL", "VARLEN", "seq_bucket"]


def padded_head_dim(d):
    """The head dim a kernel runs on: the next power of two, at least 16 (tl.dot's smallest)."""
    return max(16, next_pow2(d))


def prune_by_head_dims(configs, named_args, **kwargs):
    """early_config_prune: prune_by_head_dim at the wider of the query/key and value head dims (the tiles
    of both live in registers), less the configs marked equal_head_dims_only when the two differ
    (tools/check_kernels.py compiles every config kept at MLA's 192/128)."""
    dims = {kwargs.get(n, named_args.get(n)) for n in ("HEAD_DIM", "HEAD_DIM_V")} - {None}
    kept = prune_by_head_dim(configs, named_args, HEAD_DIM=max(dims))
    return [c for c in kept if len(dims) == 1 or not getattr(c, "equal_head_dims_only", False)]


@triton.jit
def load_rows(X, off_b, start, off_h, stride_b, stride_s, stride_h, n, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
              D: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr):
    # Rows start .. start + BLOCK of head off_h, batch row off_b of X (b, s, h, d), s = n: a [BLOCK, HEAD_DIM]
    # tile, zeros past the sequence and the head dim. X is a TensorDescriptor with TMA (its padding gives the
    # zeros), else a pointer (masked loads).
    if TMA:
        t = X.load([off_b, start, off_h, 0]).reshape(BLOCK, HEAD_DIM)
        if UPCAST:
            t = t.to(tl.float32)
    else:
        t = load_tile(X + off_b.to(tl.int64) * stride_b + off_h * stride_h, start + tl.arange(0, BLOCK), stride_s,
                      tl.arange(0, HEAD_DIM), n, D, UPCAST)
    return t


@triton.jit
def _tile_mask(rows, offs_d, n, D: tl.constexpr):
    # The column mask only when the head dim is padded: a full [rows, HEAD_DIM] predicate costs registers
    # that the compiler does not win back even when it is all true.
    if D < offs_d.shape[0]:
        mask = (rows[:, None] < n) & (offs_d[None, :] < D)
    else:
        mask = rows[:, None] < n
    return mask


@triton.jit
def load_tile(base, rows, stride, offs_d, n, D: tl.constexpr, UPCAST: tl.constexpr):
    # The [rows, HEAD_DIM] tile at base + row * stride + d: zeros for rows past n and columns past D.
    mask = _tile_mask(rows, offs_d, n, D)
    t = tl.load(base + rows[:, None] * stride + offs_d[None, :], mask=mask, other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def store_tile(base, rows, stride, offs_d, n, D: tl.constexpr, value):
    # value (fp32) into the [rows, D] tile at base + row * stride + d; padded rows and columns left alone.
    mask = _tile_mask(rows, offs_d, n, D)
    tl.store(base + rows[:, None] * stride + offs_d[None, :], value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def key_bounds(rows, DOC_START, DOC_END, SEQ_Q, SEQ_K, window, CAUSAL: tl.constexpr, VARLEN: tl.constexpr):
    # Per query row, the keys [lo, hi) it attends to; rows past SEQ_Q get an empty range.
    ok = rows < SEQ_Q
    if VARLEN:
        lo = tl.load(DOC_START + rows, mask=ok, other=0)
        hi = tl.load(DOC_END + rows, mask=ok, other=0)
    else:
        lo = tl.zeros_like(rows)
        hi = tl.zeros_like(rows) + SEQ_K
    if CAUSAL:
        lo = tl.maximum(lo, rows - window)
        hi = tl.minimum(hi, rows + 1)
    return lo, tl.where(ok, hi, 0)


@triton.jit
def query_bounds(cols, DOC_START, DOC_END, SEQ_Q, SEQ_K, window, CAUSAL: tl.constexpr, VARLEN: tl.constexpr):
    # Per key, the queries [lo, hi) that attend to it: key_bounds inverted (same documents, q and k
    # lengths being equal with cu_seqlens); keys past SEQ_K get an empty range.
    ok = cols < SEQ_K
    if VARLEN:
        lo = tl.load(DOC_START + cols, mask=ok, other=0)
        hi = tl.load(DOC_END + cols, mask=ok, other=0)
    else:
        lo = tl.zeros_like(cols)
        hi = tl.zeros_like(cols) + SEQ_Q
    if CAUSAL:
        lo = tl.maximum(lo, cols)
        hi = tl.minimum(hi, cols + window + 1)
    return lo, tl.where(ok, hi, 0)


@triton.jit
def block_ranges(lo, hi, ok, limit, BLOCK: tl.constexpr):
    # From the per-row ranges [lo, hi) of a program's valid rows (ok): the block starts to visit, split
    # into [start, full_start) masked, [full_start, full_end) unmasked (every row sees the whole block) and
    # [full_end, end) masked; blocks outside every row's range are not visited.
    start = (tl.min(tl.where(ok, lo, limit), 0) // BLOCK) * BLOCK
    end = tl.max(tl.where(ok, hi, 0), 0)
    full_lo = tl.max(tl.where(ok, lo, 0), 0)
    full_hi = tl.min(tl.where(ok, hi, limit), 0)
    full_start = start + ((tl.maximum(full_lo - start, 0) + BLOCK - 1) // BLOCK) * BLOCK
    full_end = tl.maximum(start + (tl.maximum(full_hi - start, 0) // BLOCK) * BLOCK, full_start)
    return start, full_start, full_end, end


def check_inputs(q, k, v, causal, cu_seqlens, window_size):
    """Unsupported for what the kernels do not take (dtype, layout, head dim); ValueError for bad masks.
    Returns the left window (None for none)."""
    op = "flash_attention"
    check_float(op, q, k, v)
    check_device(op, q, k, v)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise Unsupported(f"{op}: expected q, k, v of shape (b, s, h, d); got {tuple(q.shape)}, "
                          f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise Unsupported(f"{op}: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    b, sq, h, d = q.shape
    if k.shape[:3] != v.shape[:3] or k.shape[0] != b or k.shape[3] != d:
        raise Unsupported(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} must be (b={b}, s_k, h_kv, d={d}) and "
                          f"(b={b}, s_k, h_kv, d_v)")
    for what, width in (("head dim", d), ("value head dim", v.shape[3])):
        if width % 8 or width > MAX_HEAD_DIM:
            raise Unsupported(f"{op}: {what} {width} ({DTYPE_NAMES[q.dtype]}) is not supported by the Triton "
                              f"kernel; supported: multiples of 8 up to {MAX_HEAD_DIM}")
    if h % k.shape[2]:
        raise Unsupported(f"{op}: {h} query heads are not a multiple of {k.shape[2]} key/value heads")
    check_nonempty(op, q)
    check_nonempty(op, k)
    check_cu_seqlens(q, k, cu_seqlens)
    return window_left(window_size, causal)


def launch_meta(q, k, causal, cu_seqlens, left, v=None):
    """Constexprs and size arguments shared by the launches: the padded head dims (of q and k; of v, k's
    when v is None), the masks, and the autotuning bucket of the sequence length."""
    dot_fp32 = dot_in_fp32(q.dtype)
    d, dv = q.shape[-1], (k if v is None else v).shape[-1]
    head_dim, head_dim_v = padded_head_dim(d), padded_head_dim(dv)
    meta = dict(HEAD_DIM=head_dim, D=d, HEAD_DIM_V=head_dim_v, DV=dv, CAUSAL=causal, VARLEN=cu_seqlens is not None,
                DOT_FP32=dot_fp32, PRECISION="ieee" if dot_fp32 else dot_precision(q.dtype),
                TMA=max(head_dim, head_dim_v) <= TMA_MAX_HEAD_DIM)
    # No window: one wider than both sequences, so i - window never cuts.
    window = left if left is not None else q.shape[1] + k.shape[1]
    return meta, window, next_pow2(max(q.shape[1], k.shape[1]))


def doc_bounds(cu_seqlens, total, device):
    """Per token, the start and end offsets of its document (int32, (total,) each), found on the device
    (searchsorted: no host synchronisation); two empty tensors without cu_seqlens."""
    if cu_seqlens is None:
        empty = torch.empty(0, dtype=torch.int32, device=device)
        return empty, empty
    pos = torch.arange(total, dtype=torch.int32, device=device)
    doc = (torch.searchsorted(cu_seqlens, pos, right=True) - 1).clamp_(0, cu_seqlens.numel() - 2)
    return cu_seqlens[doc].contiguous(), cu_seqlens[doc + 1].contiguous()


def strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def unit_last_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()
