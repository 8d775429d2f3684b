"""A GPT decoder built only from megagopher's tensor-parallel layers and kernels.

Activations flow as [s, b, h] (sequence first, as in Megatron-LM) so that sequence parallelism splits a
contiguous leading dimension. The flavours of docs/ARCHITECTURE.md 4.2 are all here: LayerNorm or RMSNorm, GeLU
(tanh, or the exact erf form: "gelu_exact") or SwiGLU, learned or rotary positions (partial rotary as in
GPT-J/CodeGen), grouped-query attention, parallel residual (GPT-J: attention and MLP on the same normalised
input), tied or untied embeddings, and a bias on the logits (CodeGen's lm_head, model.output_bias).

The model knows nothing of pipelines: a ``GPTModel`` is one contiguous range of layers, with the embedding
when ``pre_process`` (first stage) and the final norm, output head and loss when ``post_process`` (last
stage). Layers are keyed by their global index, so a parameter's name, and therefore its initial value
(invariant 1), is the same in every layout.

With ``model.mtp_num_layers`` > 0 the last stage also holds DeepSeek-V3's multi-token prediction modules
(model/mtp.py), which add their losses' gradient to the training loss and are skipped without labels.

For generation the model takes a ``KVCache`` (model/attention.py: one slot of keys and values per layer
index) and a position offset, so a decoding step runs the same forward on one new token; ``last_only``
applies the output head to the last position only.
"""
import contextlib
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from megagopher import kernels
from megagopher import parallel_state as ps
from megagopher.config.schema import check_value
from megagopher.context_parallel import zigzag_positions
from megagopher.tensor_parallel import (VocabParallelEmbedding, checkpoint, column_parallel_linears,
                                        gather_from_sp_region, gather_from_tp_region, init_parameters,
                                        parallel_linear, set_init, vocab_parallel_cross_entropy)

from .attention import Attention, rope_tables
from .dropout import dropout as _dropout
from .mla import MLAttention
from .mlp import MLP
from .moe import MoELayer
from .mtp import MultiTokenPrediction, head_weight_grad_in_backward


def _positions(s, offset, device):
    """The positions of this rank's s tokens: offset .. offset + s - 1, or under context parallelism the
    two chunks of the sequence this CP rank holds."""
    cp = ps.get_cp_size()
    if cp == 1:
        return torch.arange(offset, offset + s, device=device)
    return zigzag_positions(s * cp, cp, ps.get_cp_rank(), device)


class Norm(nn.Module):
    """LayerNorm or RMSNorm through megagopher.kernels. Its parameters are replicated over TP; with
    sequence parallelism each rank sees only its chunk of tokens, so they are marked for a TP all-reduce
    of their gradients."""

    def __init__(self, cfg, sequence_parallel):
        super().__init__()
        self.kind, self.eps = cfg.normalization, cfg.norm_epsilon
        self.weight = nn.Parameter(torch.empty(cfg.hidden_size))
        set_init(self.weight, (cfg.hidden_size,), fill=1.0)
        self.weight.sequence_parallel = sequence_parallel
        if self.kind == "layernorm":
            self.bias = nn.Parameter(torch.empty(cfg.hidden_size))
            set_init(self.bias, (cfg.hidden_size,), fill=0.0)
            self.bias.sequence_parallel = sequence_parallel
        else:
            self.register_parameter("bias", None)

    def forward(self, x, branch=None):
        """norm(x), or with ``branch`` (norm(x + branch), x + branch): the residual add fused into the norm."""
        if branch is not None:  # a call, not a method of its own, so the module's hooks (ZeRO-1's wait) run
            if self.kind == "rmsnorm":
                return kernels.add_rms_norm(x, branch, self.weight, self.eps)  # s in the stream's dtype
            return kernels.add_layer_norm(x, branch, self.weight, self.bias, self.eps)
        if self.kind == "rmsnorm":
            return kernels.rms_norm(x, self.weight, self.eps)
        return kernels.layer_norm(x, self.weight, self.bias, self.eps)


