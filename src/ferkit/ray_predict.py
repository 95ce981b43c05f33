"""`ferkit predict --engine ray`: the same detect → crop → classify as `ferkit predict`, spread over a
Ray cluster with Ray Data, for collections larger than one machine.

The inputs (images of folders, globs, list files and object-storage prefixes; videos) are cut into
tasks: `shard_size` images each, or one video. A pool of Ray actors, each holding one model and one
detector, runs the tasks through `ferkit.predict.analyze_images` (videos through
`ferkit.video.analyze_video`) and writes one output part per task:

    OUT/manifest.json               what the run was asked (inputs, model, settings), to resume it
    OUT/faces/part-00000.parquet    a row per face: the columns of `ferkit predict`'s faces.csv
    OUT/results/part-00000.jsonl    a line per image: the records of `ferkit predict`'s results.jsonl
    OUT/results/video-00000.jsonl   a video's summary line; its timeline and plot are in OUT/videos/
    OUT/summary.json                images, faces, failed (and videos), over all parts

A part is written under a temporary name and renamed when complete, the results part last, so a task
is done exactly when its results part exists: a run killed part-way resumes (`resume=True`) by
running only the tasks without one, and the summary, counted from the parts, counts nothing twice.
OUT may be a local (or shared) folder or an object-storage URI; inputs may be local paths or URIs
(s3://, gs://, hdfs://, file://: whatever pyarrow's filesystems read, as Ray's own readers do).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ferkit.errors import FerkitError, first_line
from ferkit.extras import require
from ferkit.images import IMAGE_SUFFIXES
from ferkit.predict import UNCERTAIN_BELOW, check_uncertain_below
from ferkit.results import ImageResult, face_columns, face_rows
from ferkit.sources import VIDEO_SUFFIXES, list_images, source_kind, videos_of

SHARD_IMAGES = 256
LIST_SUFFIXES = (".txt", ".lst")


@dataclass
class RayPredictConfig:
    sources: list[str]  # images, folders, globs, list files (.txt: a path or URI per line), URIs, videos
    out: str  # a folder or an object-storage URI
    model: str | None = None  # a run folder, .keras or .onnx file, a shipped model's name; None: the default
    detector: str = "auto"
    address: str | None = None  # a running cluster ("auto", "HOST:PORT"); None starts one on this machine
    workers: int | None = None  # actors, one model each; None: one per CPU of the cluster
    shard_size: int = SHARD_IMAGES  # images per task (and per output part)
    uncertain_below: float = UNCERTAIN_BELOW
    tta: str | None = None
    every: int | None = None  # videos: every Nth frame (default: about `target_fps` per second)
    target_fps: float | None = None
    smooth: int = 1
    resume: bool = False

    def settings(self) -> dict:
        """What a resumed run must share with the run it continues, besides its inputs (the tasks'
        fingerprint): the same files however the sources and OUT are spelled, or wherever it is run from."""
        settings = {key: value for key, value in asdict(self).items()
                    if key not in ("address", "workers", "resume", "sources", "out")}
        return {**settings, "out": root_uri(self.out)}


@dataclass
class Task:
    name: str  # "part-00000" or "video-00000": the output parts' name
    kind: str  # "images" or "video"
    items: list[tuple[str, str]] = field(default_factory=list)  # (label in the outputs, where to read it)


def predict_with_ray(config: RayPredictConfig, *, progress: bool = True) -> dict:
    """Run `config` on Ray; the summary (images, faces, failed, videos, video_faces, skipped_tasks,
    errors: the inputs that could not even be listed; failures: why each failed image or video did, not
    in OUT/summary.json, since the results parts hold them). Raises FerkitError for what stops the run."""
    from ferkit.video import check_video_options

    ray = require("ray", "prediction on a Ray cluster", extra="ray")
    check_uncertain_below(config.uncertain_below)
    check_video_options(config.every, config.target_fps, config.smooth)  # before the cluster, not per video
    if config.shard_size < 1:
        raise FerkitError(f"--shard-size must be at least 1, not {config.shard_size}")
    images, videos, errors = list_inputs(config.sources)
    if not images and not videos:
        raise FerkitError("; ".join(errors) or "nothing to analyse")
    tasks = plan_tasks(images, videos, config.shard_size)
    if config.model and Path(config.model).exists():  # the workers' current folder may be another
        config = replace(config, model=os.path.abspath(config.model))
    model_sha256 = _check_model_and_detector(config)  # here, once, before anything is written: not in every worker
    _check_address(config.address)
    fs, root = output_filesystem(config.out)
    created = _start_or_resume(fs, root, config, tasks, model_sha256)
    todo = [t for t in tasks if not _exists(fs, f"{root}/results/{t.name}.jsonl")]
    try:
        if todo:
            with _ray_session(ray, config):
                _run_tasks(ray, todo, config, root_uri(config.out), progress)
    except BaseException:
        if created and not _exists(fs, f"{root}/results"):  # nothing done: the same command may start it again
            fs.delete_file(f"{root}/manifest.json")
        raise
    counts = count_outputs(fs, root)
    failures = counts.pop("failures")
    summary = {**counts, "skipped_tasks": len(tasks) - len(todo), "errors": errors}
    _write_bytes(fs, f"{root}/summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return {**summary, "failures": failures}


# --- inputs ----------------------------------------------------------------------------------------


def list_inputs(sources: list[str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[str]]:
    """(images, videos, errors): images and videos as (label, location) pairs. A local file's label is
    the path as `ferkit predict` prints it, its location the absolute path (Ray workers run elsewhere);
    a URI is both. An input that cannot be listed is an error line, and the others go on."""
    images, videos, errors = [], [], []
    seen = set()  # a file given twice (or listed by two sources, or reached through a link) is analysed once
    for source in sources:
        try:
            for label, location in _expand(source):
                where = location if "://" in location else os.path.realpath(location)
                if where not in seen:
                    seen.add(where)
                    (videos if label.lower().endswith(VIDEO_SUFFIXES) else images).append((label, location))
        except FerkitError as err:
            errors.append(str(err))
    return images, videos, errors


def _expand(source: str) -> Iterator[tuple[str, str]]:
    if "://" in source:
        yield from ((uri, uri) for uri in list_uri(source))
        return
    if source.lower().endswith(LIST_SUFFIXES) and Path(source).is_file():
        # each line is a file, taken as given (no look-up per line: lists may hold millions);
        # one that cannot be read is reported by the worker, like any bad image
        for line in Path(source).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                yield line, line if "://" in line else os.path.abspath(line)
        return
    if source_kind(source) in ("folder", "glob"):  # its images, then a glob's videos, as `ferkit predict` takes them
        videos = videos_of(source)
        try:
            images = list_images(source)
        except FerkitError:
            if not videos:
                raise
            images = []
        paths = [*images, *videos]
    else:
        paths = [Path(source)]
    yield from ((str(path), os.path.abspath(path)) for path in paths)


def list_uri(uri: str) -> list[str]:
    """An object (file) URI as is, or the images and videos under a prefix (folder) URI, sorted."""
    pafs = require("pyarrow.fs", "reading object storage", extra="ray")
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        info = fs.get_file_info(path)
    except Exception as err:  # pyarrow raises OSError, ValueError or its own types by scheme
        raise FerkitError(f"{uri}: cannot be read ({first_line(err)})") from None
    if info.type == pafs.FileType.NotFound:
        raise FerkitError(f"no such file or folder: {uri}")
    if info.type == pafs.FileType.File:
        return [uri]
    scheme = uri.split("://", 1)[0]
    found = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                   if f.type == pafs.FileType.File and f.path.lower().endswith(IMAGE_SUFFIXES + VIDEO_SUFFIXES))
    if not found:
        raise FerkitError(f"no image or video files under {uri}")
    return [f"{scheme}://{p}" for p in found]


def plan_tasks(images: list[tuple[str, str]], videos: list[tuple[str, str]], shard_size: int) -> list[Task]:
    """Images in order, `shard_size` a task; then a task per video. The same inputs give the same tasks."""
    starts = range(0, len(images), shard_size)
    digits = max(5, len(str(len(starts) - 1)), len(str(len(videos) - 1)))  # the parts' names sort in input order
    tasks = [Task(f"part-{n:0{digits}d}", "images", images[start:start + shard_size]) for n, start in enumerate(starts)]
    return tasks + [Task(f"video-{n:0{digits}d}", "video", [item]) for n, item in enumerate(videos)]


# --- the run folder --------------------------------------------------------------------------------


def output_filesystem(out: str):
    """(pyarrow filesystem, root path in it) for a folder or an object-storage URI."""
    pafs = require("pyarrow.fs", "writing the outputs", extra="ray")
    try:
        fs, root = pafs.FileSystem.from_uri(root_uri(out))
    except Exception as err:
        raise FerkitError(f"{out}: cannot be written ({first_line(err)})") from None
    if not root.strip("/"):
        if "://" in out and not out.startswith("file://"):
            raise FerkitError(f"--out {out}: name a bucket and a folder in it, e.g. s3://BUCKET/ferkit/run-1")
        raise FerkitError(f"--out {out} is the file system's root: give a folder for the results")
    return fs, root.rstrip("/")


def root_uri(out: str) -> str:
    return out if "://" in out else Path(out).resolve().as_uri()


def _check_model_and_detector(config: RayPredictConfig) -> str:
    """The model's SHA-256, once it and the detector are known to load."""
    from ferkit.faces import get_detector
    from ferkit.runtime import load_classifier

    sha256 = load_classifier(config.model, prefer_export=True).sha256
    get_detector(config.detector)
    return sha256


