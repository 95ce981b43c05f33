"""Data-parallel training over several processes: one per machine or GPU, on Keras' own distribution API.

Each process runs the same `ferkit train` with a `Topology`: where process 0 listens, how many processes
there are, and which one this is. They join through `jax.distributed` (Keras on the JAX backend; on CPUs
the processes talk over Gloo), and `keras.distribution.DataParallel` keeps one copy of the weights per
device and averages the gradients of every step over all of them.

Every process reads the whole dataset and takes its own part of each global batch
(ferkit.data.batches.face_batches), in an order all processes draw from the same seed, so N processes
train exactly as one process would on the same global batches: the same weights at the end, to float rounding. Process 0 alone writes the run
folder; the others write theirs into a temporary folder.

`launch_local(n, args)` starts n such processes on this machine, for testing and for multi-GPU boxes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

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
    distribution.auto_shard_dataset = False  # face_batches gives each process its part already
    keras.distribution.set_distribution(distribution)
    return keras


def device_names() -> list[str]:
    import jax

    return [str(device) for device in jax.devices()]


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
