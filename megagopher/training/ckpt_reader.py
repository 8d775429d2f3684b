"""Reading a checkpoint under any layout, touching only what this rank needs (docs/ARCHITECTURE.md 4.6).

``CheckpointReader`` needs no process group. Under the layout a checkpoint was saved with (the same TP
size), a rank reads exactly the ranges of its own parameters and optimizer shard, straight into them.
Under another TP size it joins one parameter at a time (the saved TP ranks' pieces, the vocabulary
padding dropped), re-pads and cuts it for the new layout: memory bounded by the largest single tensor,
never the model. Data-parallel size and ZeRO-1 never matter: pieces are indexed by parameter name and
element range, whoever wrote them.

Format 2 checkpoints (one torch.save file of whole shards per (tp, pp) rank, written by the first
release) are still read, through the same interface. metadata.json is opened and checked against its
digest by ckpt_format.read_metadata, the format's one reader.
"""
import os

import torch

from megagopher.common import DTYPES_BY_NAME
from megagopher.training.ckpt_files import CheckpointCorrupt, read_header, read_into, verify_file
from megagopher.training.ckpt_format import read_metadata

_DTYPES = DTYPES_BY_NAME  # metadata's dtype names, from the one dtype table (megagopher/common.py)


class CheckpointReader:
    """Tensors of one checkpoint directory by name: a TP rank's local tensor or ranges of it, or the whole
    unpadded tensor. ``kind`` is "param" (the weights) or an optimizer state ("master", "exp_avg",
    "exp_avg_sq"); "master" falls back to "param" for fp32 runs, whose weights are their master."""

    def __init__(self, path):
        self.path = path
        self.meta = read_metadata(path)
        self.format = int(self.meta.get("format_version", 1))
        self._headers, self._legacy = {}, {}

    # -- the index ------------------------------------------------------------------------------------
    def names(self):
        return list(self.meta["tensors"])

    def entry(self, name):
        if name not in self.meta["tensors"]:
            raise KeyError(f"checkpoint {self.path} has no tensor {name!r}")
        return self.meta["tensors"][name]

    def has(self, name, kind):
        if self.format < 3:
            return kind == "param" or (self.meta.get("has_optimizer") and kind in self.legacy_optimizer_keys(name))
        return bool(self.entry(name)["pieces"].get(kind))

    def source_kind(self, name, kind):
        """The kind actually stored for ``kind`` (fp32 runs store no separate master)."""
        if kind == "master" and not self.has(name, "master") and self.meta.get("has_optimizer"):
            return "param"
        if not self.has(name, kind):
            raise CheckpointCorrupt(f"{self.path}: no {kind} state for {name}")
        return kind

    def saved_ranks(self, name):
        """The TP ranks whose local tensors make up ``name`` (one when it is replicated)."""
        entry = self.entry(name)
        return [0] if entry["partition_dim"] is None else list(range(entry["tp_size"]))

    def local_shape(self, name, tp_rank):
        entry = self.entry(name)
        if self.format < 3:
            return list(self._legacy_tensor(name, "param", tp_rank).shape)
        return entry["local_shapes"][str(tp_rank)]

    def files_for(self, name, kind, tp_ranks):
        if self.format < 3:
            prefix = "model_" if kind == "param" else "optim_"
            return {self._legacy_file(name, r).replace("model_", prefix, 1) for r in tp_ranks}
        pieces = self.entry(name)["pieces"].get(self.source_kind(name, kind), {})
        return {p[2] for r in tp_ranks for p in pieces.get(str(r), [])}

    def verify(self, file):
        record = self.meta["files"].get(file)
        if record is None:
            raise CheckpointCorrupt(f"{self.path}: metadata.json lists no file {file}")
        if isinstance(record, str):  # format 2 recorded the checksum only
            record = {"sha256": record, "bytes": os.path.getsize(os.path.join(self.path, file))}
        verify_file(os.path.join(self.path, file), record)

    # -- reading --------------------------------------------------------------------------------------
    def read_local(self, name, kind, tp_rank, out, lo=0):
        """Fills the flat tensor ``out`` with elements [lo, lo + out.numel()) of TP rank ``tp_rank``'s
        local ``kind`` tensor of ``name``, reading only those bytes."""
        kind = self.source_kind(name, kind)
        if self.format < 3:
            out.copy_(self._legacy_tensor(name, kind, tp_rank).reshape(-1)[lo:lo + out.numel()])
            return
        hi, covered = lo + out.numel(), 0
        for p_lo, p_hi, file, key in self.entry(name)["pieces"][kind].get(str(tp_rank), []):
            a, z = max(lo, p_lo), min(hi, p_hi)
            if a < z:
                header = self._header(file)
                if key not in header:
                    raise CheckpointCorrupt(f"{os.path.join(self.path, file)}: no tensor {key}")
                read_into(os.path.join(self.path, file), header[key], a - p_lo, out[a - lo:z - lo])
                covered += z - a
        if covered != hi - lo:
            raise CheckpointCorrupt(f"{self.path}: the pieces of {kind} {name} (TP rank {tp_rank}) cover "
                                    f"{covered} of elements [{lo}, {hi})")

    def local_tensor(self, name, kind, tp_rank):
        shape = self.local_shape(name, tp_rank)
        out = torch.empty(shape, dtype=self._dtype(name, kind))
        self.read_local(name, kind, tp_rank, out.view(-1))
        return out

    def full_tensor(self, name, kind="param"):
        """The whole tensor ``name`` under no tensor parallelism, with the vocabulary padding removed."""
        entry = self.entry(name)
        dim = entry["partition_dim"]
        if dim is None:
            return self.local_tensor(name, kind, 0)
        shards = [self.local_tensor(name, kind, r) for r in self.saved_ranks(name)]
        full = torch.cat(shards, dim=dim)
        del shards
        return full.narrow(dim, 0, entry["full_shape"][dim])

    def rng_tensors(self, rank):
        """The RNG states rank ``rank`` saved, or None (another layout, or a converted checkpoint)."""
        file = self.meta.get("rng_files", {}).get(str(rank)) if self.format >= 3 else None
        if file is None:
            return None
        header = self._header(file)
        out = {}
        for key, entry in header.items():
            if key.startswith("rng/"):
                out[key] = torch.empty(entry[1], dtype=entry[0])
                read_into(os.path.join(self.path, file), entry, 0, out[key].view(-1))
        return out

    def rng_file(self, rank):
        return self.meta.get("rng_files", {}).get(str(rank)) if self.format >= 3 else None

    # -- internals ------------------------------------------------------------------------------------
    def _header(self, file):
        if file not in self._headers:
            self._headers[file] = read_header(os.path.join(self.path, file))
        return self._headers[file]

    def _dtype(self, name, kind):
        if kind != "param" and self.source_kind(name, kind) != "param":
            return torch.float32
        if self.format < 3:
            return self._legacy_tensor(name, "param", 0).dtype
        return _DTYPES[self.entry(name)["dtype"]]

    def _legacy_file(self, name, tp_rank):
        return self.entry(name)["shards"][str(tp_rank)]

    def _legacy_tensor(self, name, kind, tp_rank):
        file = self._legacy_file(name, tp_rank)
        if kind != "param":
            file = file.replace("model_", "optim_", 1)
        if file not in self._legacy:
            self._legacy[file] = torch.load(os.path.join(self.path, file), map_location="cpu", weights_only=True,
                                            mmap=True)
        content = self._legacy[file][name]
        return content if kind == "param" else content[kind]

    def legacy_optimizer_keys(self, name):
        """The optimizer states a format-2 checkpoint holds for ``name``."""
        file = self._legacy_file(name, 0).replace("model_", "optim_", 1)
        if file not in self._legacy:
            path = os.path.join(self.path, file)
            if not os.path.exists(path):
                return []
            self._legacy[file] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return list(self._legacy[file][name].keys())
