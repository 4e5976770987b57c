"""The order in which a run visits a store's samples: chunk-aware, deterministic, resumable, world-size free.

Samples are the store's usable rows (status ok) numbered 0..N-1 in row order, so neighbouring samples share
a Zarr chunk. Reading a chunk decompresses all of its rows; a per-sample uniform shuffle would decompress
a chunk once per sample. Instead epoch e's order is computed from (seed, e) and the chunk layout alone:

  1. shuffle the chunks (a uniform permutation drawn from (seed, e)),
  2. cut the shuffled list into windows of K consecutive chunks (`shuffle_window`),
  3. shuffle the samples inside each window w (a uniform permutation of its K x chunk_size samples, drawn
     from (seed, e, w), so a window's order is computed without the rest of the epoch's).

This is exactly what a shuffle buffer of K chunks, filled chunk by chunk in random order, gives. The
randomness it leaves out: two samples meet in a batch only if their chunks fall in the same window (or in
neighbouring windows at a window boundary), so batch composition is a shuffle of K x chunk_size images
(1024 for K = 16, chunk 64), not of the whole store. Every sample appears once per epoch and the epoch
order changes every epoch. A chunk holds consecutive keys of one source; a folder source lists its keys in
sorted path order, so on ImageNet a chunk is mostly one class and a window of K chunks covers at most about
K classes. The losses are per sample (no batch statistics), so this only makes the gradient noisier than a
uniform shuffle would; raise the window to mix more, at the memory cost noted in DataConfig.

The epochs are concatenated into one stream of sample ids. Optimizer step s takes E = batch x accum x world
positions of the stream (batches may straddle an epoch boundary, no sample is dropped), cut into M = accum x
world device batches of `batch` samples; device batch m = a * world + r of step s (accumulation pass a, rank
r) covers `batch` consecutive positions. Which ones is laid out for the readers: a process reads its device
batch j in loader worker j % workers, and a reader decompresses a chunk once per window it serves only if its
consecutive batches come from the same windows. So the stream is cut into blocks of T = P x R steps (T x E
positions), P = read streams (the loader workers, at least 1), R = device batches of one run (16 windows'
worth, fewer when a block would exceed an epoch). Within a block, device batch slot m owns T x batch
consecutive positions, cut into P runs of R batches; step u of the block (u = 0..T-1) takes batch u // P of
run u % P:

    start(step s = block * T + u, slot m) = block * T * E + (m * T + (u % P) * R + u // P) * batch

A worker serves run (m, u % P) whole (its batches j = s * accum + a, a fixed slot, s = u mod P: j % workers
depends on u % P only when P x accum is a multiple of workers, which P = workers makes true), so it
decompresses each chunk of its runs once, plus the windows two neighbouring runs share (1/16 more); it keeps
accum runs open, so its cache holds 2 x window x accum chunks. The layout depends on (batch, E, P, R), never
on how the passes are spread over processes: 1 process x 2 passes sees the same device batches as 2
processes x 1 pass (at the same data.workers; a different worker count is another layout, so a resumed run
keeps the one in its config.yaml). A step takes E positions of its block, the block as a whole every
position of its span: every sample is seen once per epoch of the stream, at most one block away from its
place in the plain order. A position is a pure function of the step, so a resumed run skips the samples it
has seen without reading them. With P = R = 1 (no loader worker, a single device batch per step or a store
smaller than a run) this is the plain order: device batch m of step s covers [s * E + m * batch, ... + batch).
"""

from dataclasses import dataclass

import numpy as np


