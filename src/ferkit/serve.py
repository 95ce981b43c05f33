"""`ferkit serve`: a local web page and JSON API for emotion analysis, on FastAPI and uvicorn.

    app = create_app()                        # the bundled model; any ASGI server runs it
    serve(host="127.0.0.1", port=8000)        # or: ferkit serve

Routes: `/` (the page: photo, webcam and video), `POST /v1/analyze` (an image: the JSON of `ferkit
predict --json`), `POST /v1/video` (a short video: emotions over time as CSV and a plot), `GET /v1/models`,
`GET /healthz`, and the OpenAPI schema at `/openapi.json` (`/docs` renders it with Swagger UI from a CDN).

Safe by default: it binds to loopback; requests carry the file itself, never a path or a URL; bodies
over the size limit get 413 (counted as read, whatever the declared length); anything that does not
decode as an image gets 415 (only IMAGE_FORMATS' decoders see an upload), an image over the pixel limit 413; uploads are held in memory (videos in
a temporary file, removed before the response); one loaded model serves all requests, at most
`concurrency` analyses at a time (decoding included), in worker threads of their own: slow or idle
clients never hold the model, and queued analyses never hold the threads that answer `/healthz` and the page;
past `max_waiting` uploads waiting for their turn, more get 503 with Retry-After.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations (Request), which
# are imported inside create_app, only where the serve extra is installed.
import asyncio
import base64
import contextlib
import functools
import io
import json
import logging
import math
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ferkit import __version__
from ferkit.errors import FerkitError, first_line
from ferkit.extras import require
from ferkit.predict import model_named_by, model_version

WEB = Path(__file__).parent / "web"
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/gif", "image/tiff")  # and any image/*
# The only decoders an upload reaches: Pillow has dozens more (PostScript's runs Ghostscript on the bytes).
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF", "AVIF", "HEIF")  # HEIF: the heic extra
ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "image/x-png": "image/png"}  # seen in the wild
VIDEO_TYPES = ("video/mp4", "video/webm", "video/quicktime", "video/x-msvideo", "video/x-matroska")  # and any video/*
MB = 1024 * 1024
log = logging.getLogger("ferkit")
MAX_MB = 1_000_000  # a size limit's ceiling (about a terabyte): larger values would overflow the byte count
_PLOTTING = threading.Lock()


@dataclass
class ServeConfig:
    model: str | None = None  # a run folder, .keras or .onnx file, a shipped model's name; None: the default
    detector: str = "auto"
    max_upload_mb: float = 10.0  # photos
    max_video_mb: float = 50.0
    max_video_seconds: float = 60.0
    max_megapixels: float = 40.0
    concurrency: int = 2  # analyses at a time (each uses the CPU cores ONNX Runtime is given)
    max_waiting: int = 32  # uploads held in memory, arriving or waiting for their turn, beyond which more get 503
    video_fps: float = 5.0  # analyse about this many frames per second of an uploaded video, as `ferkit predict` does

    def __post_init__(self):
        for name in ("max_upload_mb", "max_video_mb", "max_video_seconds", "max_megapixels", "video_fps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise FerkitError(f"the server's {name} must be a number above 0, not {value!r}")
        for name in ("max_upload_mb", "max_video_mb"):
            if getattr(self, name) > MAX_MB:
                raise FerkitError(f"the server's {name} must be at most {MAX_MB:,} (MB), not {getattr(self, name)!r}")
        if not (isinstance(self.concurrency, int) and self.concurrency >= 1):
            raise FerkitError(f"the server's concurrency must be a whole number, at least 1, not {self.concurrency!r}")
        if not (isinstance(self.max_waiting, int) and self.max_waiting >= 0):
            raise FerkitError(f"the server's max_waiting must be a whole number, at least 0, not {self.max_waiting!r}")


def create_app(config: ServeConfig | None = None, *, local_only: bool = False):
    """The FastAPI application: the model and detector are loaded once, here. Requests that a page of
    another site makes a browser send are refused; with `local_only` (a server on 127.0.0.1), so is any
    request whose Host is not this machine's loopback name (a DNS-rebinding site's)."""
    require("fastapi", "ferkit serve", extra="serve")
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import FileResponse, Response
    from fastapi.staticfiles import StaticFiles

    from ferkit.faces import get_detector
    from ferkit.images import image_decoders
    from ferkit.predict import analyze_images
    from ferkit.runtime import load_classifier

    config = config or ServeConfig()
    decoders = [f for f in IMAGE_FORMATS if f in image_decoders()]  # HEIF where the heic extra is installed
    classifier = load_classifier(config.model, prefer_export=True)
    detector = get_detector(config.detector)
    # Analyses queue for a pool of their own. Waiting inside the framework's shared thread pool instead
    # would let ~40 queued uploads take every thread, and /healthz would wait behind them.
    analyses = ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="ferkit-analysis")
    version = model_version(classifier, public=True)
    name = model_named_by(version)  # a shipped model's name (also of a copy of its file), a run folder's or a file's
    # no /redoc: it loads its script and fonts from the internet; /docs (Swagger UI) is the one documented
    app = FastAPI(title="ferkit", version=version, redoc_url=None,
                  summary="Facial expression recognition: faces and their emotions in photos and videos.")
    app.state.analyses = analyses
    app.state.stopping = stopping = threading.Event()  # set by serve() on Ctrl-C: running videos stop at once
    turns = Turns(config.concurrency + config.max_waiting)
    app.mount("/static", StaticFiles(directory=WEB), name="static")
    size_limits = {"/v1/analyze": ("--max-upload-mb", config.max_upload_mb), "/v1/video": ("--max-video-mb", config.max_video_mb)}
    app.add_middleware(TooLargeAsJson, limits=size_limits)
    app.add_middleware(SameSiteOnly, local_only=local_only)

    def analyze_bytes(data: bytes, name: str | None = None) -> dict:
        started = time.perf_counter()
        image = _decode_image(data, decoders, config.max_megapixels)
        decoding_ms = (time.perf_counter() - started) * 1e3
        # `source`: the file's name where a multipart form gives it, as /v1/video says it
        [result] = analyze_images([(Path(name).name if name else "upload", image)], model=classifier, detector=detector)
        if result.error:
            raise HTTPException(422, result.error)
        result.timings_ms["decode"] += decoding_ms  # as `ferkit predict` counts it, the image's decoding in
        result.model_version = version
        return result.to_dict()

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def page():
        return FileResponse(WEB / "index.html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():  # browsers ask for one on every page load; "none" without a 404 in the log
        return Response(status_code=204)

    @app.get("/healthz")
    async def healthz() -> dict:
        """Whether the server is up, the model it serves and ferkit's version."""
        return {"status": "ok", "model": name, "ferkit": __version__}

    @app.get("/v1/models")
    async def models() -> dict:
        """The model this server uses: its name (a shipped model's, or the run folder's or file's it came from),
        network, version, classes and input."""
        return {"models": [{"name": name, "network": classifier.name, "version": version, "classes": list(classifier.classes),
                            "input_size": list(classifier.input_size)}]}

    for path, endpoint in (("/healthz", healthz), ("/v1/models", models)):  # HEAD too, for probes; one operation each in the schema
        app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)

    @app.post("/v1/analyze", openapi_extra=_upload_schema(IMAGE_TYPES), max_body_size=int(config.max_upload_mb * MB),
              responses=_error_responses(IMAGE_ERRORS))
    async def analyze(request: Request) -> dict:
        """Every face in the image, with its box and the probabilities of each emotion: the JSON of
        `ferkit predict --json` (`source`: the file's name where a multipart form gives it, else "upload").
        The body is the image (Content-Type image/*) or a multipart form with the image in the field `file`."""
        with turns.taken():  # before the body is read: an upload arriving is held in memory too
            data, name = await _upload(request, IMAGE_TYPES, "an image", size_limits["/v1/analyze"])
            return await _run_for(request, analyses, analyze_bytes, data, name)

    @app.post("/v1/video", openapi_extra=_upload_schema(VIDEO_TYPES), max_body_size=int(config.max_video_mb * MB),
              responses={200: {"content": {"application/x-ndjson": {"schema": {"type": "string"}}},
                               "description": "The summary; asked with Accept: application/x-ndjson, lines of JSON: "
                                              "progress, then the result or an error"},
                         **_error_responses(VIDEO_ERRORS)})
    async def video(request: Request) -> dict:
        """Emotions over time in a short video, about 5 frames a second: what `ferkit predict --json` says of
        a video (`source`, the file's name where a multipart form gives it; `frames_analysed`; `every`: one
        frame in so many; `tracks`: the faces followed from frame to frame, `tracks_plotted` of them in the plot;
        `faces`: each face counted once per frame it is found in, the timeline's rows; `cut_short`: frames
        stopped coming well before the count the file's container lists, a truncated upload), with the
        timeline as CSV (`csv`) and its plot (`plot_png`, a PNG data URL). Asked with `Accept:
        application/x-ndjson`, the answer comes as lines of JSON while the video is analysed (the page's
        progress): `{"progress": {"seconds_analysed": S, "seconds": LENGTH or null}}`, then `{"result": ...}`
        or `{"error": {"status": ..., "detail": ...}}`."""
        turn = contextlib.ExitStack()
        turn.enter_context(turns.taken())
        with turn:
            data, name = await _upload(request, VIDEO_TYPES, "a video", size_limits["/v1/video"], also=ANIMATED_TYPES)
            gone = threading.Event()  # a video takes a while: stopped when its client leaves
            if "application/x-ndjson" in request.headers.get("accept", ""):
                def analyse(progress):
                    return _analyze_video_bytes(data, classifier, detector, config, name, decoders, gone, stopping, progress=progress)

                return _streamed_with_progress(request, analyses, turn.pop_all(), gone, analyse)
            return await _run_for(request, analyses, _analyze_video_bytes, data, classifier, detector, config, name,
                                  decoders, gone, stopping, leaving=gone)

    return app


