"""Context parallelism: ring attention with causal load balancing (Liu et al. 2023, "Ring Attention with
Blockwise Transformers"; the zig-zag split of Megatron-Core's context parallelism and Brandon et al. 2023).

The sequence of every micro-batch is cut into 2N chunks for N context-parallel ranks, and rank r holds
chunks r and 2N-1-r: under a causal mask the early chunks see few keys and the late ones many, so pairing
them gives every rank the same work. Attention then needs every rank's keys and values: they travel around
the CP ring, one block per step, each step's transfer posted before that step's block is computed so the
two overlap. Per step the local queries meet one rank's key/value chunks, and which parts meet follows from
the chunk positions alone (j is the rank the keys came from):

    j == r: the local chunks against themselves, causal over the local order (chunk r precedes 2N-1-r);
    j <  r: every local query sees key chunk j in full and key chunk 2N-1-j not at all;
    j >  r: only query chunk 2N-1-r sees keys, both of rank j's chunks, in full.

Document masking (cu_seqlens) and sliding windows (query p sees keys p - w + 1 .. p, a window that may span
ranks) turn the blocks into general masks from the global positions of both sides (the kernel's key_bounds and
query_bounds); a key chunk that no local query's window reaches is skipped, so compute follows the chunks a
window touches rather than the whole causal triangle (the transfers still go round the whole ring).

Each block's output is exact for its keys; blocks are merged by their log-sum-exp (the online softmax of
FlashAttention, one block at a time). The backward runs the ring again: each block's gradients are taken
against the merged output and log-sum-exp (the global softmax normaliser), dQ stays, and dK/dV travel with
their block, so after N steps each block's gradient arrives back at its owner. GQA sends only the KV heads.
"""
import torch
import torch.distributed as dist

from megagopher import kernels


def zigzag_positions(seq_length, cp_size, cp_rank, device=None):
    """The positions (into the full sequence) of the tokens CP rank ``cp_rank`` holds: chunks r and 2N-1-r."""
    if seq_length % (2 * cp_size):
        raise ValueError(f"a sequence of {seq_length} tokens cannot be cut into 2 * cp = {2 * cp_size} equal "
                         "chunks; model.seq_length must be a multiple of 2 * parallel.cp")
    chunk = seq_length // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    last = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk, device=device)
    return torch.cat([first, last])


def split_for_cp_rank(tensor, cp_size, cp_rank, dim=1):
    """This CP rank's chunks of ``tensor`` along its sequence dimension ``dim`` (a copy, contiguous)."""
    if cp_size == 1:
        return tensor
    index = zigzag_positions(tensor.shape[dim], cp_size, cp_rank, tensor.device)
    return tensor.index_select(dim, index)


class _Ring:
    """Batched point-to-point transfers around the CP ring: send to the next rank, receive from the previous."""

    def __init__(self, group):
        ranks = dist.get_process_group_ranks(group)
        self.size, self.rank, self.group = len(ranks), dist.get_rank(group), group
        self.next, self.prev = ranks[(self.rank + 1) % self.size], ranks[(self.rank - 1) % self.size]
        self.posted = []  # ("post"/"wait", step) in call order: a test checks the transfers overlap compute

    def start(self, tensor, step):
        """Posts the send of ``tensor`` and the receive of the previous rank's; returns (buffer, requests)."""
        buffer = torch.empty_like(tensor)
        ops = [dist.P2POp(dist.isend, tensor, self.next, self.group),
               dist.P2POp(dist.irecv, buffer, self.prev, self.group)]
        self.posted.append(("post", step))
        return buffer, dist.batch_isend_irecv(ops)

    def wait(self, pending, step):
        buffer, requests = pending
        for req in requests:
            req.wait()
        self.posted.append(("wait", step))
        return buffer


def _block(step, source, rank, half):
    """(query rows, key rows, causal) that meet when the keys of rank ``source`` visit ``rank``: slices into
    the local sequence of 2 * half tokens (see the module docstring)."""
    everything = slice(None)
    if step == 0:
        return everything, everything, True
    if source < rank:
        return everything, slice(0, half), False
    return slice(half, None), everything, False


