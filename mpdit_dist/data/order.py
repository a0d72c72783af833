"""The global sample order: an endless stream of per-epoch permutations.

Position ``p`` of the stream (``p = 0, 1, 2, ...``) is sample ``perm(seed, epoch)[p % N]`` with
``epoch = p // N``. Global step ``k`` of a run with global batch ``G`` consumes positions
``[k*G, (k+1)*G)``; rank ``r`` of ``W`` takes the contiguous slice ``[r*G/W, (r+1)*G/W)`` of it.

Consequences, all by construction rather than by bookkeeping:

* every sample is seen exactly once per epoch and none is dropped or repeated; when ``N`` is not
  a multiple of ``G`` the global batch that crosses an epoch boundary holds the last samples of
  epoch ``e`` and the first of epoch ``e+1`` (there is no short or padded last batch);
* the state of a reader is the number of positions consumed, independent of the number of ranks,
  workers or processes, so a run saved with 2 ranks resumes with 1 or 3 ranks on exactly the
  remaining global batches;
* per-sample randomness (which latent is drawn from stored moments, whether the flipped encoding
  is used) comes from :func:`sample_seed` of (seed, epoch, sample index), never from the rank or
  the worker, so any world size produces identical tensors for the same global batch.

The permutation of an epoch is defined here, not by a library: sample ``i`` gets the key
``splitmix64(base ^ i)`` with ``base`` from (seed, epoch), and the epoch visits the samples in
increasing key order. splitmix64 is a bijection of 64-bit integers, so the keys are distinct and
the order does not depend on the sort algorithm; the arithmetic is wrapping 64-bit integer
arithmetic, so the order is the same on every platform and every numpy version. (numpy's
``Generator.permutation`` carries no such promise across versions: a cluster upgrade in the
middle of a run would silently change the rest of the epoch, repeating some samples and
skipping others.) :data:`ORDER_SCHEME` names this definition; the loader stores it in its state
and refuses to resume a state written under another.
"""
from __future__ import annotations

import numpy as np

_MASK64 = (1 << 64) - 1
ORDER_SCHEME = "splitmix64-keys-v1"  # stored in the loader state; change it whenever the order changes


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    """:func:`_splitmix64` of every element of a uint64 array (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def stable_permutation(n: int, seed: int) -> np.ndarray:
    """A permutation of ``range(n)`` that is a pure function of (n, seed), identical on every
    platform and numpy version (see the module docstring)."""
    keys = _splitmix64_array(np.arange(n, dtype=np.uint64) ^ np.uint64(seed & _MASK64))
    return np.argsort(keys, kind="stable").astype(np.int64)


def sample_seed(seed: int, epoch: int, index: int, salt: int = 0) -> int:
    """A 63-bit seed for the randomness of one sample in one epoch (a pure function)."""
    h = _splitmix64(seed & _MASK64)
    for v in (epoch, index, salt):
        h = _splitmix64(h ^ (v & _MASK64))
    return h & ((1 << 63) - 1)


class GlobalOrder:
    """Maps stream positions to sample indices for ``num_samples`` samples."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        if num_samples < 1:
            raise ValueError(f"the dataset is empty (num_samples={num_samples})")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self._cache: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        """The sample order of one epoch; a pure function of (seed, epoch)."""
        perm = self._cache.get(epoch)
        if perm is None:
            if self.shuffle:
                perm = stable_permutation(self.num_samples, sample_seed(self.seed, epoch, 0, salt=0x5EED))
            else:
                perm = np.arange(self.num_samples, dtype=np.int64)
            if len(self._cache) >= 2:  # a batch touches at most two epochs
                self._cache.pop(min(self._cache))
            self._cache[epoch] = perm
        return perm

    def lookup(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(sample indices, epochs) of stream positions ``[start, stop)``."""
        pos = np.arange(start, stop, dtype=np.int64)
        epochs = pos // self.num_samples
        idx = np.empty_like(pos)
        for e in np.unique(epochs):
            sel = epochs == e
            idx[sel] = self.permutation(int(e))[pos[sel] % self.num_samples]
        return idx, epochs
