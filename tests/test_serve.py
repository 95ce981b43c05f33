"""`ferkit serve`: the JSON API against the real app and model, and a real server under uvicorn."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="ferkit[serve] is not installed")
from fastapi.testclient import TestClient  # noqa: E402

import ferkit  # noqa: E402
from ferkit.errors import FerkitError  # noqa: E402
from ferkit.predict import analyze_images  # noqa: E402
from ferkit.runtime import read_metadata  # noqa: E402
from ferkit.serve import ServeConfig, create_app  # noqa: E402

PEOPLE = Path(__file__).resolve().parents[1] / "examples" / "people.jpg"


@pytest.fixture(scope="module")
def client():
    return TestClient(create_app(ServeConfig(max_upload_mb=1, max_megapixels=4, max_video_mb=2, max_video_seconds=3)))


def _faces(result: dict) -> list[tuple]:
    return [(tuple(f["box"]), f["emotion"], round(f["score"], 4)) for f in result["faces"]]


def test_a_photo_gives_the_json_of_ferkit_predict(client):
    response = client.post("/v1/analyze", content=PEOPLE.read_bytes(), headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200, response.text
    served = response.json()
    [expected] = analyze_images([PEOPLE])
    expected = expected.to_dict()
    assert set(served) == set(expected)
    assert _faces(served) == _faces(expected) and len(served["faces"]) == 3
    assert served["image_size"] == expected["image_size"] and served["model"] == expected["model"]


def test_a_multipart_upload_gives_the_same_faces(client):
    raw = client.post("/v1/analyze", content=PEOPLE.read_bytes(), headers={"Content-Type": "image/jpeg"}).json()
    form = client.post("/v1/analyze", files={"file": ("people.jpg", PEOPLE.read_bytes(), "image/jpeg")})
    assert form.status_code == 200, form.text
    assert _faces(form.json()) == _faces(raw)
    assert form.json()["source"] == "people.jpg" and raw["source"] == "upload"  # the name, where the form gives it
    for upload in (("people.jpg", PEOPLE.read_bytes(), "image/jpg"), ("people.jpg", PEOPLE.read_bytes())):
        form = client.post("/v1/analyze", files={"file": upload})  # the type some browsers send, and none at all
        assert form.status_code == 200, form.text
        assert _faces(form.json()) == _faces(raw)
    # "image/jpg", and the type `curl --data-binary @people.jpg` declares unless told otherwise
    for declared in ("image/jpg", "application/x-www-form-urlencoded"):
        alias = client.post("/v1/analyze", content=PEOPLE.read_bytes(), headers={"Content-Type": declared})
        assert alias.status_code == 200 and _faces(alias.json()) == _faces(raw)
    two = client.post("/v1/analyze", files=[("file", ("a.jpg", PEOPLE.read_bytes(), "image/jpeg"))] * 2)
    assert two.status_code == 422 and "one per request" in two.json()["detail"]


def test_the_health_models_and_openapi_routes(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["ferkit"] == ferkit.__version__
    [model] = client.get("/v1/models").json()["models"]
    assert model["classes"] == ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/analyze", "/v1/video", "/v1/models", "/healthz"} <= set(paths)
    for route, codes in (("/v1/analyze", {"403", "413", "415", "422", "503"}), ("/v1/video", {"403", "413", "415", "422", "501", "503"})):
        answers = paths[route]["post"]["responses"]
        assert codes <= set(answers) and answers["413"]["content"]["application/json"]["schema"]["required"] == ["detail"]
    assert "application/x-ndjson" in paths["/v1/video"]["post"]["responses"]["200"]["content"]
    assert client.get("/docs").status_code == 200
    for path in ("/", "/healthz", "/v1/models"):  # as uptime checks and curl -I ask
        head = client.head(path)
        assert head.status_code == 200 and head.headers["content-type"] == client.get(path).headers["content-type"]


def test_a_served_run_names_its_run_but_not_where_it_lies(trained_run):
    served = TestClient(create_app(ServeConfig(model=str(trained_run))))
    [model] = served.get("/v1/models").json()["models"]
    assert model["version"] == f"{trained_run.name} (best.keras, epoch {read_metadata(trained_run).extra['epoch']})"
    assert model["name"] == served.get("/healthz").json()["model"] == trained_run.name and model["network"] == "seed-cnn"
    answer = served.post("/v1/analyze", content=PEOPLE.read_bytes(), headers={"Content-Type": "image/jpeg"})
    assert answer.json()["model_version"] == model["version"]
    assert served.get("/openapi.json").json()["info"]["version"] == model["version"]
    for text in (served.get("/v1/models").text, answer.text, served.get("/openapi.json").text):
        assert str(trained_run.parent) not in text


def test_the_page_and_its_assets_are_served_with_no_other_source(client):
    page = client.get("/")
    assert page.status_code == 200 and "<title>ferkit" in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    for text in (page.text, client.get("/static/app.js").text, client.get("/static/style.css").text):
        assert "http://" not in text and "https://" not in text  # no CDN, no other server


def test_an_upload_over_the_size_limit_is_413(client):
    too_big = os.urandom(1024 * 1024 + 1)
    response = client.post("/v1/analyze", content=too_big, headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 413
    assert response.json()["detail"] == "the upload is over 1 MB, this server's limit (--max-upload-mb)"
    form = client.post("/v1/analyze", files={"file": ("big.jpg", too_big, "image/jpeg")})
    assert form.status_code == 413 and "--max-upload-mb" in form.json()["detail"]
    video = client.post("/v1/video", content=os.urandom(2 * 1024 * 1024 + 1), headers={"Content-Type": "video/mp4"})
    assert video.status_code == 413
    assert video.json()["detail"] == "the upload is over 2 MB, this server's limit (--max-video-mb)"


def test_the_size_limit_counts_the_bytes_read_whatever_the_declared_length(client):
    def chunks():  # no Content-Length: the body arrives in pieces, 1.5 MB in all
        for _ in range(24):
            yield os.urandom(64 * 1024)

    response = client.post("/v1/analyze", content=chunks(), headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 413 and "--max-upload-mb" in response.json()["detail"]


@pytest.mark.parametrize("content_type, body", [
    ("text/plain", b"hello"),
    ("image/jpeg", b"not a jpeg at all"),
    ("application/octet-stream", b"\x00" * 100),
    ("image/png", PEOPLE.read_bytes()[:2000]),  # a cut-off file
])
def test_what_is_not_an_image_is_415_with_one_line(client, content_type, body):
    response = client.post("/v1/analyze", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 415, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    if "not an image ferkit can decode" in detail:  # the formats this install reads, HEIC only with the heic extra
        from ferkit.images import image_decoders

        assert ("HEIC" in detail) == ("HEIF" in image_decoders()) and "JPEG, PNG, WebP" in detail


def test_an_upload_without_a_content_type_is_taken_as_bytes_to_decode(client):
    response = client.post("/v1/analyze", content=PEOPLE.read_bytes())  # as requests.post(url, data=...) sends it
    assert "content-type" not in response.request.headers
    assert response.status_code == 200 and len(response.json()["faces"]) == 3


@pytest.mark.parametrize("setting", [{"max_upload_mb": float("nan")}, {"max_upload_mb": -1}, {"concurrency": 0},
                                     {"video_fps": 0}, {"max_megapixels": 0}, {"max_video_seconds": "60"},
                                     {"max_upload_mb": 1e308}, {"max_video_mb": 2e6}, {"max_waiting": -1}])
def test_settings_no_server_can_run_with_are_refused_when_the_app_is_made(setting):
    with pytest.raises(FerkitError, match=f"the server's {next(iter(setting))} must be"):
        create_app(ServeConfig(**setting))


def test_only_the_image_decoders_ferkit_names_see_an_upload(client):
    """PostScript opens in Pillow by running Ghostscript on the bytes: never for an upload."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nshowpage\n"
    ppm = io.BytesIO()
    Image.open(PEOPLE).save(ppm, "PPM")  # a format Pillow decodes, and ferkit does not take from uploads
    for body in (eps, ppm.getvalue()):
        for content_type in ("image/x-portable-pixmap", "application/octet-stream"):
            response = client.post("/v1/analyze", content=body, headers={"Content-Type": content_type})
            assert response.status_code == 415, response.text