CLIENT_GONE = 499  # as nginx logs a request whose client closed the connection before the answer
BUSY_RETRY_S = 5  # the Retry-After of a 503: about what a few queued analyses take


class Turns:
    """Uploads arriving, and analyses running or waiting for their turn, at most `limit`: each holds its
    upload in memory, so past that the server answers 503 at once, before reading the body, rather than
    hold ever more."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0

    @contextlib.contextmanager
    def taken(self):
        from fastapi import HTTPException

        if self.held >= self.limit:  # requests run on one event loop: no other can take a turn meanwhile
            raise HTTPException(503, f"the server is busy: {self.held} analyses running or waiting, its limit "
                                     "(--concurrency and --max-waiting); try again shortly",
                                headers={"Retry-After": str(BUSY_RETRY_S)})
        self.held += 1
        try:
            yield
        finally:
            self.held -= 1


async def _run_for(request, pool: ThreadPoolExecutor, function, *args, leaving: threading.Event | None = None):
    """`function(*args)` in one of the pool's threads, awaited without holding any other thread; skipped
    if the client has gone by the time its turn comes (a client that timed out and retried would
    otherwise queue the same work again and again ahead of everyone else). With `leaving`, that event is
    set if the client leaves while the work runs, for long work to stop on."""
    from fastapi import HTTPException

    loop = asyncio.get_running_loop()

    def client_gone() -> bool:
        try:
            return asyncio.run_coroutine_threadsafe(request.is_disconnected(), loop).result(timeout=5)
        except Exception:  # a loop too busy, or closing: do the work rather than wait on it
            return False

    def unless_client_gone():
        if client_gone():
            log.info("%s: not analysed, its client left before its turn came", request.url.path)
            raise HTTPException(CLIENT_GONE, "the client closed the connection before its turn came")
        return function(*args)

    watcher = asyncio.create_task(_watch_for_leaving(request, leaving)) if leaving else None
    try:
        return await loop.run_in_executor(pool, unless_client_gone)
    finally:
        if watcher:
            watcher.cancel()


def _streamed_with_progress(request, pool: ThreadPoolExecutor, turn: contextlib.ExitStack, gone: threading.Event, analyse):
    """/v1/video's answer as lines of JSON: the progress `analyse(progress)` reports as the video is analysed,
    then its result or error. The server's turn (`turn`) is held until the last line is sent, or the client
    leaves (`gone` is set then: the work stops)."""
    from fastapi import HTTPException
    from fastapi.responses import StreamingResponse

    loop, news = asyncio.get_running_loop(), asyncio.Queue()

    def progress(seconds: float, length: float | None) -> None:  # from the worker thread
        loop.call_soon_threadsafe(news.put_nowait, {"seconds_analysed": round(seconds, 2), "seconds": length})

    async def lines():
        work = asyncio.ensure_future(_run_for(request, pool, analyse, progress))
        try:
            while not work.done():
                waiting = asyncio.ensure_future(news.get())
                await asyncio.wait({work, waiting}, return_when=asyncio.FIRST_COMPLETED)
                if waiting.done():
                    yield json.dumps({"progress": waiting.result()}) + "\n"
                else:
                    waiting.cancel()
            try:
                yield json.dumps({"result": work.result()}) + "\n"
            except HTTPException as err:
                yield json.dumps({"error": {"status": err.status_code, "detail": err.detail}}) + "\n"
        finally:  # the last line sent, or the client gone (the stream is cancelled): the work stops, the turn is freed
            gone.set()
            # once the work has stopped, not before; nothing awaited here, where the stream may be cancelled again
            if work.done():
                _finished(work, turn)
            else:
                work.add_done_callback(functools.partial(_finished, turn=turn))

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _finished(work: asyncio.Future, turn: contextlib.ExitStack) -> None:
    """The server's turn freed after the work of a stream whose client left; its error (499: the client left) taken,
    already said in the log, not left for asyncio to print as "never retrieved" with a traceback."""
    if not work.cancelled():
        work.exception()
    turn.close()


async def _watch_for_leaving(request, gone: threading.Event) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.5)
    gone.set()


class TooLargeAsJson:
    """Answers a body declared over the size limit as every other error is answered, JSON with a
    `detail` that names the limit, instead of the framework's plain-text "Content Too Large" (ASGI
    middleware; a body that goes over the limit as it arrives is caught in `_upload`)."""

    def __init__(self, app, *, limits: dict[str, tuple[str, float]]):
        self.app, self.limits = app, limits  # path: (the option that sets its limit, megabytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.limits:
            return await self.app(scope, receive, send)
        replaced = False

        async def send_detail(message):
            nonlocal replaced
            plain_text = dict(message.get("headers", [])).get(b"content-type", b"").startswith(b"text/plain")
            if message["type"] == "http.response.start" and message["status"] == 413 and plain_text:
                replaced = True
                await _send_detail(send, 413, _too_large(*self.limits[scope["path"]]))
            elif not replaced:  # the framework's own body of a replaced answer is dropped
                await send(message)

        await self.app(scope, receive, send_detail)


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class SameSiteOnly:
    """Refuses (403, JSON) the requests a page of another site can make a browser send to this server: an
    upload whose Origin is not this server, and on a server bound to loopback (`local_only`), a request
    whose Host names another (a site that rebinds its own name to 127.0.0.1 could read the answers)."""

    def __init__(self, app, *, local_only: bool):
        self.app, self.local_only = app, local_only

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        origin = headers.get(b"origin", b"").decode("latin-1")
        refusal = None
        if self.local_only and _hostname(host) not in LOOPBACK_NAMES:
            refusal = f"this server answers requests to localhost only, not to {host or 'no Host'}"
        elif scope["method"] == "POST" and origin and _netloc(origin) != host.lower():
            refusal = f"uploads from another site's page are refused (Origin {origin})"
        if refusal is None:
            return await self.app(scope, receive, send)
        await _send_detail(send, 403, refusal)


async def _send_detail(send, status: int, detail: str) -> None:
    """An answer as FastAPI gives every error, JSON with a `detail`, sent by ASGI middleware."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _hostname(host: str) -> str:
    """The name in a Host header, without its port: "[::1]:8000" -> "::1"."""
    host = host.lower()
    if host.startswith("["):
        return host[1:].split("]")[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _netloc(origin: str) -> str:
    from urllib.parse import urlsplit

    try:
        return urlsplit(origin).netloc.lower()
    except ValueError:
        return ""


def _too_large(option: str, megabytes: float) -> str:
    return f"the upload is over {megabytes:g} MB, this server's limit ({option})"


def serve(config: ServeConfig | None = None, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app with uvicorn until Ctrl-C."""
    require("uvicorn", "ferkit serve", extra="serve")
    import uvicorn

    check_port_free(host, port)
    app = create_app(config, local_only=_is_loopback(host))

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # Ctrl-C, kill: a video being analysed stops at its next frame
            app.state.stopping.set()
            super().handle_exit(sig, frame)

    try:
        Server(uvicorn.Config(app, host=host, port=port, log_level="info")).run()
    finally:  # analyses still waiting for their turn are dropped: a stopped server answers no one
        app.state.analyses.shutdown(wait=False, cancel_futures=True)


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_port_free(host: str, port: int) -> None:
    """A one-line FerkitError, before the model loads, when nothing can listen at host:port (another
    server holds it, or the address is not this machine's)."""
    import errno
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            probe.bind((host, port))
    except OSError as err:
        if isinstance(err, socket.gaierror) or err.errno == errno.EADDRNOTAVAIL:  # not a name or address of this machine
            hint = "--host takes an address of this machine, e.g. 127.0.0.1, or 0.0.0.0 for all of them"
        elif err.errno == errno.EACCES:
            hint = "ports below 1024 need administrator rights; try --port 8000"
        else:
            hint = "is another server there? try --port"
        raise FerkitError(f"cannot listen on {host}:{port}: {err.strerror or err} ({hint})") from None


async def _upload(request, accepted: tuple[str, ...], what: str, size_limit: tuple[str, float],
                  also: tuple[str, ...] = ()) -> tuple[bytes, str | None]:
    """The uploaded file's bytes and name (given only by a multipart form): the body itself, or the
    multipart field `file`; 415 for types other than `accepted`'s family and `also`, 413 naming the
    limit (`size_limit`: its option and megabytes) when the body grows over it."""
    from fastapi import HTTPException
    from starlette.exceptions import HTTPException as AnyHTTPException  # the framework's own, raised as the body arrives
    from starlette.requests import ClientDisconnect

    if request.query_params:  # a setting such as ?fps=10 would otherwise be silently ignored
        raise HTTPException(422, f"{request.url.path} takes no query parameters, only the file (got {', '.join(request.query_params)})")
    try:
        return await _read_upload(request, accepted, what, also)
    except ClientDisconnect:  # a cancelled upload: no one is left to answer, and nothing went wrong here
        log.info("%s: the client closed the connection during the upload", request.url.path)
        raise HTTPException(CLIENT_GONE, "the client closed the connection during the upload") from None
    except AnyHTTPException as err:
        if err.status_code == 413:  # the framework's limit, reached as the body arrived
            raise HTTPException(413, _too_large(*size_limit)) from None
        raise


async def _read_upload(request, accepted: tuple[str, ...], what: str, also: tuple[str, ...] = ()) -> tuple[bytes, str | None]:
    from fastapi import HTTPException

    name = None
    # no type at all (what `requests.post(url, data=bytes)` sends) is taken as "some bytes", like octet-stream
    declared = request.headers.get("content-type", "").split(";")[0].strip().lower() or "application/octet-stream"
    if declared == "multipart/form-data":
        form = await request.form()
        try:  # closing the form deletes the files it spooled
            uploads = form.getlist("file")
            if len(uploads) > 1:
                raise HTTPException(422, f"the form holds {len(uploads)} files in 'file'; send one per request")
            upload = uploads[0] if uploads else None
            if not form:  # a body cut short, or a part never closed, parses as an empty form
                raise HTTPException(422, "the form holds no complete field (cut short, or a part not closed?); send the "
                                         "file in a field named 'file'")
            if upload is None or isinstance(upload, str):
                raise HTTPException(422, "the form has no file field 'file'")
            declared = (upload.content_type or "application/octet-stream").lower()  # a file field without a type
            data, name = await upload.read(), upload.filename
        finally:
            await form.close()
    else:
        data = await request.body()
    declared = ALIASES.get(declared, declared)
    family = accepted[0].split("/")[0] + "/"  # what decodes is decided by decoding: image/avif, video/3gpp, ...
    # x-www-form-urlencoded: what `curl --data-binary @photo.jpg` declares unless told otherwise
    if not declared.startswith(family) and declared not in ("application/octet-stream", "application/x-www-form-urlencoded", *also):
        raise HTTPException(415, f"expected {what} (any {family}* type, e.g. {', '.join(accepted)}), not {declared}")
    if not data:
        raise HTTPException(422, f"the request holds no {what.split()[-1]}")
    return data, name


def _format_names(decoders: list[str]) -> str:
    """The image formats this server reads, as people name them (MPO, a camera's JPEG, goes unsaid)."""
    names = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP", "BMP": "BMP", "GIF": "GIF", "TIFF": "TIFF", "AVIF": "AVIF",
             "HEIF": "HEIC"}
    return ", ".join(names[f] for f in decoders if f in names)


def _decode_image(data: bytes, decoders: list[str], max_megapixels: float):
    """A PIL image, decoded in memory as `ferkit predict` decodes a file (a JPEG over the limit at 1/2 to 1/8
    scale): 415 when the bytes are not an image, 413 when it is too large."""
    from fastapi import HTTPException

    from ferkit.images import ImageError, decode_image_bytes

    try:
        return decode_image_bytes(data, max_pixels=int(max_megapixels * 1e6), formats=decoders, name="the image")
    except ImageError as err:
        if err.reason == "over the pixel limit":
            raise HTTPException(413, f"{err} (this server's limit: --max-megapixels {max_megapixels:g})") from None
        if err.reason == "not an image":
            raise HTTPException(415, f"the upload is not an image ferkit can decode ({_format_names(decoders)})") from None
        raise HTTPException(415, f"the image could not be decoded: {err.reason}") from None


# Animations that may be sent as a video, as OpenCV reads them; it reads no animated WebP. A JPEG of several
# pictures (MPO) is a photo.
ANIMATED_TYPES = ("image/gif", "image/png", "image/apng")  # their types, accepted by the video route


def _is_still_image(data: bytes, decoders: list[str]) -> bool:
    """Whether `data` is a photo: an image that is not animated."""
    from PIL import Image, UnidentifiedImageError

    from ferkit.images import DECODE_ERRORS

    try:
        with Image.open(io.BytesIO(data), formats=decoders) as image:
            return image.format == "MPO" or not getattr(image, "is_animated", False)
    except Image.DecompressionBombError:
        return True
    except (UnidentifiedImageError, *DECODE_ERRORS):  # not an image: a video, or bytes OpenCV will refuse
        return False


def _analyze_video_bytes(data: bytes, classifier, detector, config: ServeConfig, name: str | None = None,
                         decoders: tuple[str, ...] | list[str] = IMAGE_FORMATS,
                         client_gone: threading.Event | None = None, server_stopping: threading.Event | None = None,
                         progress=None) -> dict:
    from fastapi import HTTPException

    still = HTTPException(415, "the upload is a still image, not a video: send photos to /v1/analyze (the page's photo mode)")
    if _is_still_image(data, decoders):  # OpenCV would read it as a one-frame video
        raise still

    try:
        require("cv2", "video analysis", extra="video")
        require("matplotlib", "plotting emotions over time", extra="video")
    except FerkitError as err:
        raise HTTPException(501, str(err)) from None
    from ferkit.sources import open_video
    from ferkit.video import analyze_video

    with tempfile.TemporaryDirectory(prefix="ferkit-serve-") as folder:
        path = Path(folder) / "upload.video"
        path.write_bytes(data)
        try:
            capture, info = open_video(path)
        except FerkitError:
            raise HTTPException(415, "the upload is not a video ferkit can decode") from None
        # a still image in a format the photo route does not take (PPM, JPEG 2000, ...): one frame, no more
        one_frame = info.frames <= 1 and capture.read()[0] and not capture.read()[0]
        capture.release()
        if one_frame:
            raise still
        too_long = HTTPException(413, f"the video lasts over {config.max_video_seconds:g} s, this server's limit "
                                      "(--max-video-seconds)")
        if info.frames / info.fps > config.max_video_seconds:  # as the container says (it may not know)
            raise too_long

        length = info.frames / info.fps if info.frames > 0 else None  # as the container says (it may not know)

        def stop_when_too_long(frame: int) -> None:
            if frame / info.fps > config.max_video_seconds:
                raise too_long
            if progress:
                progress(frame / info.fps, length)
            if client_gone is not None and client_gone.is_set():
                log.info("/v1/video: stopped at frame %d, its client left", frame)
                raise HTTPException(CLIENT_GONE, "the client closed the connection")
            if server_stopping is not None and server_stopping.is_set():
                log.info("/v1/video: stopped at frame %d, the server is stopping", frame)
                raise HTTPException(503, "the server is stopping")

        try:
            timeline = analyze_video(path, model=classifier, detector=detector, target_fps=config.video_fps,
                                     progress=stop_when_too_long)
        except FerkitError as err:
            raise HTTPException(422, str(err)) from None
        timeline.source = Path(name).name if name else "uploaded video"  # the plot's title, not the temporary file
        with _PLOTTING:  # pyplot's figures and fonts are shared state
            png = base64.b64encode(timeline.plot(Path(folder) / "emotions.png").read_bytes()).decode()
        table = timeline.to_csv(Path(folder) / "timeline.csv").read_text(encoding="utf-8")
    return timeline.summary(csv=table, plot_png=f"data:image/png;base64,{png}")  # as `ferkit predict --json` says of a video


IMAGE_ERRORS = {
    403: "a request from a page of another site, or addressed to another host",
    413: "an upload over --max-upload-mb, or an image over --max-megapixels",
    415: "not an image this server decodes",
    422: "no file, an empty one, or an image that cannot be analysed",
    503: "too many uploads waiting (Retry-After: when to try again), or the server is stopping",
}
VIDEO_ERRORS = {**IMAGE_ERRORS, 413: "an upload over --max-video-mb, or a video over --max-video-seconds",
                415: "not a video this server reads (a still image, say)", 422: "no file, or one that cannot be analysed",
                501: "the server lacks the video extra (OpenCV, matplotlib)"}


def _error_responses(errors: dict[int, str]) -> dict:
    """OpenAPI: the errors an upload route answers, each a JSON {"detail": why}."""
    detail = {"type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}
    return {code: {"description": text, "content": {"application/json": {"schema": detail}}} for code, text in errors.items()}


def _upload_schema(types: tuple[str, ...]) -> dict:
    """OpenAPI: the request body is the file itself, or a multipart form with it in `file`."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    form = {"schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}, "required": ["file"]}}
    return {"requestBody": {"required": True, "content": {**{t: binary for t in types}, "multipart/form-data": form}}}
