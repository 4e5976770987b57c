"""The order in which a run visits a store's samples: chunk-aware, deterministic, resumable, world-size free.

Samples are the store's usable rows (status ok) numbered 0..N-1 in row order, so neighbouring samples share
a Zarr chunk. Reading a chunk decompresses all of its rows; a per-sample uniform shuffle would decompress
a chunk once per sample. Instead epoch e's order is computed from (seed, e) and the chunk layout alone:

  1. shuffle the chunks (a uniform permutation),
  2. cut the shuffled list into windows of K consecutive chunks (`shuffle_window`),
  3. shuffle the samples inside each window (a uniform permutation of its K x chunk_size samples).

This is exactly what a shuffle buffer of K chunks, filled chunk by chunk in random order, gives. The
randomness it leaves out: two samples meet in a batch only if their chunks fall in the same window (or in
neighbouring windows at a window boundary), so batch composition is a shuffle of K x chunk_size images
(1024 for K = 16, chunk 64), not of the whole store. Every sample appears once per epoch and the epoch
order changes every epoch. A chunk holds consecutive keys of one source; a folder source lists its keys in
sorted path order, so on ImageNet a chunk is mostly one class and a window of K chunks covers at most about
K classes. The losses are per sample (no batch statistics), so this only makes the gradient noisier than a
uniform shuffle would; raise the window to mix more, at the memory cost noted in DataConfig.

The epochs are concatenated into one stream of sample ids. Optimizer step s takes the stream positions
[s * E, (s + 1) * E), E = batch x accum x world (batches may straddle an epoch boundary, no sample is
dropped). Those E positions are cut into accum x world device batches of `batch` samples; device batch
m = a * world + r of step s (accumulation pass a, rank r) covers [s * E + m * batch, ... + batch).
So the samples of a step, and of each of its device batches, depend on the effective batch and the
per-process batch, never on how the passes are spread over processes: 1 process x 2 passes sees the
same device batches as 2 processes x 1 pass. A position in the stream is a pure function of the step,
so a resumed run skips the samples it has seen without reading them.
"""

from dataclasses import dataclass

import numpy as np


class SampleOrder:
    """The epoch orders of N samples laid out in chunks; `chunk_of[i]` is sample i's chunk (non-decreasing)."""

    def __init__(self, chunk_of: np.ndarray, window: int, seed: int):
        self.chunk_of = np.asarray(chunk_of, dtype=np.int64)  # (N,)
        _, self.chunk_index = np.unique(self.chunk_of, return_inverse=True)  # (N,) chunk ids made 0..C-1
        self.num_chunks = int(self.chunk_index.max()) + 1 if len(self.chunk_of) else 0
        self.window = window
        self.seed = seed
        self._cached: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.chunk_of)

    def epoch(self, epoch: int) -> np.ndarray:
        """(N,) sample ids in the order epoch `epoch` visits them."""
        if epoch not in self._cached:
            rng = np.random.default_rng((self.seed, epoch))
            rank_of_chunk = np.empty(self.num_chunks, dtype=np.int64)
            rank_of_chunk[rng.permutation(self.num_chunks)] = np.arange(self.num_chunks)
            window_of = rank_of_chunk[self.chunk_index] // self.window  # (N,)
            within = rng.random(len(self))  # uniform keys: a uniform permutation inside each window
            if len(self._cached) >= 2:
                self._cached.pop(min(self._cached))
            self._cached[epoch] = np.lexsort((within, window_of))
        return self._cached[epoch]

    def positions(self, start: int, count: int) -> np.ndarray:
        """(count,) sample ids at stream positions [start, start + count)."""
        size = len(self)
        wanted = np.arange(start, start + count)
        epochs = wanted // size
        ids = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            selected = epochs == epoch
            ids[selected] = self.epoch(int(epoch))[wanted[selected] % size]
        return ids


@dataclass(frozen=True)
class BatchPlan:
    """Which stream positions one process's device batches cover.

    batch: samples per device batch; accum: device batches per optimizer step and process;
    world / rank: processes and this one's index. The process's device batch j belongs to optimizer step
    j // accum, accumulation pass j % accum.
    """

    batch: int
    accum: int
    world: int
    rank: int

    @property
    def effective_batch(self) -> int:
        return self.batch * self.accum * self.world

    def step_and_index(self, j: int) -> tuple[int, int]:
        """(optimizer step, index of the device batch among the step's accum x world) of local batch j."""
        step, accum_pass = divmod(j, self.accum)
        return step, accum_pass * self.world + self.rank

    def start(self, j: int) -> int:
        """First stream position of local device batch j."""
        step, index = self.step_and_index(j)
        return step * self.effective_batch + index * self.batch