class SampleOrder:
    """The epoch orders of N samples laid out in chunks; `chunk_of[i]` is sample i's chunk (non-decreasing).

    Nothing of size N is kept: an epoch is its chunk permutation (C chunk ids, drawn from (seed, epoch)) cut
    into windows, and a window's sample order is drawn from (seed, epoch, window) when a batch needs it, so
    every process and loader worker recomputes the few windows it reads in O(window) time and memory.
    """

    def __init__(self, chunk_of: np.ndarray, window: int, seed: int):
        chunk_of = np.asarray(chunk_of)
        self.size = len(chunk_of)
        bounds = np.flatnonzero(np.diff(chunk_of)) + 1  # sample ids where a new chunk begins
        self.chunk_start = np.concatenate([[0], bounds, [self.size]]).astype(np.int64)  # (C + 1,)
        self.num_chunks = len(self.chunk_start) - 1 if self.size else 0
        self.window = window
        self.seed = seed
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._windows: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self.size

    def layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Epoch `epoch`'s chunks in visit order (C,) and the first epoch position of each window (W + 1,)."""
        if epoch not in self._layouts:
            chunks = np.random.default_rng((self.seed, epoch)).permutation(self.num_chunks)  # (C,)
            sizes = np.diff(self.chunk_start)[chunks]  # (C,) samples per visited chunk
            per_window = np.add.reduceat(sizes, np.arange(0, self.num_chunks, self.window))  # (W,)
            if len(self._layouts) >= 2:
                self._layouts.pop(min(self._layouts))
            self._layouts[epoch] = chunks, np.concatenate([[0], np.cumsum(per_window)])
        return self._layouts[epoch]

    def window_order(self, epoch: int, window: int) -> np.ndarray:
        """Sample ids of window `window` of epoch `epoch`, in visit order (a uniform permutation of them)."""
        if (epoch, window) not in self._windows:
            chunks, _ = self.layout(epoch)
            members = chunks[window * self.window : (window + 1) * self.window]
            ids = np.concatenate([np.arange(self.chunk_start[c], self.chunk_start[c + 1]) for c in members])
            if len(self._windows) >= 4:
                self._windows.pop(next(iter(self._windows)))
            self._windows[epoch, window] = np.random.default_rng((self.seed, epoch, window)).permutation(ids)
        return self._windows[epoch, window]

    def epoch(self, epoch: int) -> np.ndarray:
        """(N,) sample ids in the order epoch `epoch` visits them."""
        return self.positions(epoch * self.size, self.size)

    def positions(self, start: int, count: int) -> np.ndarray:
        """(count,) sample ids at stream positions [start, start + count); O(count + windows) time."""
        wanted = np.arange(start, start + count)  # (count,)
        epochs, within = np.divmod(wanted, self.size)
        ids = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            selected = np.flatnonzero(epochs == epoch)  # contiguous positions of one epoch
            _, window_start = self.layout(int(epoch))
            window_of = np.searchsorted(window_start, within[selected], side="right") - 1  # non-decreasing
            for run in np.split(selected, np.flatnonzero(np.diff(window_of)) + 1):
                window = int(window_of[run[0] - selected[0]])
                ids[run] = self.window_order(int(epoch), window)[within[run] - window_start[window]]
        return ids


RUN_WINDOWS = 16  # windows of one read stream's run: the two it shares with its neighbours cost 1/16 more reads


@dataclass(frozen=True)
class BatchPlan:
    """Which stream positions one process's device batches cover (the layout in the module docstring).

    batch: samples per device batch; accum: device batches per optimizer step and process;
    world / rank: processes and this one's index; streams (P), run (R): the read streams of the layout and
    the device batches of a run. The process's device batch j belongs to optimizer step j // accum,
    accumulation pass j % accum.
    """

    batch: int
    accum: int
    world: int
    rank: int
    streams: int = 1
    run: int = 1

    @classmethod
    def reading(cls, batch: int, accum: int, world: int, rank: int, workers: int, samples: int,
                window_samples: int) -> "BatchPlan":
        """The plan whose runs each of `workers` loader workers reads whole: P = max(1, workers), R = RUN_WINDOWS
        windows of `window_samples` in batches, at most one epoch of `samples` per block."""
        streams = max(1, workers)
        run = min(-(-RUN_WINDOWS * window_samples // batch), samples // (streams * batch * accum * world))
        return cls(batch, accum, world, rank, streams, max(1, run))

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
        steps = self.streams * self.run  # T, steps per block
        block, u = divmod(step, steps)
        within = index * steps + (u % self.streams) * self.run + u // self.streams  # device batches into the block
        return block * steps * self.effective_batch + within * self.batch
