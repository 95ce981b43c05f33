"""`ferkit predict --engine ray` on a local two-CPU Ray cluster: the same rows as `ferkit predict`, bad
files reported, killed runs resumed without counting twice, URIs and list files, videos."""

from __future__ import annotations

import csv
import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ferkit.cli import cli
from ferkit.errors import FerkitError
from ferkit.ray_predict import RayPredictConfig, _check_address, predict_with_ray

from conftest import REAL_PHOTOS, one_crop_per_face_model

ray = pytest.importorskip("ray", reason="needs ferkit[ray]")
pq = pytest.importorskip("pyarrow.parquet", reason="needs ferkit[ray]")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "people.jpg"


@pytest.fixture(scope="module")
def cluster():
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()
    for sig, handler in handlers.items():  # ray.init replaced SIGTERM's; the other tests need theirs
        signal.signal(sig, handler)


@pytest.fixture
def photos(tmp_path) -> Path:
    """Three real photos (one in a subfolder) and a file that is not an image."""
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    shutil.copy(EXAMPLE, folder / "people.jpg")
    shutil.copy(REAL_PHOTOS / "partial-face.jpg", folder / "partial-face.jpg")
    shutil.copy(REAL_PHOTOS / "partial-face2.jpg", folder / "more" / "partial-face2.jpg")
    (folder / "broken.jpg").write_text("not a photo")
    return folder


def test_a_ray_instance_it_starts_is_closed_and_leaves_the_signal_handlers_alone(photos, tmp_path):
    assert not ray.is_initialized()  # the first test: the module's cluster is not up yet
    before = signal.getsignal(signal.SIGTERM)
    summary = predict_with_ray(RayPredictConfig(sources=[str(photos / "people.jpg")], out=str(tmp_path / "ray"),
                                                workers=1), progress=False)
    assert summary["images"] == 1 and summary["faces"] == 3
    assert not ray.is_initialized() and signal.getsignal(signal.SIGTERM) is before