class TransformerLayer(nn.Module):
    def __init__(self, cfg, sequence_parallel, selective_recompute=False, layer_number=0):
        super().__init__()
        self.cfg, self.sp = cfg, sequence_parallel
        self.moe = cfg.is_moe_layer(layer_number)
        self.input_norm = Norm(cfg, sequence_parallel)
        self.attention = (MLAttention if cfg.is_mla else Attention)(cfg, cfg.num_layers, sequence_parallel,
                                                                     selective_recompute, layer_number)
        if not cfg.parallel_residual:
            self.post_attention_norm = Norm(cfg, sequence_parallel)
        if self.moe:  # experts in place of the dense MLP (model/moe.py)
            self.mlp = MoELayer(cfg, layer_number, sequence_parallel)
        else:
            self.mlp = MLP(cfg, cfg.num_layers, sequence_parallel)

    def forward(self, x, cos=None, sin=None, kv=None, cu_seqlens=None):
        rope = (cos, sin) if cos is not None else None
        p, training, sharded = self.cfg.dropout, self.training, self.sp
        h = self.input_norm(x)
        if self.cfg.parallel_residual and self.moe:  # the experts take their tokens through the dispatcher
            branch = self.attention(h, rope, kv, cu_seqlens) + self.mlp(h)
            return x + _dropout(branch, p, training, sharded)
        if self.cfg.parallel_residual:  # one gather of h (one gradient all-reduce) for both branches
            qkv, fc1 = column_parallel_linears(h, self.attention.qkv, self.mlp.fc1)
            branch = self.attention.attend(qkv, rope, kv, cu_seqlens) + self.mlp.project(fc1)
            return x + _dropout(branch, p, training, sharded)
        h, x = self.post_attention_norm(x, _dropout(self.attention(h, rope, kv, cu_seqlens), p, training, sharded))
        return x + _dropout(self.mlp(h), p, training, sharded)


class Embedding(nn.Module):
    """Word embeddings (vocab-parallel) plus learned positions; output [s, b, h], this rank's sequence
    chunk under sequence parallelism."""

    def __init__(self, cfg, sequence_parallel):
        super().__init__()
        self.cfg, self.sp = cfg, sequence_parallel and ps.get_tp_size() > 1
        self.word = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, cfg.make_vocab_size_divisible_by,
                                           sequence_parallel=self.sp, init_std=cfg.init_std)
        if cfg.position_embedding == "learned":
            self.position = nn.Parameter(torch.empty(cfg.max_position_embeddings, cfg.hidden_size))
            set_init(self.position, self.position.shape, std=cfg.init_std)
            self.position.sequence_parallel = self.sp
        else:
            self.register_parameter("position", None)

    def forward(self, input_ids, position_ids):
        ids = input_ids.t()  # [s, b]
        if self.position is not None:
            if ids.shape[0] > self.cfg.max_position_embeddings:
                raise ValueError(f"sequence length {ids.shape[0]} exceeds model.max_position_embeddings "
                                 f"{self.cfg.max_position_embeddings}")
            pos_ids = position_ids.t()  # [s, b]
            if self.sp:  # only this rank's chunk: no communication, and the gradient is summed over TP later
                pos_ids = pos_ids.chunk(ps.get_tp_size(), dim=0)[ps.get_tp_rank()]
            pos = F.embedding(pos_ids, self.position)
        x = self.word(ids)  # reduce-scattered to [s/tp, b, h] under sequence parallelism
        if self.position is not None:
            x = x + pos
        return _dropout(x, self.cfg.dropout, self.training, self.sp)


