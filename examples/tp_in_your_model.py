"""Tensor parallelism in a model of your own, with megagopher's layers.

    torchrun --nproc-per-node 2 examples/tp_in_your_model.py        (CPU, gloo; any world size dividing 8)

A small "bag of words" language model that is not megagopher's GPT: an embedding, a two-layer MLP block
with a residual, a LayerNorm and an output head. Parallelising it takes four substitutions:

    nn.Embedding     -> VocabParallelEmbedding   (vocabulary rows split over TP ranks)
    first nn.Linear  -> ColumnParallelLinear     (output features split: each rank computes a slice)
    second nn.Linear -> RowParallelLinear        (input features split: partial sums, all-reduced)
    logits + CE      -> F.linear on the local vocab shard + vocab_parallel_cross_entropy

The script trains the parallel model and an ordinary serial copy side by side from the same initial
weights and data and prints the largest difference of their losses, which stays at rounding level.
"""
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megagopher import parallel_state as ps
from megagopher.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                        copy_to_tp_region, init_parameters, vocab_parallel_cross_entropy)

VOCAB, HIDDEN, FFN = 64, 16, 64


class SerialModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.up = nn.Linear(HIDDEN, FFN)
        self.down = nn.Linear(FFN, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, ids, labels):
        x = self.embed(ids)
        x = x + self.down(F.gelu(self.up(x)))
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.view(-1, VOCAB), labels.view(-1))


class ParallelModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = VocabParallelEmbedding(VOCAB, HIDDEN, divisible_by=1)
        self.up = ColumnParallelLinear(HIDDEN, FFN)
        self.down = RowParallelLinear(FFN, HIDDEN, input_is_parallel=True)
        self.norm = nn.LayerNorm(HIDDEN)  # replicated: every rank holds the whole hidden state here
        self.head = ColumnParallelLinear(HIDDEN, VOCAB, bias=False)  # vocab-sharded logits

    def forward(self, ids, labels):
        x = self.embed(ids)
        x = x + self.down(F.gelu(self.up(x)))
        h = copy_to_tp_region(self.norm(x))  # f: the head's input gradient is summed over ranks
        logits = F.linear(h, self.head.weight)  # [b, s, VOCAB / tp], never gathered
        return vocab_parallel_cross_entropy(logits, labels).mean()


def copy_serial_into_parallel(serial, parallel):
    """Gives the parallel model this rank's shard of the serial model's weights."""
    tp, rank = ps.get_tp_size(), ps.get_tp_rank()
    with torch.no_grad():
        parallel.embed.weight.copy_(serial.embed.weight.chunk(tp, 0)[rank])
        parallel.up.weight.copy_(serial.up.weight.chunk(tp, 0)[rank])
        parallel.up.bias.copy_(serial.up.bias.chunk(tp, 0)[rank])
        parallel.down.weight.copy_(serial.down.weight.chunk(tp, 1)[rank])
        parallel.down.bias.copy_(serial.down.bias)
        parallel.norm.load_state_dict(serial.norm.state_dict())
        parallel.head.weight.copy_(serial.head.weight.chunk(tp, 0)[rank])


def main():
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    if 8 % world:
        raise SystemExit(f"run with a world size dividing 8, not {world}")
    ps.initialize_model_parallel(tp=world)
    torch.manual_seed(0)
    serial = SerialModel()
    parallel = ParallelModel()
    init_parameters(parallel, seed=0)  # layout-independent init is available too; here we copy instead
    copy_serial_into_parallel(serial, parallel)
    opt_s = torch.optim.SGD(serial.parameters(), lr=0.5)
    opt_p = torch.optim.SGD(parallel.parameters(), lr=0.5)
    worst = 0.0
    for step in range(5):
        gen = torch.Generator().manual_seed(step)
        ids = torch.randint(0, VOCAB, (4, 12), generator=gen)
        labels = torch.roll(ids, -1, dims=1)
        for model, opt in ((serial, opt_s), (parallel, opt_p)):
            opt.zero_grad()
            loss = model(ids, labels)
            loss.backward()
            opt.step()
            if model is serial:
                serial_loss = loss.item()
        worst = max(worst, abs(loss.item() - serial_loss))
        if dist.get_rank() == 0:
            print(f"step {step}: serial loss {serial_loss:.6f}  tensor-parallel (tp={world}) loss {loss.item():.6f}")
    if dist.get_rank() == 0:
        print(f"max |loss difference| = {worst:.2e}")
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    if worst > 1e-5:
        raise SystemExit("tensor-parallel model diverged from the serial one")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