def _check_address(address: str | None, timeout_s: float = 10.0) -> None:
    """A one-line FerkitError when nothing listens at a cluster's HOST:PORT (ray.init would retry for minutes)."""
    import socket

    if not address or address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise FerkitError(f"--address is HOST:PORT of the Ray cluster's head (or ray://HOST:PORT, or auto), not {address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as connection:
            speaks_grpc = _answers_http2(connection)
    except OSError as err:
        raise FerkitError(f"nothing answers at --address {address} ({err.strerror or first_line(err)}): is the Ray "
                          "cluster's head there (`ray start --head`)?") from None
    if not speaks_grpc:  # ray.init would wait on it for good
        raise FerkitError(f"what answers at --address {address} is not a Ray cluster's head (it does not speak gRPC): "
                          "give the head's GCS port (6379 by default), or ray://HOST:PORT for its Ray Client server")


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # and an empty SETTINGS frame


def _answers_http2(connection) -> bool:
    """Whether the server at the other end of `connection` answers HTTP/2's opening as gRPC servers (a
    Ray head's GCS and Ray Client server) do: with a SETTINGS frame (type 4) first."""
    connection.sendall(HTTP2_PREFACE)
    head = b""
    try:
        while len(head) < 9:
            chunk = connection.recv(9 - len(head))
            if not chunk:
                break
            head += chunk
    except TimeoutError:
        pass
    return len(head) == 9 and head[3] == 4


def _start_or_resume(fs, root: str, config: RayPredictConfig, tasks: list[Task], model_sha256: str = "") -> bool:
    """Record the run in OUT/manifest.json, or check that the run there is this one when resuming (the same
    settings, inputs and model file); whether it was recorded now. An earlier run is never written over:
    without `resume` it is an error; nor is a folder of other files."""
    import pyarrow.fs as pafs

    manifest = {"engine": "ray", "settings": config.settings(), "tasks": len(tasks), "inputs": _fingerprint(tasks),
                "model_sha256": model_sha256}
    path = f"{root}/manifest.json"
    try:
        kind = fs.get_file_info(root).type
        if kind == pafs.FileType.File:
            raise FerkitError(f"--out {config.out} is a file, not a folder")
        if kind == pafs.FileType.Directory and not _exists(fs, path) and fs.get_file_info(pafs.FileSelector(root)):
            raise FerkitError(f"--out {config.out} holds files and no ferkit run; choose a new or empty folder")
    except OSError as err:
        raise FerkitError(f"--out {config.out}: cannot be read ({first_line(err)})") from None
    if _exists(fs, path):
        with fs.open_input_stream(path) as stream:
            earlier = json.loads(stream.read())
        if not config.resume:
            raise FerkitError(f"{config.out} holds an earlier run: pass --resume to continue it, or choose another --out")
        model = earlier.get("settings", {}).get("model")
        if model and "://" not in model and not os.path.isabs(model) and Path(model).exists():
            earlier["settings"]["model"] = os.path.abspath(model)  # a run recorded before models were made absolute
        if "model_sha256" not in earlier:  # a run recorded before the model's digest was
            manifest.pop("model_sha256")
        if earlier != manifest:
            if {**earlier, "model_sha256": model_sha256} == {**manifest, "model_sha256": model_sha256}:
                raise FerkitError(f"the model {config.model} has changed since {config.out} began (another file at that "
                                  "path): its results would mix two models' answers; resume with the model it began with")
            raise FerkitError(f"{config.out} holds a run of other inputs or settings; it cannot be resumed with these")
        return False
    try:
        fs.create_dir(root, recursive=True)
        _write_bytes(fs, path, (json.dumps(manifest, indent=2) + "\n").encode())
    except OSError as err:
        raise FerkitError(f"--out {config.out}: cannot be written ({first_line(err)})") from None
    return True


def _fingerprint(tasks: list[Task]) -> str:
    """The tasks and where their inputs are read (absolute paths or URIs), not how they were spelled."""
    digest = hashlib.sha256()
    for task in tasks:
        digest.update(json.dumps([task.name, [location for _, location in task.items]]).encode())
    return digest.hexdigest()


def _exists(fs, path: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _write_bytes(fs, path: str, data: bytes) -> None:
    """Write under a temporary name, then rename: a reader sees the whole file or none."""
    partial = f"{path}.partial"
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(partial) as stream:
        stream.write(data)
    fs.move(partial, path)


def count_outputs(fs, root: str) -> dict:
    """images, faces, failed, videos, video_faces: counted from the results parts, each task once; and
    failures, a line per failed image or video that names it."""
    import pyarrow.fs as pafs

    counts = dict.fromkeys(("images", "faces", "failed", "videos", "video_faces"), 0)
    failures = []
    selector = pafs.FileSelector(f"{root}/results", allow_not_found=True)
    for info in sorted(fs.get_file_info(selector), key=lambda info: info.path):  # in the inputs' order
        if not info.path.endswith(".jsonl"):
            continue
        with fs.open_input_stream(info.path) as stream:
            records = [json.loads(line) for line in stream.read().decode().splitlines() if line]
        video = info.base_name.startswith("video-")
        for record in records:
            if record.get("error"):
                counts["failed"] += 1
                failures.append(record["error"] if record["source"] in record["error"] else f"{record['source']}: {record['error']}")
            if video:  # a video's summary line: its faces are a count (none when it failed)
                counts["videos"] += 1
                counts["video_faces"] += record.get("faces", 0)
            else:
                counts["images"] += 1
                counts["faces"] += len(record["faces"])
    return {**counts, "failures": failures}


# --- the cluster -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _ray_session(ray, config: RayPredictConfig) -> Iterator[None]:
    """Ray, connected for the block: the caller's connection if there is one, else a new one (to
    `config.address`, or a new instance here), closed afterwards with the caller's signal handlers
    restored (ray.init replaces SIGTERM's)."""
    import logging
    import signal

    if ray.is_initialized():
        yield
        return
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    if config.address:
        try:
            ray.init(address=config.address, logging_level=logging.WARNING)
        except ConnectionError as err:  # --address auto, and no cluster on this machine
            hint = "" if config.address == "auto" else (" (give the head's GCS port, 6379 by default; where the cluster "
                                                       "uses token authentication, this machine needs its token: RAY_AUTH_TOKEN)")
            raise FerkitError(f"cannot join the Ray cluster at --address {config.address}: {first_line(err)}{hint}") from None
    else:
        # "local": a new instance even where this machine has joined a cluster (--address joins one)
        ray.init(address="local", num_cpus=config.workers, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _run_tasks(ray, tasks: list[Task], config: RayPredictConfig, out_uri: str, progress: bool) -> None:
    from ferkit.progress import progress_bar

    workers = config.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    # ferkit's bar counts the images: Ray Data's own progress, and its notes on how it runs, would only
    # interleave their lines with it (its warnings still show)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled"
    rows = [{"task": json.dumps(asdict(task))} for task in tasks]
    # One task at a time per actor: with Ray's default of several, the first actor up takes them all.
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        TaskWorker, fn_constructor_kwargs={"config": config, "out_uri": out_uri}, batch_size=1, num_cpus=1,
        compute=ray.data.ActorPoolStrategy(size=min(workers, len(rows)), max_tasks_in_flight_per_actor=1),
    )
    failed = []
    with progress_bar(sum(len(t.items) for t in tasks), "analysing", enabled=progress) as advance:
        try:
            for row in dataset.iter_rows():
                for _ in range(row["items"]):
                    advance()
                if row["error"]:
                    failed.append(f"{row['name']}: {row['error']}")
        except ray.exceptions.RayError as err:  # a worker that could not start (its model missing there, say)
            raise FerkitError(f"a Ray worker failed: {_worker_error_line(err)}") from None
    if failed:
        raise FerkitError(f"{len(failed)} task(s) failed and wrote nothing (--resume retries them); first: {failed[0]}")


def _worker_error_line(err: Exception) -> str:
    """The line that says why, out of a Ray error that carries a worker's whole traceback."""
    import re

    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    said = [m.group(1) for m in map(re.compile(r"^(?:ferkit\.errors\.)?\w*Error: (.+)$").match, lines) if m]
    return said[-1] if said else (lines[0] if lines else type(err).__name__)


class TaskWorker:
    """A Ray actor: one model and one detector, loaded once, for every task it is given."""

    def __init__(self, config: RayPredictConfig, out_uri: str):
        from ferkit.faces import get_detector
        from ferkit.runtime import load_classifier

        os.environ.setdefault("FERKIT_CLASSIFIER_THREADS", "1")  # one CPU per actor: threads would only fight
        self.config = config
        self.classifier = load_classifier(config.model, prefer_export=True).with_tta(config.tta)
        self.find = get_detector(config.detector)
        self.fs, self.root = output_filesystem(out_uri)
        # where the outputs are, as a reader finds them: a path here, the URI in object storage
        self.where = self.root if out_uri.startswith("file://") else out_uri.rstrip("/")

    def __call__(self, batch: dict) -> dict:
        names, counts, errors = [], [], []
        for text in batch["task"]:
            task = Task(**json.loads(text))
            names.append(task.name)
            counts.append(len(task.items))
            try:
                self.run_video(task) if task.kind == "video" else self.run_images(task)
                errors.append("")
            except Exception as err:  # an unexpected failure of one task: reported, the others go on
                errors.append(f"{type(err).__name__}: {first_line(err)}")
        return {"name": names, "items": counts, "error": errors}

    def run_images(self, task: Task) -> None:
        from ferkit.predict import analyze_images

        with contextlib.ExitStack() as stack:
            paths = [stack.enter_context(_readable(location)) for _, location in task.items]
            pairs = [(label, path) for (label, _), path in zip(task.items, paths)]
            results = list(analyze_images(pairs, model=self.classifier, detector=self.find,
                                          uncertain_below=self.config.uncertain_below))
        for result, path in zip(results, paths):
            if result.error:  # name the file as the user gave it, not where this worker read it
                result.error = result.error.replace(path, result.source)
        self._write_parquet(f"{self.root}/faces/{task.name}.parquet", results)
        lines = "".join(json.dumps(result.to_dict()) + "\n" for result in results)
        _write_bytes(self.fs, f"{self.root}/results/{task.name}.jsonl", lines.encode())

    def _write_parquet(self, path: str, results: list[ImageResult]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        classes = self.classifier.classes
        types = {"source": pa.string(), "face": pa.int32(), "x": pa.int32(), "y": pa.int32(), "width": pa.int32(),
                 "height": pa.int32(), "detector_score": pa.float64(), "emotion": pa.string(), "score": pa.float64(),
                 **{name: pa.float64() for name in classes}, "uncertain": pa.bool_()}
        schema = pa.schema([(column, types[column]) for column in face_columns(classes)])
        rows = [row for result in results for row in face_rows(result, classes)]
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
        _write_bytes(self.fs, path, buffer.getvalue())

    def run_video(self, task: Task) -> None:
        from ferkit.video import analyze_video

        [(label, location)] = task.items
        stem = f"{task.name}-{Path(label).stem}"
        with _readable(location) as path, tempfile.TemporaryDirectory(prefix="ferkit-video-") as scratch:
            local = {"timeline": Path(scratch) / f"{stem}.timeline.csv", "plot": Path(scratch) / f"{stem}.emotions.png"}
            try:
                timeline = analyze_video(path, model=self.classifier, detector=self.find, every=self.config.every,
                                         target_fps=self.config.target_fps, smooth=self.config.smooth,
                                         uncertain_below=self.config.uncertain_below, timeline_csv=local["timeline"])
            except FerkitError as err:
                record = {"source": label, "error": str(err).replace(path, label)}
            else:
                timeline.plot(local["plot"])
                files = []
                for file in local.values():
                    _write_bytes(self.fs, f"{self.root}/videos/{file.name}", file.read_bytes())
                    files.append(f"{self.where}/videos/{file.name}")
                record = timeline.summary(source=label, files=files)
        _write_bytes(self.fs, f"{self.root}/results/{task.name}.jsonl", (json.dumps(record) + "\n").encode())


@contextlib.contextmanager
def _readable(location: str) -> Iterator[str]:
    """A local path to read `location` from: itself, or a temporary copy of a URI's object. An object
    that cannot be fetched gives a path that does not exist, so the image is reported as missing."""
    if "://" not in location:
        yield location
        return
    import pyarrow.fs as pafs

    suffix = Path(location.split("://", 1)[1]).suffix
    with tempfile.TemporaryDirectory(prefix="ferkit-") as scratch:
        local = os.path.join(scratch, f"object{suffix}")
        try:
            fs, path = pafs.FileSystem.from_uri(location)
            with fs.open_input_stream(path) as stream, open(local, "wb") as handle:
                shutil.copyfileobj(stream, handle)  # in chunks: videos can be large
        except (OSError, ValueError):
            pass
        yield local

