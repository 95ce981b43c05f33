"""Training and validation batches, made one at a time from the faces as stored (uint8, in memory or
memory-mapped from .npy shards), so memory does not grow with the dataset.

One class serves one process and many. In a data-parallel job (ferkit.distributed) every process draws
the same order from the seed and the epoch and takes its own rows of each global batch; or, training on
a packed dataset of at least as many shards as processes, each process reads only its own shards (shard
s belongs to process s mod P) in its own order, and a global batch is every process's local batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np

from ferkit.errors import FerkitError


def face_batches(faces, targets: np.ndarray, *, batch_size: int, to_input: Callable[[np.ndarray], np.ndarray],
                 sample_weight: np.ndarray | None = None, shuffle: bool = True, seed: int = 0, first_epoch: int = 0,
                 num_processes: int = 1, process_id: int = 0, drop_remainder: bool = False, pad: bool = False,
                 own_shards: bool = False, mixup: float = 0.0):
    """A Keras PyDataset of (inputs, targets, sample weights) batches.

    `faces`: (N, H, W) uint8, anything indexable by an array of rows; `to_input` turns a batch of them
    into model inputs. `batch_size` is the global batch; this process yields rows [i * b, (i + 1) * b)
    of each, b = batch_size / num_processes. The last incomplete batch is kept, dropped
    (`drop_remainder`, training in a data-parallel job) or filled with weight-0 faces (`pad`, validation
    there: every face counts once). With `shuffle`, the order is drawn from (`seed`, epoch).

    `own_shards` (training in a data-parallel job): where `shard_groups` gives each process shards of its
    own, this process reads only those, b rows a batch, and an epoch lasts as long as the smallest group.

    `mixup` (alpha > 0, Zhang et al. 2018): each face of a batch is blended with another face of the same
    batch, weight lam ~ Beta(alpha, alpha) per face, and its target and sample weight alike. Partners and
    weights are drawn over the global batch from (`seed`, epoch, batch), so processes blend as one process
    would; reading their own shards, each process blends within its local batch."""
    from ferkit._keras import import_keras

    if batch_size % num_processes:
        raise FerkitError(f"the batch size ({batch_size}) must be a multiple of the number of processes ({num_processes})")
    return _face_batches_class(import_keras())(
        faces, targets, batch_size, to_input, sample_weight, shuffle, seed, first_epoch, num_processes, process_id,
        drop_remainder, pad, shard_groups(faces, num_processes) if own_shards else None, mixup,
    )


def shard_groups(faces, num_processes: int) -> list[np.ndarray] | None:
    """The rows each process reads when it reads its own shards: those of shards p, p + P, p + 2P, ...
    for process p of P. None unless `faces` is a packed dataset of at least P shards and P > 1."""
    shards = getattr(faces, "num_shards", 1)
    if num_processes < 2 or shards < num_processes:
        return None
    return [np.concatenate([faces.shard_rows(s) for s in range(p, shards, num_processes)]) for p in range(num_processes)]


def faces_per_epoch(faces, batch_size: int, num_processes: int) -> int:
    """The faces one epoch of a data-parallel job trains on: whole global batches only."""
    groups = shard_groups(faces, num_processes)
    if groups is None:
        return len(faces) // batch_size * batch_size
    return min(len(g) for g in groups) // (batch_size // num_processes) * batch_size


@functools.cache
def _face_batches_class(keras):
    """Defined once Keras is imported, never at ferkit's import."""

    class FaceBatches(keras.utils.PyDataset):
        def __init__(self, faces, targets, batch_size, to_input, sample_weight, shuffle, seed, first_epoch,
                     num_processes, process_id, drop_remainder, pad, groups, mixup):
            super().__init__()
            self.faces, self.targets, self.to_input, self.weight = faces, targets, to_input, sample_weight
            self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, first_epoch
            self.groups, self.process_id = groups, process_id
            self.local_size = batch_size // num_processes
            start = process_id * self.local_size
            self.local = slice(start, start + self.local_size) if num_processes > 1 else slice(None)
            self.drop_remainder, self.pad, self.mixup = drop_remainder, pad, mixup
            self._order_epoch, self._order = None, None

        def __len__(self):
            if self.groups is not None:
                return min(len(g) for g in self.groups) // self.local_size
            count = len(self.targets) / self.batch_size
            return math.floor(count) if self.drop_remainder else math.ceil(count)

        def order(self) -> np.ndarray:
            if self._order_epoch != self.epoch:
                rows = np.arange(len(self.targets)) if self.groups is None else self.groups[self.process_id]
                key = [self.seed, self.epoch] if self.groups is None else [self.seed, self.epoch, self.process_id]
                self._order = np.random.default_rng(key).permutation(rows) if self.shuffle else rows
                self._order_epoch = self.epoch
            return self._order

        def __getitem__(self, index):
            if self.groups is not None:  # this process's own shards: its whole local batch from them
                rows = self.order()[index * self.local_size : (index + 1) * self.local_size]
                return self._mixed(rows, self._weights(rows), slice(None), [self.seed, self.epoch, index, self.process_id])
            rows = self.order()[index * self.batch_size : (index + 1) * self.batch_size]
            weights = self._weights(rows)
            if self.pad and len(rows) < self.batch_size:
                missing = self.batch_size - len(rows)
                rows = np.concatenate([rows, np.zeros(missing, rows.dtype)])
                weights = np.concatenate([weights, np.zeros(missing, np.float32)])
            return self._mixed(rows, weights, self.local, [self.seed, self.epoch, index])

        def _mixed(self, rows, weights, local, key):
            """The `local` part of the batch `rows`, each face blended with its partner when mixing up."""
            batch = self._read(rows[local], weights[local])
            if not self.mixup:
                return batch
            rng = np.random.default_rng(key)
            partner = rng.permutation(len(rows))
            lam = rng.beta(self.mixup, self.mixup, size=len(rows)).astype(np.float32)[local]
            partners = self._read(rows[partner][local], weights[partner][local])
            return tuple(_blend(a, b, lam) for a, b in zip(batch, partners))

        def _weights(self, rows):
            return np.ones(len(rows), np.float32) if self.weight is None else self.weight[rows].astype(np.float32)

        def _read(self, rows, weights):
            ordered = np.argsort(rows)  # read memory-mapped shards in file order, then restore the batch's order
            faces = np.asarray(self.faces[rows[ordered]])[np.argsort(ordered)]
            return self.to_input(faces), self.targets[rows], weights

        def on_epoch_end(self):
            self.epoch += 1

    return FaceBatches


def _blend(a: np.ndarray, b: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """lam * a + (1 - lam) * b, one lam per row."""
    lam = lam.reshape((-1,) + (1,) * (np.ndim(a) - 1))
    return (lam * a + (1 - lam) * b).astype(np.float32)
