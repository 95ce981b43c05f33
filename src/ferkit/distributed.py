"""Data-parallel training over several processes: one per machine or GPU, on Keras' own distribution API.

Each process runs the same `ferkit train` with a `Topology`: where process 0 listens, how many processes
there are, and which one this is. They join through `jax.distributed` (Keras on the JAX backend; on CPUs
the processes talk over Gloo), and `keras.distribution.DataParallel` keeps one copy of the weights per
device and averages the gradients of every step over all of them.

Every process reads the whole dataset and takes its own part of each global batch (`ShardedBatches`),
in an order all processes draw from the same seed, so N processes train exactly as one process would on
the same global batches: the same weights at the end, to float rounding. Process 0 alone writes the run
folder; the others write theirs into a temporary folder.

`launch_local(n, args)` starts n such processes on this machine, for testing and for multi-GPU boxes.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import tempfile
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ferkit.errors import FerkitError
from ferkit.extras import require


@dataclass
class Topology:
    coordinator: str | None = None  # HOST:PORT where process 0 listens
    num_processes: int = 1
    process_id: int = 0

    def __post_init__(self):
        if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
            raise FerkitError(f"--process-id must lie in 0..{self.num_processes - 1} for {self.num_processes} processes")
        if self.num_processes > 1 and not self.coordinator:
            raise FerkitError("several processes need --coordinator HOST:PORT (where process 0 listens)")

    @property
    def distributed(self) -> bool:
        return self.num_processes > 1

    @property
    def is_chief(self) -> bool:
        return self.process_id == 0

    def save(self, path: str | Path, devices: list[str]) -> None:
        Path(path).write_text(json.dumps({**asdict(self), "backend": "jax", "devices": devices}, indent=2) + "\n")


def start(topology: Topology):
    """Join the other processes and make Keras split every batch over all their devices; returns keras."""
    backend = os.environ.setdefault("KERAS_BACKEND", "jax")
    if backend != "jax" or ("keras" in sys.modules and sys.modules["keras"].backend.backend() != "jax"):
        raise FerkitError("multi-process training runs on the JAX backend: set KERAS_BACKEND=jax (or leave it unset)")
    jax = require("jax", "multi-process training", extra="distributed")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPUs; GPUs use NCCL regardless
    jax.distributed.initialize(topology.coordinator, num_processes=topology.num_processes, process_id=topology.process_id)
    from ferkit._keras import import_keras

    keras = import_keras()
    distribution = keras.distribution.DataParallel(devices=jax.devices())
    distribution.auto_shard_dataset = False  # ShardedBatches gives each process its part already
    keras.distribution.set_distribution(distribution)
    return keras


def device_names() -> list[str]:
    import jax

    return [str(device) for device in jax.devices()]


def sharded_batches(keras, x, y, *, global_batch: int, topology: Topology, seed: int = 0, shuffle: bool = True,
                    sample_weight: np.ndarray | None = None, first_epoch: int = 0, pad: bool = False):
    """A keras PyDataset of this process's rows of each global batch; see ShardedBatches."""

    class ShardedBatches(keras.utils.PyDataset):
        """Global batches of `global_batch` faces in an order drawn from `seed` and the epoch (the same in
        every process); this process yields rows [i * b, (i + 1) * b) of each, b = global_batch / N.
        Training drops the last incomplete batch; with `pad`, it is filled with weight-0 faces instead
        (validation: every face counts once)."""

        def __init__(self):
            super().__init__()
            self.epoch = first_epoch

        def __len__(self):
            return math.ceil(len(x) / global_batch) if pad else len(x) // global_batch

        def __getitem__(self, index):
            order = np.random.default_rng([seed, self.epoch]).permutation(len(x)) if shuffle else np.arange(len(x))
            rows = order[index * global_batch : (index + 1) * global_batch]
            weights = np.ones(len(rows), np.float32) if sample_weight is None else sample_weight[rows].astype(np.float32)
            if len(rows) < global_batch:  # only with pad
                missing = global_batch - len(rows)
                rows = np.concatenate([rows, np.zeros(missing, rows.dtype)])
                weights = np.concatenate([weights, np.zeros(missing, np.float32)])
            local = slice(topology.process_id * (global_batch // topology.num_processes),
                          (topology.process_id + 1) * (global_batch // topology.num_processes))
            return x[rows[local]], y[rows[local]], weights[local]

        def on_epoch_end(self):
            self.epoch += 1

    if global_batch % topology.num_processes:
        raise FerkitError(f"the batch size ({global_batch}) must be a multiple of the number of processes ({topology.num_processes})")
    return ShardedBatches()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_local(num_processes: int, args: list[str]) -> int:
    """Run `ferkit train ARGS` as `num_processes` processes of one job on this machine; process 0's
    output is shown, the others' only when they fail. Returns the first non-zero exit code, or 0."""
    coordinator = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    workers, logs = [], [None] + [tempfile.TemporaryFile("w+") for _ in range(num_processes - 1)]
    for process_id in range(num_processes):
        command = [sys.executable, "-m", "ferkit.cli", "train", *args, "--coordinator", coordinator,
                   "--num-processes", str(num_processes), "--process-id", str(process_id)]
        quiet = process_id > 0
        workers.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL if quiet else None,
                                        stderr=logs[process_id]))
    try:
        while any(worker.poll() is None for worker in workers):
            if any(worker.poll() for worker in workers):  # one failed: the others would wait for it forever
                break
            time.sleep(0.2)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.terminate()
                worker.wait()
    for worker, log in zip(workers[1:], logs[1:]):
        if worker.returncode and worker.returncode > 0:
            log.seek(0)
            sys.stderr.write(log.read())
        log.close()
    return next((worker.returncode for worker in workers if worker.returncode and worker.returncode > 0), 0)