def test_any_image_type_is_tried_by_decoding_it(client):
    """What decodes is decided by decoding: a browser may name a file image/avif, image/heic, ..."""
    response = client.post("/v1/analyze", content=PEOPLE.read_bytes(), headers={"Content-Type": "image/x-anything"})
    assert response.status_code == 200 and len(_faces(response.json())) == 3


def test_a_heic_upload_gives_the_faces_of_the_jpeg(client):
    from ferkit.images import enable_heif

    if not enable_heif():
        pytest.skip("ferkit[heic] (pillow-heif) is not installed")
    heic = io.BytesIO()
    Image.open(PEOPLE).save(heic, format="HEIF", quality=95)
    jpeg = client.post("/v1/analyze", content=PEOPLE.read_bytes(), headers={"Content-Type": "image/jpeg"}).json()
    response = client.post("/v1/analyze", content=heic.getvalue(), headers={"Content-Type": "image/heic"})
    assert response.status_code == 200, response.text
    assert [f["emotion"] for f in response.json()["faces"]] == [f["emotion"] for f in jpeg["faces"]]


def test_a_damaged_heic_upload_is_415_or_analysed_never_a_server_error(client):
    from ferkit.images import enable_heif

    if not enable_heif():
        pytest.skip("ferkit[heic] (pillow-heif) is not installed")
    heic = io.BytesIO()
    Image.open(PEOPLE).save(heic, format="HEIF")
    data = bytearray(heic.getvalue())
    data[382] ^= 0xFF  # pillow-heif 1.x's decoder raises EOFError for this one; 0.16's decodes it
    response = client.post("/v1/analyze", content=bytes(data), headers={"Content-Type": "image/heic"})
    assert response.status_code in (200, 415), response.text
    if response.status_code == 415:
        assert "\n" not in response.json()["detail"]


