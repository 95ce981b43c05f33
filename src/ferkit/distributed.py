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
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ferkit.errors import FerkitError
from ferkit.extras import require

log = logging.getLogger("ferkit")


@dataclass
class Topology:
    coordinator: str | None = None  # HOST:PORT where process 0 listens
    num_processes: int = 1
    process_id: int = 0

    def __post_init__(self):
        if self.coordinator is not None:
            host, _, port = self.coordinator.rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise FerkitError(f"--coordinator is HOST:PORT, where process 0 listens (e.g. 10.0.0.1:1234), not {self.coordinator!r}")
        if self.num_processes < 1:
            raise FerkitError(f"--num-processes is the job's count of processes, at least 1, not {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
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
    if not topology.is_chief:
        _wait_for_coordinator(topology.coordinator)
    _join(jax, topology)
    from ferkit._keras import import_keras

    keras = import_keras()
    distribution = keras.distribution.DataParallel(devices=jax.devices())
    distribution.auto_shard_dataset = False  # face_batches gives each process its part already
    keras.distribution.set_distribution(distribution)
    return keras


COORDINATOR_WAIT_S = float(os.environ.get("FERKIT_COORDINATOR_WAIT_S", 300))


def _join(jax, topology: Topology, wait_s: float | None = None) -> None:
    """jax.distributed.initialize, which waits for every process of the job, in a thread of its own:
    here the wait says what it waits for, Ctrl-C stops it, and a process missing after `wait_s`
    (default FERKIT_COORDINATOR_WAIT_S) is a one-line FerkitError, before JAX's own deadline, which
    aborts the process with a stack trace."""
    import threading

    global _JOIN_LEFT_WAITING
    wait_s = COORDINATOR_WAIT_S if wait_s is None else wait_s
    failed: list[BaseException] = []

    def initialize():
        try:
            jax.distributed.initialize(topology.coordinator, num_processes=topology.num_processes,
                                       process_id=topology.process_id, initialization_timeout=int(wait_s) + 60)
        except BaseException as err:  # noqa: BLE001 - raised again in the waiting thread
            failed.append(err)

    joining = threading.Thread(target=initialize, name="jax-distributed-initialize", daemon=True)
    joining.start()
    deadline, said = time.monotonic() + wait_s, False
    try:
        while joining.is_alive():
            joining.join(timeout=1)
            if joining.is_alive() and not said and topology.is_chief:
                log.info("listening at %s for the job's %d other process(es)", topology.coordinator, topology.num_processes - 1)
                said = True
            if joining.is_alive() and time.monotonic() >= deadline:
                others = "the other processes" if topology.is_chief else "process 0 and the others"
                raise FerkitError(f"{others} of the job did not join at --coordinator {topology.coordinator} within "
                                  f"{wait_s:g} s: start every --process-id of 0..{topology.num_processes - 1}")
    finally:
        _JOIN_LEFT_WAITING = joining.is_alive()
    if failed:
        raise failed[0]


_JOIN_LEFT_WAITING = False  # a join given up on (timed out, Ctrl-C): JAX's service still waits in its thread


def exit_without_jax_teardown(code: int) -> None:
    """For a command line whose join was given up on, once its error is said: end the process without
    tearing down the JAX coordination service still waiting, whose teardown logs screens of warnings and
    stack traces after the one line. Nothing where the join ended."""
    if not _JOIN_LEFT_WAITING:
        return
    import atexit

    def leave():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    atexit.register(leave)


def _wait_for_coordinator(address: str, wait_s: float | None = None) -> None:
    """Until process 0 listens at `address`, or a one-line FerkitError after `wait_s` (default
    FERKIT_COORDINATOR_WAIT_S, 300): JAX's own wait ends in an abort whose message blames another process,
    and no Ctrl-C stops it."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + (COORDINATOR_WAIT_S if wait_s is None else wait_s)
    said = False
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as err:
            if isinstance(err, socket.gaierror):
                raise FerkitError(f"--coordinator {address}: {host} is no host name or address this machine knows") from None
            if time.monotonic() >= deadline:
                raise FerkitError(f"nothing listens at --coordinator {address}: start process 0 there (--process-id 0), "
                                  "or give the address where it runs") from None
            if not said:
                log.info("waiting for process 0 to listen at %s", address)
                said = True
            time.sleep(1)


# What JAX raises in a process whose peer stopped: Gloo's collectives fail, or the coordination service reports it.
_PEER_LOST = ("Gloo", "DEADLINE_EXCEEDED", "Connection reset by peer", "coordination service", "Broken pipe")


def lost_a_peer(err: BaseException) -> bool:
    """Whether `err`, raised while a data-parallel job trained, says another process of the job is gone."""
    text = str(err)
    return type(err).__name__ in ("JaxRuntimeError", "XlaRuntimeError", "ValueError", "RuntimeError") and any(
        marker in text for marker in _PEER_LOST)


# Settings that name files, which may lie elsewhere on each machine; every other one must be the same.
_WHERE_FILES_ARE = ("data", "val", "out", "init", "weights", "teacher")


def check_same_settings(settings: dict) -> None:
    """Refuse, in every process at once, a job whose processes were given other settings (another
    --batch-size, say) or data (faces per class, in `settings` too): they would wait on each other for ever
    in their first step."""
    import hashlib

    import numpy as np
    from jax.experimental import multihost_utils

    kept = {k: v for k, v in settings.items() if k not in _WHERE_FILES_ARE}
    digest = np.frombuffer(hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).digest(), np.uint8)
    digests = np.asarray(multihost_utils.process_allgather(digest)).reshape(-1, digest.size)
    others = [p for p, theirs in enumerate(digests) if not np.array_equal(theirs, digests[0])]
    if others:
        which = f"processes {', '.join(map(str, others))} were" if len(others) > 1 else f"process {others[0]} was"
        raise FerkitError(f"{which} given other settings or data (faces per class) than process 0: give every process "
                          "of the job the same options, and the same data")


def device_names() -> list[str]:
    import jax

    return [str(device) for device in jax.devices()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


LOCAL_PROCESSES = "FERKIT_LOCAL_PROCESSES"  # set for the processes launch_local starts: how a stopped run resumes


def launch_local(num_processes: int, args: list[str]) -> int:
    """Run `ferkit train ARGS` as `num_processes` processes of one job on this machine; process 0's
    output is shown, the others' only when they fail. Returns the first failed process's exit code, or 0."""
    coordinator = f"127.0.0.1:{free_port()}"
    commands = [[sys.executable, "-m", "ferkit.cli", "train", *args, "--coordinator", coordinator,
                 "--num-processes", str(num_processes), "--process-id", str(process_id)]
                for process_id in range(num_processes)]
    env = {**os.environ, "KERAS_BACKEND": "jax", LOCAL_PROCESSES: str(num_processes)}
    gpus = visible_gpus()
    envs = [{**env, **gpus_of(p, num_processes, gpus)} for p in range(num_processes)]
    return run_together(commands, env=envs)


def visible_gpus() -> list[str]:
    """The NVIDIA GPUs this machine shows, as CUDA_VISIBLE_DEVICES names them (that variable where it is
    set, else one per line of `nvidia-smi -L`); none without NVIDIA's driver."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [gpu.strip() for gpu in given.split(",") if gpu.strip()]
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(line for line in listing.splitlines() if line.startswith("GPU "))]