class _Mask:
    """Document masking and sliding windows across the ring: per row and position of the full sequences, the
    [start, end) of its document (from the micro-batch's cu_seqlens, rows laid end to end, found on the device;
    the whole row without), and the window w (0: none) within which query p sees keys p - w + 1 .. p."""

    def __init__(self, cu_seqlens, batch, seq_length, cp_size, cp_rank, window, device):
        if cu_seqlens is None:
            self.start = torch.zeros(batch, seq_length, dtype=torch.int32, device=device)
            self.end = torch.full((batch, seq_length), seq_length, dtype=torch.int32, device=device)
        else:
            pos = torch.arange(batch * seq_length, dtype=torch.int32, device=device)
            doc = torch.searchsorted(cu_seqlens, pos, right=True) - 1
            row_start = (pos // seq_length) * seq_length
            self.start = (cu_seqlens[doc] - row_start).view(batch, seq_length)
            self.end = (cu_seqlens[doc + 1] - row_start).view(batch, seq_length)
        self.chunk, self.window = seq_length // (2 * cp_size), window
        self.queries = zigzag_positions(seq_length, cp_size, cp_rank, device).to(torch.int32)

    def _meets(self, query_chunk, key_chunk):
        """Whether some query of chunk ``query_chunk`` may see some key of ``key_chunk`` (causal, window)."""
        if key_chunk > query_chunk:
            return False
        return not self.window or (query_chunk - key_chunk - 1) * self.chunk + 1 <= self.window - 1

    def pieces(self, source, rank, cp_size):
        """Per key chunk of rank ``source`` that some local query can see: (query rows, key rows, None,
        key_bounds, query_bounds) for kernels.flash_attention_forward/backward. Query i (position p, in a
        document starting at d) sees keys [max(d, p - w + 1, K0), p + 1) of a chunk starting at K0; key t is
        seen by the queries from t to min(its document's end, t + w). Chunks no local query sees (after every
        query, or wholly before every window) are skipped: their block is never computed."""
        c, last = self.chunk, 2 * cp_size - 1
        out = []
        for local, index in ((slice(0, c), source), (slice(c, 2 * c), last - source)):
            first, second = self._meets(rank, index), self._meets(last - rank, index)
            if not (first or second):
                continue
            rows = slice(None) if first and second else slice(0, c) if first else slice(c, 2 * c)
            k0, pos = index * c, self.queries[rows]
            lo = self.start[:, pos.long()]
            if self.window:
                lo = torch.maximum(lo, pos - self.window + 1)
            lo = (lo - k0).clamp(0, c)
            hi = (pos + 1 - k0).clamp(0, c).expand_as(lo)
            keys = torch.arange(k0, k0 + c, dtype=torch.int32, device=pos.device)
            q_lo = torch.searchsorted(pos, keys).to(torch.int32).expand(lo.shape[0], c)
            seen_until = self.end[:, k0:k0 + c]
            if self.window:
                seen_until = torch.minimum(seen_until, keys + self.window)
            q_hi = torch.searchsorted(pos, seen_until.contiguous()).to(torch.int32)
            out.append((rows, local, False, (lo.contiguous(), hi.contiguous()), (q_lo.contiguous(), q_hi)))
        return out


def _pieces(step, ring, half, docs):
    """The (query rows, key rows, causal, key_bounds, query_bounds) computed at ``step`` of the ring; ``docs``,
    a _Mask or None (plain causal)."""
    source = (ring.rank - step) % ring.size
    if docs is None:
        return [_block(step, source, ring.rank, half) + (None, None)]
    return docs.pieces(source, ring.rank, ring.size)


def _merge(out, lse, block_out, block_lse, rows):
    """Folds one block's (output, lse) into the running fp32 (out, lse) over query ``rows``, in place. A row
    that has seen no key yet (or sees none in this block: document masking) has lse -inf and weight 0."""
    o, l_old = out[:, rows], lse[:, :, rows]
    l_new = torch.logaddexp(l_old, block_lse)
    safe = torch.where(torch.isinf(l_new), torch.zeros_like(l_new), l_new)
    # lse is (b, h, s) and out (b, s, h, d): the weights move to out's layout
    w_old = torch.exp(l_old - safe).transpose(1, 2).unsqueeze(-1)
    w_blk = torch.exp(block_lse - safe).transpose(1, 2).unsqueeze(-1)
    out[:, rows] = o * w_old + block_out.float() * w_blk
    lse[:, :, rows] = l_new


class RingAttention(torch.autograd.Function):
    """Causal ring attention over the CP group of this rank's zig-zag chunks: q (b, s, h, d), k and v
    (b, s, h_kv, d) with s = 2 * chunk, in the layout of ``kernels.flash_attention``; ``docs`` (a _Mask or
    None) keeps attention within documents and sliding windows."""

    @staticmethod
    def forward(ctx, q, k, v, scale, group, docs, ring_log):
        ring = _Ring(group)
        (b, s, h, _), dk = q.shape, k.shape[-1]
        out = torch.zeros(b, s, h, v.shape[-1], dtype=torch.float32, device=q.device)  # values' head dim (MLA)
        lse = torch.full((b, h, s), float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.cat([k, v], dim=-1)  # one transfer per step carries both (their head dims may differ)
        for step in range(ring.size):
            pending = ring.start(kv, step) if step + 1 < ring.size else None  # before this step's compute
            for rows, cols, causal, key_bounds, _ in _pieces(step, ring, s // 2, docs):
                block_out, block_lse = kernels.flash_attention_forward(
                    q[:, rows], kv[:, cols, :, :dk], kv[:, cols, :, dk:], causal, scale, key_bounds=key_bounds)
                _merge(out, lse, block_out, block_lse, rows)
            if pending is not None:
                kv = ring.wait(pending, step)
        if ring_log is not None:
            ring_log.extend(("forward",) + p for p in ring.posted)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.group, ctx.docs, ctx.ring_log = scale, group, docs, ring_log
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        ring = _Ring(ctx.group)
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv, dk = torch.cat([k, v], dim=-1), k.shape[-1]
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)  # travels with its block
        pending_dkv = None
        for step in range(ring.size):
            pending_kv = ring.start(kv, step) if step + 1 < ring.size else None
            grads = []
            for rows, cols, causal, key_bounds, query_bounds in _pieces(step, ring, q.shape[1] // 2, ctx.docs):
                bq, bk, bv = kernels.flash_attention_backward(
                    q[:, rows], kv[:, cols, :, :dk], kv[:, cols, :, dk:], out[:, rows], lse[:, :, rows], dout[:, rows],
                    causal, ctx.scale, key_bounds=key_bounds, query_bounds=query_bounds)
                dq[:, rows] += bq.float()
                grads.append((cols, bk, bv))
            if pending_dkv is not None:  # this block's gradient so far, from the ranks it visited before
                dkv = ring.wait(pending_dkv, step)
            for cols, bk, bv in grads:
                dkv[:, cols, :, :dk] += bk.float()
                dkv[:, cols, :, dk:] += bv.float()
            pending_dkv = ring.start(dkv, step)  # on to the next rank, as the block itself goes
            if pending_kv is not None:
                kv = ring.wait(pending_kv, step)
        dkv = ring.wait(pending_dkv, ring.size)  # after N steps every block is back with its owner
        if ctx.ring_log is not None:
            ctx.ring_log.extend(("backward",) + p for p in ring.posted)
        return dq.to(q.dtype), dkv[..., :dk].to(k.dtype), dkv[..., dk:].to(v.dtype), None, None, None, None


def ring_attention(q, k, v, group, softmax_scale=None, cu_seqlens=None, ring_log=None, window=0):
    """Causal attention of this CP rank's zig-zag chunks against the whole sequence, held across ``group``.
    ``cu_seqlens``: the micro-batch's document boundaries (int32, its rows laid end to end at full length);
    attention then stays within documents. ``window`` > 0: query p sees keys p - window + 1 .. p only (a
    window may span ranks: each block's mask follows global positions). ``ring_log``, a list, records the
    order in which transfers are posted and waited for."""
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    cp = dist.get_world_size(group) if group is not None else 1
    window_size = (window - 1, 0) if window else None  # flash-attn's (left, right)
    if cp == 1:  # one rank holds the whole sequence (``group`` None: no process group at all)
        if cu_seqlens is not None:
            b, s = q.shape[:2]
            packed = [t.reshape(1, b * s, *t.shape[2:]) for t in (q, k, v)]
            return kernels.flash_attention(*packed, causal=True, softmax_scale=scale, cu_seqlens=cu_seqlens,
                                           window_size=window_size).view(*q.shape[:3], v.shape[-1])
        return kernels.flash_attention(q, k, v, causal=True, softmax_scale=scale, window_size=window_size)
    if q.shape[1] % 2:
        raise ValueError(f"ring attention: the local sequence of {q.shape[1]} tokens is not two equal chunks")
    docs = None
    if cu_seqlens is not None or window:
        docs = _Mask(cu_seqlens, q.shape[0], q.shape[1] * cp, cp, dist.get_rank(group), window, q.device)
    return RingAttention.apply(q, k, v, scale, group, docs, ring_log)