def test_an_image_over_the_pixel_limit_is_413_before_it_is_decoded(client):
    png = io.BytesIO()
    Image.new("L", (3000, 2000)).save(png, "PNG")  # 6 megapixels in a few kilobytes
    response = client.post("/v1/analyze", content=png.getvalue(), headers={"Content-Type": "image/png"})
    detail = response.json()["detail"]
    assert response.status_code == 413 and "3000x2000 pixels" in detail and "--max-megapixels 4" in detail


def test_a_jpeg_over_the_pixel_limit_is_decoded_smaller_as_ferkit_predict_decodes_one(client):
    """A phone's 100-megapixel photo is analysed, not refused: its faces are found at a reduced scale and
    reported in the photo's own pixels."""
    large = io.BytesIO()
    with Image.open(PEOPLE) as people:
        people.resize((people.width * 3, people.height * 3)).save(large, "JPEG", quality=90)  # 2760x1080: 3 Mpx
    body = large.getvalue()
    small = TestClient(create_app(ServeConfig(max_megapixels=1)))  # decoded at 1/2: 1380x540
    answer = small.post("/v1/analyze", content=body, headers={"Content-Type": "image/jpeg"})
    assert answer.status_code == 200, answer.text
    found = answer.json()
    assert found["image_size"] == [2760, 1080] and found["timings_ms"]["decode"] > 0
    whole = ferkit.analyze(body)  # the whole photo, decoded at full scale
    assert len(found["faces"]) == len(whole) == 3
    for face, full in zip(found["faces"], whole):
        assert face["emotion"] == full.emotion
        assert np.allclose(face["box"], full.box, atol=0.05 * full.box[2])