def gpus_of(process_id: int, num_processes: int, gpus: list[str]) -> dict[str, str]:
    """The environment that gives process `process_id` of a job on one machine its own share of `gpus`:
    without it every process would see, and claim memory on, all of them. Nothing when the GPUs do not
    split evenly (then JAX's own placement decides)."""
    if not gpus or len(gpus) % num_processes:
        return {}
    share = len(gpus) // num_processes
    return {"CUDA_VISIBLE_DEVICES": ",".join(gpus[process_id * share : (process_id + 1) * share])}


def run_together(commands: list[list[str]], env: dict | list[dict] | None = None, grace_s: float = 10.0) -> int:
    """Run the processes of one job; the first's output is shown, and that of the first other one to fail. When one
    fails (an exit code, or a signal), the others are stopped: SIGTERM, which lets training stop at the end of
    a batch, then SIGKILL after `grace_s`, since a process waiting for a dead peer never gets there.
    `env`: the processes' environment, or one per command. Returns the first failure's exit code (128 + the
    signal's number for a signal), or 0."""
    workers, logs = [], [None] + [tempfile.TemporaryFile("w+") for _ in commands[1:]]
    envs = env if isinstance(env, list) else [env] * len(commands)  # one for all, or one per command
    for command, output, own in zip(commands, logs, envs):
        workers.append(subprocess.Popen(command, env=own, stdout=subprocess.DEVNULL if output else None, stderr=output))
    failed = None
    try:
        while failed is None and any(worker.poll() is None for worker in workers):
            failed = next((k for k, worker in enumerate(workers) if worker.poll()), None)
            time.sleep(0.2)
    finally:
        _stop(workers, grace_s)
    failed = failed if failed is not None else next((k for k, worker in enumerate(workers) if worker.returncode), None)
    if failed:  # process 0's output was shown; of the others, that of the one that failed first (the rest would repeat it)
        logs[failed].seek(0)
        sys.stderr.write(logs[failed].read())
    for output in logs[1:]:
        output.close()
    if failed is None:
        return 0
    code = workers[failed].returncode
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        sys.stderr.write(f"error: process {failed} of the training job was stopped by {name}; "
                         f"the other {len(workers) - 1} were stopped too\n")
        return 128 - code
    return code


def _stop(workers: list[subprocess.Popen], grace_s: float) -> None:
    running = [worker for worker in workers if worker.poll() is None]
    for worker in running:
        worker.terminate()
    deadline = time.monotonic() + grace_s
    for worker in running:
        try:
            worker.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
