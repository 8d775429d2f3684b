"""training/data.Prefetcher: the micro-batches are exactly those of data.microbatches, step after step
(a step that asks for other indices than the prefetched ones gets them too), and the next step's are read
on the background thread while the current step runs."""
import threading

import torch

from megagopher.training.data import Prefetcher, SyntheticDataset, global_batch_indices, microbatches


class Recording:
    """A dataset that records which thread read each sample."""

    def __init__(self, dataset):
        self.dataset, self.readers = dataset, {}

    def __getitem__(self, i):
        self.readers[i] = threading.current_thread().name
        return self.dataset[i]


def test_prefetched_batches_equal_the_direct_ones_and_come_from_the_background():
    dataset = Recording(SyntheticDataset(50, 12, seed=3))
    device = torch.device("cpu")
    prefetch = Prefetcher(dataset, 2, device)
    steps = [(0, 8), (8, 8), (16, 4), (40, 8)]  # a ramp-up size change, then a batch other than the announced
    announced = [(8, 8), (16, 4), (20, 4), None]
    try:
        for (start, size), ahead in zip(steps, announced):
            indices = global_batch_indices(start, size, 1, 2)
            following = global_batch_indices(*ahead, 1, 2) if ahead else None
            got = prefetch.get(indices, following)
            want = microbatches(dataset.dataset, indices, 2, device)
            assert len(got) == len(want)
            for g, w in zip(got, want):
                assert torch.equal(g["tokens"], w["tokens"]) and torch.equal(g["labels"], w["labels"])
    finally:
        prefetch.close()
    background = {i for i, name in dataset.readers.items() if name.startswith("megagopher-data")}
    assert set(global_batch_indices(8, 8, 1, 2)) <= background  # step 2's samples were read ahead
    assert set(global_batch_indices(0, 8, 1, 2)).isdisjoint(background)  # the first step had nothing ahead
    assert set(global_batch_indices(40, 8, 1, 2)).isdisjoint(background)  # not announced: read when asked