def test_concurrent_requests_share_one_model_and_agree(client):
    body = PEOPLE.read_bytes()
    results, errors = [], []

    def call():
        try:
            response = client.post("/v1/analyze", content=body, headers={"Content-Type": "image/jpeg"})
            results.append(_faces(response.json()))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and len(results) == 8
    assert all(result == results[0] for result in results)


def _with_the_one_slot_busy(max_waiting: int, scenario):
    """`scenario(http, post, gate)` run against an app of one analysis slot, kept busy until the gate opens:
    `post()` starts an upload of the people photo; the gate is opened however the scenario ends."""
    import asyncio

    import httpx2 as httpx

    app = create_app(ServeConfig(concurrency=1, max_waiting=max_waiting))
    gate = threading.Event()
    app.state.analyses.submit(gate.wait, 60)
    body = PEOPLE.read_bytes()

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ferkit") as http:
            def post():
                return asyncio.create_task(http.post("/v1/analyze", content=body, headers={"Content-Type": "image/jpeg"}))

            return await scenario(http, post, gate)

    try:
        return app, asyncio.run(run())
    finally:
        gate.set()


def test_queued_analyses_do_not_keep_the_health_check_waiting():
    import asyncio

    async def scenario(http, post, gate):
        uploads = [post() for _ in range(60)]  # more than the framework's 40 shared threads
        await asyncio.sleep(1)
        health = await asyncio.wait_for(http.get("/healthz"), timeout=10)
        models = await asyncio.wait_for(http.get("/v1/models"), timeout=10)
        assert not any(upload.done() for upload in uploads)  # all still queued behind the gate
        gate.set()
        return health, models, await asyncio.gather(*uploads)

    _, (health, models, answers) = _with_the_one_slot_busy(60, scenario)
    assert health.status_code == 200 and models.status_code == 200
    assert [answer.status_code for answer in answers] == [200] * 60
    assert all(len(answer.json()["faces"]) == 3 for answer in answers)


def test_uploads_past_the_waiting_limit_are_503_at_once_and_the_others_analysed():
    import asyncio

    async def scenario(http, post, gate):
        held = [post() for _ in range(3)]  # one whose turn is next, two waiting
        await asyncio.sleep(1)
        refused = await asyncio.wait_for(asyncio.gather(post(), post()), timeout=10)
        assert not any(upload.done() for upload in held)
        gate.set()
        return refused, await asyncio.gather(*held)

    app, (refused, answered) = _with_the_one_slot_busy(2, scenario)
    assert [r.status_code for r in refused] == [503, 503] and all(r.headers["Retry-After"] == "5" for r in refused)
    assert "the server is busy: 3 analyses running or waiting" in refused[0].json()["detail"]
    assert [a.status_code for a in answered] == [200] * 3
    with TestClient(app) as client:  # the turns are given back: the server takes uploads again
        body = PEOPLE.read_bytes()
        assert client.post("/v1/analyze", content=body, headers={"Content-Type": "image/jpeg"}).status_code == 200


def test_an_upload_past_the_waiting_limit_is_refused_before_its_body_is_read():
    import asyncio

    async def scenario(http, post, gate):
        held = [post() for _ in range(3)]
        await asyncio.sleep(1)
        sent = []

        async def endless_body():  # a slow upload that would go on for ever
            while True:
                sent.append(65536)
                yield b"\xff" * 65536
                await asyncio.sleep(0.01)

        refused = await asyncio.wait_for(http.post("/v1/analyze", content=endless_body(),
                                                   headers={"Content-Type": "image/jpeg"}), timeout=30)
        gate.set()
        return refused, sum(sent), await asyncio.gather(*held)

    _, (refused, sent, answered) = _with_the_one_slot_busy(2, scenario)
    assert refused.status_code == 503 and sent < 1 << 20  # not the 10 MB a 413 would have read
    assert [a.status_code for a in answered] == [200] * 3


