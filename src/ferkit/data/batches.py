"""Training and validation batches, made one at a time from the faces as stored (uint8, in memory or
memory-mapped from .npy shards), so memory does not grow with the dataset.

One class serves one process and many: in a data-parallel job (ferkit.distributed) every process draws
the same order from the seed and the epoch and takes its own rows of each global batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np

from ferkit.errors import FerkitError


def face_batches(faces, targets: np.ndarray, *, batch_size: int, to_input: Callable[[np.ndarray], np.ndarray],
                 sample_weight: np.ndarray | None = None, shuffle: bool = True, seed: int = 0, first_epoch: int = 0,
                 num_processes: int = 1, process_id: int = 0, drop_remainder: bool = False, pad: bool = False):
    """A Keras PyDataset of (inputs, targets, sample weights) batches.

    `faces`: (N, H, W) uint8, anything indexable by an array of rows; `to_input` turns a batch of them
    into model inputs. `batch_size` is the global batch; this process yields rows [i * b, (i + 1) * b)
    of each, b = batch_size / num_processes. The last incomplete batch is kept, dropped
    (`drop_remainder`, training in a data-parallel job) or filled with weight-0 faces (`pad`, validation
    there: every face counts once). With `shuffle`, the order is drawn from (`seed`, epoch)."""
    from ferkit._keras import import_keras

    if batch_size % num_processes:
        raise FerkitError(f"the batch size ({batch_size}) must be a multiple of the number of processes ({num_processes})")
    return _face_batches_class(import_keras())(
        faces, targets, batch_size, to_input, sample_weight, shuffle, seed, first_epoch, num_processes, process_id,
        drop_remainder, pad,
    )


@functools.cache
def _face_batches_class(keras):
    """Defined once Keras is imported, never at ferkit's import."""

    class FaceBatches(keras.utils.PyDataset):
        def __init__(self, faces, targets, batch_size, to_input, sample_weight, shuffle, seed, first_epoch,
                     num_processes, process_id, drop_remainder, pad):
            super().__init__()
            self.faces, self.targets, self.to_input, self.weight = faces, targets, to_input, sample_weight
            self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, first_epoch
            local = batch_size // num_processes
            self.local = slice(process_id * local, (process_id + 1) * local) if num_processes > 1 else slice(None)
            self.drop_remainder, self.pad = drop_remainder, pad
            self._order_epoch, self._order = None, None

        def __len__(self):
            count = len(self.targets) / self.batch_size
            return math.floor(count) if self.drop_remainder else math.ceil(count)

        def order(self) -> np.ndarray:
            if self._order_epoch != self.epoch:
                n = len(self.targets)
                self._order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
                self._order_epoch = self.epoch
            return self._order

        def __getitem__(self, index):
            rows = self.order()[index * self.batch_size : (index + 1) * self.batch_size]
            weights = np.ones(len(rows), np.float32) if self.weight is None else self.weight[rows].astype(np.float32)
            if self.pad and len(rows) < self.batch_size:
                missing = self.batch_size - len(rows)
                rows = np.concatenate([rows, np.zeros(missing, rows.dtype)])
                weights = np.concatenate([weights, np.zeros(missing, np.float32)])
            rows, weights = rows[self.local], weights[self.local]
            ordered = np.argsort(rows)  # read memory-mapped shards in file order, then restore the batch's order
            faces = np.asarray(self.faces[rows[ordered]])[np.argsort(ordered)]
            return self.to_input(faces), self.targets[rows], weights

        def on_epoch_end(self):
            self.epoch += 1

    return FaceBatches
