"""Draw samples from several datasets in proportion to weights, deterministically.

Megatron-Core's BlendedDataset picks, for each sample in turn, the dataset whose realised count lags its
target most (a per-sample loop in C++). We get the same kind of schedule (not the identical sequence)
with vectorised numpy: the k-th sample of dataset d is given the virtual time (k + 0.5) / w_d, and the
blend serves samples in order of virtual time (ties to the lower dataset index; a stable sort keeps
that). In any prefix of n samples dataset d then appears n * w_d times to within 1 + D * w_d / 2 (D
datasets), a sample or two for a usual blend. The schedule depends only on the weights (not on the seed
or the data-parallel size), which is what invariant 2 needs: each source dataset is already shuffled by
its own seeded index.
"""
import numpy as np

from megagopher.errors import InputError


def normalize_weights(weights, what="blend"):
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise InputError(f"{what} weights must be a non-empty list of positive numbers, got {list(weights)}")
    return w / w.sum()


def blending_schedule(weights, size):
    """(dataset_index, dataset_sample_index) for the first ``size`` samples: which dataset serves sample
    i and which of that dataset's samples it is (each dataset's samples are taken 0, 1, 2, ...)."""
    w = normalize_weights(weights)
    # Enough candidates per dataset: the schedule never runs more than 1 + D * w_d / 2 samples ahead of
    # dataset d's exact share.
    counts = (np.floor((size + len(w)) * w) + 2).astype(np.int64)
    dataset = np.repeat(np.arange(len(w), dtype=np.int64), counts)
    sample = np.concatenate([np.arange(c, dtype=np.int64) for c in counts])
    times = (sample + 0.5) / w[dataset]
    order = np.argsort(times, kind="stable")[:size]
    index_dtype = np.uint8 if len(w) < 256 else np.int32
    return dataset[order].astype(index_dtype), sample[order]


def samples_per_dataset(weights, size):
    """How many samples of each dataset the first ``size`` samples of the blend use."""
    dataset_index, _ = blending_schedule(weights, size)
    return np.bincount(dataset_index, minlength=len(weights)).astype(np.int64)


class BlendedDataset:
    """``size`` samples drawn from ``datasets`` by ``weights``; ``ds[i]`` returns what dataset
    ``dataset_index[i]`` returns for its sample ``dataset_sample_index[i]``."""

    def __init__(self, datasets, weights, size):
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights)
        self.size = int(size)
        self.dataset_index, self.dataset_sample_index = blending_schedule(self.weights, self.size)
        need = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for d, (ds, n) in enumerate(zip(self.datasets, need)):
            if n and (ds is None or len(ds) < n):
                raise ValueError(f"blend component {d} must provide {n} samples but has "
                                 f"{0 if ds is None else len(ds)}")

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        if not -self.size <= i < self.size:
            raise IndexError(f"sample {i} is out of range for a blend of {self.size} samples")
        return self.datasets[self.dataset_index[i]][int(self.dataset_sample_index[i])]