def _panning_video(frames: int) -> bytes:
    """An MJPG AVI at 10 frames a second, panning across examples/people.jpg (640x360)."""
    cv2 = pytest.importorskip("cv2", reason="ferkit[video] is not installed")
    photo = cv2.imread(str(PEOPLE))
    step = (photo.shape[1] - 640) // frames
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "pan.avi"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (640, 360))
        for i in range(frames):
            writer.write(np.ascontiguousarray(photo[:, step * i : step * i + 640]))
        writer.release()
        return path.read_bytes()


def test_a_short_video_gives_a_timeline_and_a_plot_and_leaves_no_file(client):
    data = _panning_video(10)
    before = set(Path(tempfile.gettempdir()).glob("ferkit-serve-*"))
    response = client.post("/v1/video", files={"file": ("pan.avi", data, "video/x-msvideo")})
    assert response.status_code == 200, response.text
    result = response.json()
    lines = result["csv"].splitlines()
    assert lines[0].startswith("time_s,frame,track") and len(lines) - 1 == result["faces"] > 0
    assert result["tracks"] == len({line.split(",")[2] for line in lines[1:]}) >= 1  # as `ferkit predict --json` says
    assert result["source"] == "pan.avi" and result["cut_short"] is False
    assert result["frames_analysed"] == 5  # about 5 a second of its 10, as `ferkit predict` analyses a video
    assert result["plot_png"].startswith("data:image/png;base64,")
    # the upload is gone (another test's server, running beside this one, may have removed its own meanwhile)
    assert set(Path(tempfile.gettempdir()).glob("ferkit-serve-*")) <= before


def test_a_video_asked_for_as_lines_of_json_reports_its_progress_then_the_same_result(client):
    data = _panning_video(20)  # 2 s at 10 frames a second
    plain = client.post("/v1/video", files={"file": ("pan.avi", data, "video/x-msvideo")}).json()
    answer = client.post("/v1/video", files={"file": ("pan.avi", data, "video/x-msvideo")},
                         headers={"Accept": "application/x-ndjson"})
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in answer.text.splitlines()]
    progress = [line["progress"] for line in lines[:-1]]
    assert len(progress) >= 5 and all(p["seconds"] == pytest.approx(2.0) for p in progress)
    seconds = [p["seconds_analysed"] for p in progress]
    assert seconds == sorted(seconds) and 0 <= seconds[0] < seconds[-1] <= 2.0
    assert lines[-1]["result"] == plain  # the same answer, the plot's pixels included
    too_long = client.post("/v1/video", files={"file": ("pan.avi", _panning_video(40), "video/x-msvideo")},
                           headers={"Accept": "application/x-ndjson"})  # 4 s: over this server's 3
    assert json.loads(too_long.text.splitlines()[-1])["error"]["status"] == 413