def _local_results(folder: Path, out: Path) -> dict[str, dict]:
    """`ferkit predict FOLDER` (the local engine): its results.jsonl records by source."""
    result = CliRunner().invoke(cli, ["predict", str(folder), "--out", str(out)])
    assert result.exit_code == 1, result.output  # the broken file
    return {r["source"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def _ray_results(out: Path) -> dict[str, dict]:
    records = [json.loads(line) for part in sorted((out / "results").glob("*.jsonl"))
               for line in part.read_text().splitlines()]
    return {r["source"]: r for r in records}


def _without_timings(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "timings_ms"}


def test_ray_engine_writes_the_rows_of_ferkit_predict(cluster, photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    local = _local_results(Path("photos"), tmp_path / "local")
    run = CliRunner().invoke(cli, ["predict", "photos", "--engine", "ray", "--shard-size", "2",
                                   "--out", str(tmp_path / "ray")])
    assert run.exit_code == 1, run.output  # the broken file fails, the others go on
    assert "4 images" in run.output and "1 failed" in run.output
    [error] = [line for line in run.output.splitlines() if line.startswith("error: ")]
    assert str(Path("photos") / "broken.jpg") in error and "not an image" in error  # named, as the local engine does

    remote = _ray_results(tmp_path / "ray")
    assert sorted(remote) == sorted(local) and len(local) == 4
    for source, record in local.items():
        assert _without_timings(remote[source]) == _without_timings(record)
    assert "not an image" in remote[str(Path("photos") / "broken.jpg")]["error"]

    table = pq.read_table(tmp_path / "ray" / "faces").to_pylist()
    with open(tmp_path / "local" / "faces.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert list(table[0]) == header
    expected = {(r["source"], n): f for r in local.values() for n, f in enumerate(r["faces"], 1)}
    assert len(table) == len(expected) >= 3
    for row in table:
        face = expected[(row["source"], row["face"])]
        assert [row["x"], row["y"], row["width"], row["height"]] == face["box"]
        assert row["emotion"] == face["emotion"] and row["uncertain"] == face["uncertain"]
        assert np.allclose([row[c] for c in face["probabilities"]], list(face["probabilities"].values()), atol=1e-5)

    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert (summary["images"], summary["faces"], summary["failed"]) == (4, len(expected), 1)


def test_a_killed_run_resumes_its_missing_parts_only(cluster, photos, tmp_path):
    config = RayPredictConfig(sources=[str(photos)], out=str(tmp_path / "ray"), shard_size=2, workers=2)
    first = predict_with_ray(config, progress=False)
    results, faces = tmp_path / "ray" / "results", tmp_path / "ray" / "faces"
    kept = (results / "part-00000.jsonl").stat().st_mtime_ns
    # A kill between a task's two writes: its Parquet part is there, its results part is not.
    (results / "part-00001.jsonl").unlink()

    with pytest.raises(FerkitError, match="earlier run"):
        predict_with_ray(config, progress=False)  # never written over without --resume
    with pytest.raises(FerkitError, match="other inputs or settings"):
        predict_with_ray(RayPredictConfig(**{**vars(config), "shard_size": 3, "resume": True}), progress=False)

    # the same run, however its folders are spelled
    second = predict_with_ray(RayPredictConfig(sources=[f"{photos}/"], out=f"{tmp_path}/./ray/", shard_size=2, workers=2,
                                               resume=True), progress=False)
    assert second["skipped_tasks"] == 1
    assert {k: second[k] for k in ("images", "faces", "failed")} == {k: first[k] for k in ("images", "faces", "failed")}
    assert (results / "part-00000.jsonl").stat().st_mtime_ns == kept
    assert sorted(p.name for p in faces.iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert not list((tmp_path / "ray").rglob("*.partial"))


def test_a_run_resumes_with_its_model_however_spelled_also_as_recorded_before(cluster, photos, tmp_path, monkeypatch):
    from ferkit.runtime import resolve_model_path

    shutil.copy(resolve_model_path(None), tmp_path / "m.onnx")
    monkeypatch.chdir(tmp_path)
    predict_with_ray(RayPredictConfig(sources=[str(photos)], out="ray", model="./m.onnx", shard_size=2), progress=False)
    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert manifest["settings"]["model"] == str(tmp_path / "m.onnx")  # as the workers, elsewhere, find it
    manifest["settings"]["model"] = "./m.onnx"  # as runs recorded it before
    (tmp_path / "ray" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "ray" / "results" / "part-00001.jsonl").unlink()
    again = predict_with_ray(RayPredictConfig(sources=[str(photos)], out="ray", model="m.onnx", shard_size=2, resume=True),
                             progress=False)
    assert again["skipped_tasks"] == 1
    shutil.copy(one_crop_per_face_model(tmp_path), tmp_path / "m.onnx")  # another model file at the same path
    (tmp_path / "ray" / "results" / "part-00001.jsonl").unlink()
    with pytest.raises(FerkitError, match=f"the model {tmp_path / 'm.onnx'} has changed since ray began"):
        predict_with_ray(RayPredictConfig(sources=[str(photos)], out="ray", model="m.onnx", shard_size=2, resume=True),
                         progress=False)


def test_an_out_that_is_a_file_or_holds_other_files_is_refused_untouched(photos, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "mine" / "faces").mkdir(parents=True)
    (tmp_path / "mine" / "summary.json").write_text('{"my": "data"}')
    for out, error in ((tmp_path / "notes.txt", "is a file"), (tmp_path / "mine", "holds files and no ferkit run")):
        with pytest.raises(FerkitError, match=error):
            predict_with_ray(RayPredictConfig(sources=[str(photos)], out=str(out)), progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "mine" / "summary.json").read_text() == '{"my": "data"}' and not list((tmp_path / "mine" / "faces").iterdir())


def test_a_bad_model_or_cluster_address_is_one_line_and_the_command_may_be_run_again(photos, tmp_path):
    from ferkit.distributed import free_port

    out = tmp_path / "out"
    for settings, error in (({"model": "nosuch-model"}, "nosuch-model"), ({"detector": "bogus"}, "unknown detector 'bogus'"),
                            ({"address": f"127.0.0.1:{free_port()}"}, "nothing answers at --address 127.0.0.1:"),
                            ({"address": "nowhere"}, "--address is HOST:PORT")):
        with pytest.raises(FerkitError, match=error):
            predict_with_ray(RayPredictConfig(sources=[str(photos)], out=str(out), **settings), progress=False)
        assert not (out / "manifest.json").exists()  # nothing recorded: no --resume needed to try again


def test_an_address_where_something_else_than_a_ray_head_listens_is_one_line_not_a_wait(photos, tmp_path):
    """A web server, and a listener that never answers: ray.init waited on both for good."""
    import http.server
    import socket
    import threading
    import time

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        for port, timeout_s in ((web.server_address[1], 10.0), (silent.getsockname()[1], 1.0)):
            started = time.perf_counter()
            with pytest.raises(FerkitError, match=f"what answers at --address 127.0.0.1:{port} is not a Ray cluster's head"):
                _check_address(f"127.0.0.1:{port}", timeout_s=timeout_s)
            assert time.perf_counter() - started < timeout_s + 5
    finally:
        web.shutdown()
        silent.close()


def test_a_worker_that_cannot_start_is_one_line(cluster, photos, tmp_path):
    """As when the model is not at its path on a cluster's machine: here, checked by no one before."""
    from ferkit.ray_predict import _run_tasks, list_inputs, plan_tasks, root_uri

    config = RayPredictConfig(sources=[str(photos)], out=str(tmp_path / "out"), model=str(tmp_path / "gone.onnx"), workers=1)
    tasks = plan_tasks(*list_inputs(config.sources)[:2], shard_size=8)
    with pytest.raises(FerkitError) as raised:
        _run_tasks(ray, tasks, config, root_uri(config.out), progress=False)
    assert str(raised.value).startswith(f"a Ray worker failed: no such model or run folder: {tmp_path / 'gone.onnx'}")


def test_a_file_given_twice_is_analysed_once_and_parts_sort_in_input_order(cluster, photos, tmp_path):
    from ferkit.ray_predict import output_filesystem, plan_tasks

    summary = predict_with_ray(RayPredictConfig(sources=[str(photos), str(photos / "people.jpg")], out=str(tmp_path / "ray")),
                               progress=False)
    assert (summary["images"], summary["failed"]) == (4, 1)
    names = [task.name for task in plan_tasks([("x", "x")] * 100_001, [], shard_size=1)]
    assert names == sorted(names) and len(set(names)) == len(names)
    for root in ("file:///", "/"):
        with pytest.raises(FerkitError, match="is the file system's root"):
            output_filesystem(root)


def test_list_files_and_uris(cluster, photos, tmp_path):
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"# photos on shared storage\n{(photos / 'people.jpg').as_uri()}\n\n"
                       f"{(photos / 'missing.jpg').as_uri()}\n{photos / 'partial-face.jpg'}\n")
    summary = predict_with_ray(RayPredictConfig(sources=[str(listing)], out=(tmp_path / "ray").as_uri()),
                               progress=False)
    assert (summary["images"], summary["failed"]) == (3, 1)
    records = _ray_results(tmp_path / "ray")
    uri = (photos / "people.jpg").as_uri()
    assert "no such file" in records[(photos / "missing.jpg").as_uri()]["error"]
    local = _local_results(photos, tmp_path / "local")
    assert _without_timings(records[uri])["faces"] == local[str(photos / "people.jpg")]["faces"]


def test_the_command_writes_to_an_out_uri_as_given(cluster, photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = (tmp_path / "elsewhere" / "run").as_uri()  # file:///...: a path would collapse its slashes
    run = CliRunner().invoke(cli, ["predict", str(photos / "people.jpg"), "--engine", "ray", "--out", uri])
    assert run.exit_code == 0, run.output
    assert _ray_results(tmp_path / "elsewhere" / "run") and not (tmp_path / "file:").exists()
    local = CliRunner().invoke(cli, ["predict", str(photos / "people.jpg"), "--out", uri])
    assert local.exit_code == 2 and "an object-storage URI needs --engine ray" in local.output
    again = CliRunner().invoke(cli, ["predict", str(photos / "people.jpg"), "--engine", "ray", "--out", uri, "--overwrite"])
    assert again.exit_code == 2 and "--overwrite: not with --engine ray" in again.output


def test_one_task_per_video(cluster, tmp_path):
    cv2 = pytest.importorskip("cv2")
    photo = cv2.resize(cv2.imread(str(EXAMPLE)), (320, 240))
    path = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (320, 240))
    for shift in range(10):
        writer.write(np.roll(photo, shift * 2, axis=1))
    writer.release()
    local = CliRunner().invoke(cli, ["predict", str(path), "--every", "2", "--out", str(tmp_path / "local")])
    assert local.exit_code == 0, local.output

    summary = predict_with_ray(RayPredictConfig(sources=[str(path)], out=str(tmp_path / "ray"), every=2), progress=False)
    assert summary["videos"] == 1 and summary["video_faces"] > 0 and summary["images"] == 0
    [record] = _ray_results(tmp_path / "ray").values()
    assert record["frames_analysed"] == 5 and record["faces"] == summary["video_faces"]
    timeline = tmp_path / "ray" / "videos" / "video-00000-clip.timeline.csv"
    assert timeline.read_text() == (tmp_path / "local" / "clip.timeline.csv").read_text()
    assert record["files"] == [str(timeline), str(timeline.with_name("video-00000-clip.emotions.png"))]
    # settings no video could use stop the run before it starts, not once per video
    for bad in ({"every": 0}, {"smooth": 0}, {"every": 2, "target_fps": 5.0}):
        with pytest.raises(FerkitError):
            predict_with_ray(RayPredictConfig(sources=[str(path)], out=str(tmp_path / "bad"), **bad), progress=False)
    assert not (tmp_path / "bad").exists()
    # a glob's videos are analysed as `ferkit predict` analyses them; a folder's are left out, with a note
    (tmp_path / "mixed").mkdir()
    shutil.copy(path, tmp_path / "mixed" / "clip.mp4")
    shutil.copy(EXAMPLE, tmp_path / "mixed" / "people.jpg")
    globbed = predict_with_ray(RayPredictConfig(sources=[str(tmp_path / "mixed" / "*")], out=str(tmp_path / "glob"),
                                                every=2), progress=False)
    assert globbed["videos"] == 1 and globbed["images"] == 1
    folder = CliRunner().invoke(cli, ["predict", str(tmp_path / "mixed"), "--engine", "ray", "--every", "2",
                                      "--out", str(tmp_path / "folder")])
    assert folder.exit_code == 0 and f"{tmp_path / 'mixed'} holds 1 video(s), left out" in folder.output
    assert "1 images, 3 faces" in folder.output and "videos" not in folder.output.splitlines()[-1]


def test_an_empty_out_or_address_is_one_line(photos):
    for options, error in ((["--out", ""], "--out is empty"), (["--address", "", "--out", "x"], "--address is empty")):
        result = CliRunner().invoke(cli, ["predict", str(photos), "--engine", "ray", *options])
        assert result.exit_code == 2 and result.output.startswith(f"error: {error}"), result.output