class GPTModel(nn.Module):
    """Layers ``layer_range`` of a GPT decoder (all of them by default).

    forward(input_ids=None, labels=None, hidden_states=None, position_ids=None, kv_cache=None,
            position_offset=0, last_only=False):
      - first stage: ``input_ids`` [b, s]; later stages: ``hidden_states`` [s(/tp), b, h] from the previous.
      - last stage with ``labels`` [b, s]: per-token fp32 loss [b, s]; without labels: this rank's shard of
        the logits [b, s, padded_vocab / tp] (``gather_logits`` joins them), or [b, 1, padded_vocab / tp]
        for the last position alone with ``last_only``.
      - other stages: hidden states [s(/tp), b, h] for the next stage.
      - ``position_offset``: the tokens sit at positions offset .. offset + s - 1 (default position ids and
        rotary tables); ``position_ids`` [b, s], when given, are each token's position instead (learned or
        rotary; data.reset_position_ids), on every stage. Under context parallelism the default positions
        are those of this CP rank's two chunks of the sequence.
      - ``cu_seqlens`` (int32): the micro-batch's document boundaries, its rows laid end to end at full
        length; attention stays within documents (data.reset_attention_mask), on every stage.
      - ``mtp_tokens``, ``mtp_labels`` [D, b, s] (multi-token prediction, last stage, training/data.py): the
        tokens t_{i+k} and targets t_{i+k+1} of each depth; in training mode without them they come from the
        labels (model/mtp.py); in eval mode without them the modules are skipped (evaluation: the LM loss).
      - ``kv_cache`` (a KVCache, inference only): each layer attends over its cached keys and values plus the
        new ones and keeps the new ones; ``position_offset`` must equal ``len(kv_cache)``. A padded cache
        (batched generation, rows of different lengths) takes ``position_ids`` instead and masks its padding.
    """

    def __init__(self, cfg, sequence_parallel=False, pre_process=True, post_process=True, layer_range=None,
                 recompute="none", recompute_num_layers=None):
        super().__init__()
        check_value("training", "recompute", recompute)  # the config's rule and message
        self.cfg = cfg
        self.tp_size = ps.get_tp_size()
        self.sp = sequence_parallel and self.tp_size > 1
        self.pre_process, self.post_process = pre_process, post_process
        start, end = layer_range if layer_range is not None else (0, cfg.num_layers)
        self.layer_range = (start, end)
        if pre_process:
            self.embedding = Embedding(cfg, sequence_parallel)
        selective = recompute == "selective"
        self.layers = nn.ModuleDict({str(i): TransformerLayer(cfg, self.sp, selective, i)
                                     for i in range(start, end)})
        n_full = (end - start) if recompute_num_layers is None else min(recompute_num_layers, end - start)
        self.recompute_layers = set(list(self.layers)[:n_full]) if recompute == "full" else set()
        self.mtp = None
        if post_process:
            self.final_norm = Norm(cfg, self.sp)
            self.padded_vocab_size = self._padded_vocab()
            rows = self.padded_vocab_size // self.tp_size
            if not cfg.tie_embeddings:
                self.output_layer = nn.Parameter(torch.empty(rows, cfg.hidden_size))
                set_init(self.output_layer, (cfg.vocab_size, cfg.hidden_size), partition_dim=0, std=cfg.init_std)
            elif not pre_process:
                # Tied embeddings on a pipeline: the last stage holds a copy of the word embeddings that
                # starts equal (same init name) and whose gradient is summed with the first stage's.
                self.output_layer = nn.Parameter(torch.empty(rows, cfg.hidden_size))
                set_init(self.output_layer, (cfg.vocab_size, cfg.hidden_size), partition_dim=0,
                         std=cfg.init_std, init_name="embedding.word.weight")
                self.output_layer.shared_embedding = True
            self.output_bias = None
            if cfg.output_bias:  # sharded with the head's rows; the padding rows stay zero (take_shard)
                self.output_bias = nn.Parameter(torch.empty(rows))
                set_init(self.output_bias, (cfg.vocab_size,), partition_dim=0, fill=0.0)
            if cfg.mtp_num_layers:  # with the word embeddings they read: the last stage's own copy when untied
                copy = None if pre_process or cfg.tie_embeddings else rows
                self.mtp = MultiTokenPrediction(cfg, self.sp, (Norm, TransformerLayer), embedding_rows=copy)

    def _padded_vocab(self):
        from megagopher.tensor_parallel import pad_vocab_size
        return pad_vocab_size(self.cfg.vocab_size, self.tp_size, self.cfg.make_vocab_size_divisible_by)

    def output_weight(self):
        if self.cfg.tie_embeddings and self.pre_process:
            return self.embedding.word.weight
        return self.output_layer

    def initialize(self, seed):
        """Layout-independent initialisation (invariant 1)."""
        init_parameters(self, seed)
        return self

    def forward(self, input_ids=None, labels=None, hidden_states=None, position_ids=None, kv_cache=None,
                position_offset=0, last_only=False, cu_seqlens=None, mtp_tokens=None, mtp_labels=None):
        self._check_inference_args(position_ids, kv_cache, position_offset, labels, last_only)
        x = self._embed(input_ids, hidden_states, position_ids, position_offset)
        s_full = x.shape[0] * (self.tp_size if self.sp else 1)
        rope = self._rope(s_full, position_ids, position_offset, x.device)
        if kv_cache is not None:
            kv_cache.begin(s_full, x.device)  # a padded (batched) cache's mask for these queries
        for name, layer in self.layers.items():
            if kv_cache is not None:
                x = layer(x, *rope, kv=kv_cache.slot(int(name)))
            elif name in self.recompute_layers:
                x = checkpoint(layer, x, *rope, None, cu_seqlens)
            else:
                x = layer(x, *rope, cu_seqlens=cu_seqlens)
        if not self.post_process:
            return x
        if labels is not None and self.mtp is not None and (mtp_tokens is not None or self.training):
            return self._loss_with_mtp(x, labels, rope, cu_seqlens, mtp_tokens, mtp_labels)
        if last_only and not self.sp:
            x = x[-1:]  # the next token's logits only: prefill skips the head for every other position
        x = self.final_norm(x)
        comm = None if self.tp_size == 1 else "sp" if self.sp else "f"
        if last_only and self.sp:
            x, comm = gather_from_sp_region(x)[-1:], None  # the last position is on the last TP rank until gathered
        # [s, b, padded_vocab / tp]; a tied head's weight is the embedding's, whose later autograd use completes
        # its gradient: no main_grad fusion. Dead after the loss, logits take its gradient; loop.py sets z_loss.
        logits = parallel_linear(x, [(self.output_weight(), self.output_bias)], comm,
                                 ps.get_tp_group() if comm else None,
                                 fuse=not (self.cfg.tie_embeddings and self.pre_process))
        if labels is None:
            return logits.transpose(0, 1)
        loss = vocab_parallel_cross_entropy(logits, labels.t(), self.cfg.vocab_size, self.cfg.label_smoothing,
                                            z_loss=getattr(self, "z_loss", 0.0), inplace_backward=True)
        return loss.t()  # [b, s]

    def _loss_with_mtp(self, x, labels, rope, cu_seqlens, mtp_tokens, mtp_labels):
        """The LM per-token loss [b, s] carrying the MTP modules' terms in its gradient (model/mtp.py)."""
        weight = (self.embedding.word.weight if self.pre_process else
                  self.output_layer if self.cfg.tie_embeddings else self.mtp.embedding)
        ce = functools.partial(vocab_parallel_cross_entropy, vocab_size=self.cfg.vocab_size,
                               label_smoothing=self.cfg.label_smoothing, inplace_backward=True)
        return self.mtp.forward_loss(self.final_norm(x), labels, mtp_tokens, mtp_labels, weight, self._head, rope,
                                     cu_seqlens, ce, getattr(self, "z_loss", 0.0))

    def _head(self, x):
        """Logits [s, n, padded_vocab / tp] of the final-normed x [s(/tp), n, h]. A head that shares its weight
        with an embedding lookup of the same backward leaves the gradient to autograd, which sums the uses
        before the wrapper's hook marks the weight ready."""
        comm = None if self.tp_size == 1 else "sp" if self.sp else "f"
        shared = self.cfg.tie_embeddings and (self.pre_process or self.mtp is not None)
        with head_weight_grad_in_backward() if shared else contextlib.nullcontext():
            return parallel_linear(x, [(self.output_weight(), self.output_bias)], comm,
                                   ps.get_tp_group() if comm else None, fuse=not shared)

    def _rope(self, s, position_ids, offset, device):
        """(cos, sin) for this rank's s tokens: shared by the rows, or (s, b, rot/2) from per-row position
        ids (document masking); (None, None) without rotary positions."""
        if self.cfg.position_embedding != "rope":
            return None, None
        if position_ids is None:
            return rope_tables(self.cfg, s, device, offset=offset, cp=(ps.get_cp_size(), ps.get_cp_rank()))
        b = position_ids.shape[0]
        cos, sin = rope_tables(self.cfg, s * b, device, positions=position_ids.t().reshape(-1))
        return cos.view(s, b, -1), sin.view(s, b, -1)

    def _embed(self, input_ids, hidden_states, position_ids, offset):
        if not self.pre_process:
            if hidden_states is None:
                raise ValueError("GPTModel: a stage without the embedding needs hidden_states")
            return hidden_states
        b, s = input_ids.shape
        limit = self.cfg.max_position_embeddings
        if offset and self.cfg.position_embedding == "learned" and offset + s > limit:
            # The embedding checks the length alone; with an offset the positions can pass the table's end.
            raise ValueError(f"positions {offset}..{offset + s - 1} exceed model.max_position_embeddings {limit}")
        if position_ids is None:
            position_ids = _positions(s, offset, input_ids.device).unsqueeze(0).expand(b, s)
        return self.embedding(input_ids, position_ids)

    def _check_inference_args(self, position_ids, kv_cache, offset, labels, last_only):
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(f"position_offset = {offset!r} must be a non-negative integer")
        if offset and position_ids is not None:
            raise ValueError("give position_ids or position_offset, not both")
        if last_only and labels is not None:
            raise ValueError("last_only computes the next token's logits, not a loss: drop labels")
        if kv_cache is None:
            return
        if self.sp:
            raise ValueError("kv_cache: sequence parallelism splits the tokens over TP ranks and a decoding "
                             "step has one; build the model with sequence_parallel=False for generation")
        if kv_cache.pad is not None:
            if position_ids is None:
                raise ValueError("a padded KV cache (batched generation) needs every row's position_ids")
            return
        if offset != len(kv_cache):
            raise ValueError(f"position_offset = {offset} but the KV cache holds {len(kv_cache)} positions: "
                             "the new tokens must follow the cached ones")

    def gather_logits(self, logits):
        """Full-vocabulary logits [b, s, vocab] (padding dropped) from this rank's shard."""
        if self.tp_size > 1:
            logits = gather_from_tp_region(logits)
        return logits[..., :self.cfg.vocab_size]