def test_a_video_cut_short_is_analysed_as_far_as_it_goes_and_said_to_be(client):
    data = _panning_video(20)
    whole = client.post("/v1/video", files={"file": ("pan.avi", data, "video/x-msvideo")}).json()
    cut = client.post("/v1/video", files={"file": ("pan.avi", data[: len(data) // 2], "video/x-msvideo")})
    assert cut.status_code == 200, cut.text
    assert whole["cut_short"] is False and cut.json()["cut_short"] is True
    assert 0 < cut.json()["frames_analysed"] < whole["frames_analysed"]


def test_query_parameters_are_refused_not_ignored(client):
    for route in ("/v1/analyze", "/v1/video"):
        answer = client.post(f"{route}?fps=10", content=PEOPLE.read_bytes(), headers={"Content-Type": "image/jpeg"})
        assert answer.status_code == 422 and "no query parameters" in answer.json()["detail"] and "fps" in answer.json()["detail"]


def test_a_video_over_the_duration_limit_is_413(client):
    cv2 = pytest.importorskip("cv2", reason="ferkit[video] is not installed")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "long.avi"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
        for _ in range(50):  # 5 s at 10 frames/s; the limit is 3 s
            writer.write(np.zeros((48, 64, 3), np.uint8))
        writer.release()
        data = path.read_bytes()
    response = client.post("/v1/video", content=data, headers={"Content-Type": "video/x-msvideo"})
    assert response.status_code == 413 and "3 s" in response.json()["detail"] and "--max-video-seconds" in response.json()["detail"]


def test_a_photo_sent_as_a_video_is_415_pointing_to_the_photo_route(client):
    bmp = io.BytesIO()
    Image.open(PEOPLE).save(bmp, format="BMP")  # OpenCV alone would read it as a video of one frame
    mpo = io.BytesIO()  # a camera JPEG with a second picture in it (Pillow calls it animated)
    Image.open(PEOPLE).save(mpo, format="MPO", save_all=True, append_images=[Image.open(PEOPLE).rotate(180)])
    ppm = io.BytesIO()  # a still that the photo route does not take, which OpenCV reads as a one-frame video
    Image.open(PEOPLE).save(ppm, format="PPM")
    for data, kind in ((bmp.getvalue(), "video/mp4"), (PEOPLE.read_bytes(), "application/octet-stream"),
                       (mpo.getvalue(), "video/mp4"), (ppm.getvalue(), "application/octet-stream")):
        response = client.post("/v1/video", content=data, headers={"Content-Type": kind})
        assert response.status_code == 415 and "/v1/analyze" in response.json()["detail"], response.text


def test_an_animated_gif_may_be_sent_as_a_video_by_its_own_type(client):
    frames = [Image.open(PEOPLE).crop((40 * i, 0, 40 * i + 640, 360)) for i in range(12)]
    animated, still = io.BytesIO(), io.BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    frames[0].save(still, format="GIF")
    answer = client.post("/v1/video", content=animated.getvalue(), headers={"Content-Type": "image/gif"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["frames_analysed"] >= 2 and answer.json()["faces"] > 0
    refused = client.post("/v1/video", content=still.getvalue(), headers={"Content-Type": "image/gif"})
    assert refused.status_code == 415 and "/v1/analyze" in refused.json()["detail"]
    jpeg = client.post("/v1/video", content=PEOPLE.read_bytes(), headers={"Content-Type": "image/jpeg"})
    assert jpeg.status_code == 415 and "expected a video" in jpeg.json()["detail"]
    webp = io.BytesIO()  # OpenCV reads no animated WebP: refused by its type, not taken for a still image
    frames[0].save(webp, format="WEBP", save_all=True, append_images=frames[1:], duration=100)
    for kind in ("image/webp", "application/octet-stream"):
        refused = client.post("/v1/video", content=webp.getvalue(), headers={"Content-Type": kind})
        assert refused.status_code == 415 and "still image" not in refused.json()["detail"], refused.text


def test_the_page_asks_for_nothing_that_is_not_there_or_not_here(client):
    assert client.get("/favicon.ico").status_code == 204  # no 404 in the log on every page load
    assert client.get("/redoc").status_code == 404  # it would load its script and fonts from the internet


def test_a_video_without_opencv_installed_is_501_saying_which_extra(client, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # import raises ImportError, as when ferkit[video] is absent
    response = client.post("/v1/video", content=b"RIFF....AVI ", headers={"Content-Type": "video/x-msvideo"})
    assert response.status_code == 501 and "pip install 'ferkit[video]'" in response.json()["detail"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_server(*options: str) -> tuple[subprocess.Popen, str]:
    """`ferkit serve` itself, in a process of its own, on a free loopback port, once it answers: the
    process (its log on stdout) and its URL."""
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "ferkit.cli", "serve", "--port", str(port), *options],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1):
                return process, url
        except OSError:
            assert process.poll() is None and time.time() < deadline, process.stdout.read() if process.poll() is not None else "no answer"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def server():
    process, url = _start_server()
    yield url
    process.terminate()
    process.wait(timeout=30)


def test_the_server_binds_to_loopback_only(server):
    port = int(server.rsplit(":", 1)[1])
    addresses = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
    for address in addresses:  # this machine's other addresses do not answer
        with pytest.raises(OSError), socket.create_connection((address, port), timeout=2):
            pass


def test_the_server_refuses_what_another_sites_page_makes_a_browser_send(server):
    """A page elsewhere may post to localhost (its answer unread), or rebind its own name to 127.0.0.1 (its
    answers read): uploads from another Origin, and requests naming another Host, are refused."""
    def status(path, headers, data=None):
        request = urllib.request.Request(f"{server}{path}", data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    photo = {"Content-Type": "image/jpeg"}
    code, answer = status("/v1/analyze", {**photo, "Origin": "http://evil.example"}, PEOPLE.read_bytes())
    assert code == 403 and "another site's page" in answer["detail"]
    code, answer = status("/v1/models", {"Host": "evil.example:8000"})
    assert code == 403 and "localhost only" in answer["detail"]
    port = server.rsplit(":", 1)[1]
    for own in (server, f"http://localhost:{port}"):  # the page itself, by either name
        host = own.split("//")[1]
        code, answer = status("/v1/analyze", {**photo, "Origin": own, "Host": host}, PEOPLE.read_bytes())
        assert code == 200 and len(answer["faces"]) == 3


def test_an_idle_client_does_not_block_others(server):
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as idle:
        # headers and half a body, then nothing: the server waits for this client alone
        idle.sendall(b"POST /v1/analyze HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n")
        idle.sendall(PEOPLE.read_bytes()[:50000])
        started = time.perf_counter()
        request = urllib.request.Request(f"{server}/v1/analyze", data=PEOPLE.read_bytes(),
                                         headers={"Content-Type": "image/jpeg"})
        with urllib.request.urlopen(request, timeout=30) as response:
            faces = json.loads(response.read())["faces"]
        assert len(faces) == 3 and time.perf_counter() - started < 30


def test_a_form_without_the_file_field_is_refused_in_one_line(client):
    response = client.post("/v1/analyze", files={"photo": ("people.jpg", PEOPLE.read_bytes(), "image/jpeg")})
    assert response.status_code == 422 and response.json()["detail"] == "the form has no file field 'file'"
    unclosed = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="people.jpg"\r\n'
                b"Content-Type: image/jpeg\r\n\r\n" + PEOPLE.read_bytes()[:2000])  # no closing boundary
    response = client.post("/v1/analyze", content=unclosed, headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert response.status_code == 422 and response.json()["detail"].startswith("the form holds no complete field")


def test_a_host_that_is_not_this_machine_is_one_line_about_the_host():
    from ferkit.serve import check_port_free

    for host in ("nosuchhost.invalid", "192.0.2.1"):  # no such name; an address of the documentation range
        with pytest.raises(FerkitError, match=f"^cannot listen on {host}:8000: .*--host takes an address of this machine"):
            check_port_free(host, 8000)


def test_a_port_in_use_is_one_line_and_exit_2():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "ferkit.cli", "serve", "--port", str(port)],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot listen on 127.0.0.1:{port}")


def test_clients_that_leave_are_neither_a_traceback_nor_work_for_the_model():
    """An upload cut off midway is one line in the log; uploads whose clients left while they waited for
    the (one) analysis slot are skipped, not analysed for no one."""
    photo = Image.open(PEOPLE)
    large = io.BytesIO()
    photo.resize((photo.width * 7, photo.height * 7)).save(large, format="JPEG")  # a second or so to analyse
    process, url = _start_server("--concurrency", "1")
    port = int(url.rsplit(":", 1)[1])
    try:
        def request_head(length: int) -> bytes:
            return (f"POST /v1/analyze HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
                    f"Content-Length: {length}\r\n\r\n").encode()

        with socket.create_connection(("127.0.0.1", port)) as cancelled:
            cancelled.sendall(request_head(100000) + PEOPLE.read_bytes()[:100])
        answers = []
        busy = threading.Thread(target=lambda: answers.append(urllib.request.urlopen(urllib.request.Request(
            f"{url}/v1/analyze", data=large.getvalue(), headers={"Content-Type": "image/jpeg"}), timeout=60).status))
        busy.start()
        time.sleep(0.3)  # the slot is taken; the next three wait for it, and leave
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port)) as impatient:
                impatient.sendall(request_head(len(large.getvalue())) + large.getvalue())
        busy.join()
        request = urllib.request.Request(f"{url}/v1/analyze", data=PEOPLE.read_bytes(), headers={"Content-Type": "image/jpeg"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answers.append(response.status)
    finally:
        process.terminate()
        log = process.communicate(timeout=30)[0]
    assert answers == [200, 200]
    assert "Traceback" not in log and "Exception in ASGI application" not in log
    assert log.count("/v1/analyze: the client closed the connection during the upload") == 1
    assert log.count("/v1/analyze: not analysed, its client left before its turn came") == 3
    assert log.count('"POST /v1/analyze HTTP/1.1" 200') == 2


def test_a_video_whose_client_leaves_is_no_longer_analysed():
    data = _panning_video(300)  # 30 s at 10 frames/s: far more work than the test waits for
    process, url = _start_server()
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"POST /v1/video HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: video/x-msvideo\r\n"
                           + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
            time.sleep(2)  # the analysis is under way; then the client gives up
        deadline = time.time() + 60
        while not any("its client left" in line for line in lines):
            assert time.time() < deadline, "".join(lines)
            time.sleep(0.2)
        assert any("/v1/video: stopped at frame" in line for line in lines)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_ctrl_c_stops_a_video_being_analysed_and_the_server_at_once():
    data = _panning_video(300)
    process, url = _start_server()
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(b"POST /v1/video HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: video/x-msvideo\r\n"
                       + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        time.sleep(2)  # the analysis is under way
        process.send_signal(signal.SIGINT)
        started = time.time()
        process.wait(timeout=30)
        stopped_in = time.time() - started
    reader.join(timeout=5)
    output = "".join(lines)
    assert "stopped at frame" in output and "the server is stopping" in output, output
    assert stopped_in < 10 and "Traceback" not in output, (stopped_in, output)


def test_a_video_whose_client_leaves_midway_is_one_line_in_the_log_not_a_traceback(tmp_path):
    cv2 = pytest.importorskip("cv2", reason="ferkit[video] is not installed")
    photo = cv2.resize(cv2.imread(str(PEOPLE)), (1280, 720))
    writer = cv2.VideoWriter(str(tmp_path / "long.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, photo.shape[1::-1])
    for _ in range(100):  # 10 s
        writer.write(photo)
    writer.release()
    video = (tmp_path / "long.mp4").read_bytes()
    process, url = _start_server()
    port = int(url.rsplit(":", 1)[1])
    try:
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", port)) as leaving:
                leaving.sendall((f"POST /v1/video HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: video/mp4\r\n"
                                 f"Accept: application/x-ndjson\r\nContent-Length: {len(video)}\r\n\r\n").encode() + video)
                leaving.settimeout(60)
                assert b'"progress"' in leaving.recv(4096) + leaving.recv(4096)  # under way, then gone
        time.sleep(3)
        with urllib.request.urlopen(f"{url}/healthz", timeout=30) as response:  # the server goes on
            assert response.status == 200
    finally:
        process.terminate()
        log = process.communicate(timeout=30)[0]
    assert "Traceback" not in log and "never retrieved" not in log, log
    assert log.count("/v1/video: stopped at frame") == 2, log
