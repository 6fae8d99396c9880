"""The detector as a web app: upload a video or an image, get a verdict per frame and overall.

    python -m pipeline.app --checkpoint runs/dcgan-10ep/checkpoints/step-00012710.pt --port 5000

Pages: `/` (upload), `POST /detect` (result page: verdict, score, per-frame plot, face thumbnails).
API: `POST /api/detect` (multipart field `file`), described at `/openapi.json` and `/docs`; `/health`.

The model loads once. What a person can send is bounded before it costs anything:
- the body: a Content-Length over the limit is answered 413 before a byte of the body is read, a
  body without one (chunked) is counted as it arrives and cut off at the limit, and one still arriving
  after `--upload-timeout-s` is answered 408 (`BodyLimit`);
- the work: at most `--max-concurrent` detections run at once and `--max-waiting` uploads wait for a
  slot, each at most `--queue-timeout-s`; one upload more gets 503 with Retry-After before its body is
  read (`Admission`), and so does one that waited its time out; a detection stops at `--request-timeout-s`.
  At most `--max-concurrent` + `--max-waiting` uploads are thus on disk at once, and however many threads
  they hold, `/health`, the upload page and the error answers run on the event loop, needing none;
- the content: the first bytes must be a JPEG, PNG, MP4/MOV, AVI or WebM/MKV; pixels per frame and
  frames per video are checked from the headers before decoding (pipeline/detect.py).
Uploads go to a private temporary folder under a fixed name (nothing a user sends becomes a path, a
log line or a command) and are deleted after use. Pages carry a content security policy they pass
(one script and one stylesheet, each allowed by its hash; no framing; images only from the page itself)
and `nosniff`. After a CUDA error, which leaves the process's GPU unusable, `/health` and every upload
answer 503 until the server is restarted.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import io
import logging
import queue
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import anyio
import cv2
import torch
from fastapi import FastAPI, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel

from pipeline import __version__
from pipeline.detect import MAX_PIXELS, MAX_VIDEO_FRAMES, Detector, MediaTooLargeError, NoFaceError, NotMediaError, TooSlowError
from pipeline.errors import UserError
from shards.cli import non_negative_float, non_negative_int, positive_float, positive_int

log = logging.getLogger(__name__)

CHUNK = 1 << 20
MULTIPART_OVERHEAD = 64 << 10  # the form's boundaries and part headers around the file, in bytes
RETRY_AFTER_S = 10
BUSY = f"the server is busy with other uploads: try again in {RETRY_AFTER_S} seconds."
DEVICE_FAILED = "the server's GPU failed and the server must be restarted: try again once it has been."
UPLOAD_PATHS = ("/detect", "/api/detect")


class FrameScore(BaseModel):
    frame: int
    faces: int
    score: float | None  # P(fake) of the frame's largest face (the one the shards keep); null without a face
    box: list[int] | None = None  # that face: left, top, right, bottom in the frame as scored (long side <= 1920 px)
    other_faces_max_score: float | None = None  # with several faces: the highest P(fake) among the others


class Detection(BaseModel):
    file: str
    kind: str  # image | video
    checkpoint_step: int
    frames_looked_at: int
    frames_with_face: int
    frames_without_face: int
    frames: list[FrameScore]
    score: float  # mean fake score over frames with a face
    score_min: float
    score_max: float
    threshold: float
    threshold_calibrated: bool  # false: the checkpoint has none, and 0.5 stands in (see notes)
    verdict: str  # fake | real
    notes: list[str]


class Problem(BaseModel):
    detail: str


ERRORS = {400: "the request has no file, or the upload is empty or unreadable",
          408: "the upload was still arriving after the server's upload timeout",
          413: "the upload, its pixels or its frames are beyond the limits, or checking it took too long",
          415: "the upload is neither an image nor a video", 422: "no face was found",
          500: "the detection failed on the server (its log has the details)",
          503: "the server is busy (try again after Retry-After seconds), or its GPU failed and it needs a restart"}


class Service:
    """One model for all requests, and a pool of `max_concurrent` detectors: each holds its own dlib face
    detector and DALI preprocessing pipeline (neither is thread-safe), built on first use and kept, so a
    burst of requests never builds more than the slots it can use."""

    def __init__(self, checkpoint: Path, device: str = "cpu", max_upload_mb: int = 200, frames: int = 32,
                 max_concurrent: int = 2, queue_timeout_s: float = 30.0, request_timeout_s: float = 120.0,
                 max_pixels: int = MAX_PIXELS, max_video_frames: int = MAX_VIDEO_FRAMES, max_waiting: int = 8,
                 upload_timeout_s: float = 300.0):
        self.template = Detector(checkpoint, device, tools=False)  # the model: each slot builds its own tools
        note = self.template.threshold_note
        if note:  # notes reach the users: where the server keeps its files is not theirs to know
            self.template.threshold_note = note.replace(f"checkpoint {checkpoint}", "the server's checkpoint")
        self.max_bytes = max_upload_mb << 20
        self.upload_timeout_s = upload_timeout_s
        self.frames = frames
        # The slots: detections running at once. A slot holds its detector once one has been built.
        self.slots: queue.Queue[Detector | None] = queue.Queue()
        for _ in range(max_concurrent):
            self.slots.put(None)
        self.admitted = max_concurrent + max_waiting  # uploads inside the app at once at most (Admission)
        self.uploads_inside = 0  # reported by /health
        self.detectors_built = 0  # reported by /health
        # A CUDA error (an illegal address, a device-side assert) leaves the process's CUDA context unusable for good:
        # every later detection would fail too. Set, /health answers 503 so that a supervisor restarts the server.
        self.device_failure: str | None = None
        self._count_lock = threading.Lock()
        self.queue_timeout_s, self.request_timeout_s = queue_timeout_s, request_timeout_s
        self.limits = {"max_pixels": max_pixels, "max_video_frames": max_video_frames}

    def _new_detector(self) -> Detector:
        mine = self.template.with_tools()
        with self._count_lock:
            self.detectors_built += 1
        return mine

    def run(self, upload: UploadFile) -> tuple[dict, list]:
        if self.device_failure:
            raise HTTPException(503, DEVICE_FAILED)
        folder = Path(tempfile.mkdtemp(prefix="deepfake-upload-"))
        try:
            path = folder / "upload"
            size = 0
            with open(path, "wb") as f:
                while chunk := upload.file.read(CHUNK):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise HTTPException(413, too_large(self.max_bytes))
                    f.write(chunk)
            if size == 0:
                raise HTTPException(400, "the upload is empty: choose a video or an image file.")
            try:
                detector = self.slots.get(timeout=self.queue_timeout_s)
            except queue.Empty:
                raise HTTPException(503, BUSY, headers={"Retry-After": str(RETRY_AFTER_S)}) from None
            broken = False
            try:
                detector = detector or self._new_detector()
                deadline = time.monotonic() + self.request_timeout_s  # the upload's own time: not the slot's first build
                result, thumbnails = detector.detect(path, self.frames, deadline, **self.limits)
            except UserError as e:
                raise HTTPException(_status(e), str(e).replace(str(path), "the upload")) from None
            except Exception as e:  # a bug, or the machine (memory, CUDA): one sentence here, the traceback in the log
                broken = True
                log.exception("detection failed")
                if isinstance(e, torch.AcceleratorError):  # not an out-of-memory error, after which the GPU still works
                    self.device_failure = f"{type(e).__name__}: " + (str(e).splitlines() or [""])[0]
                raise HTTPException(500, f"checking the upload failed on the server ({type(e).__name__}): try again; "
                                         "if it fails again, the server's log says why.") from None
            finally:
                self.slots.put(None if broken else detector)  # a detector that failed is rebuilt, never reused
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        result["file"] = upload.filename or "upload"  # shown to the user, never used as a path
        return result, thumbnails


def _status(e: UserError) -> int:
    # Too slow is a property of the upload, like its size (413): retrying the same file would fail the same way.
    for kind, status in ((NotMediaError, 415), (NoFaceError, 422), (MediaTooLargeError, 413), (TooSlowError, 413)):
        if isinstance(e, kind):
            return status
    return 400


def too_large(max_bytes: int) -> str:
    """The one sentence for an upload over the limit: from the server (413) and from the upload page's check."""
    return f"the upload is larger than {max_bytes >> 20} MB: send a shorter video."


class BodyLimit:
    """ASGI middleware: request bodies over `max_bytes` get 413 before they are read (Content-Length) or as
    soon as they pass the limit (chunked), so an upload can never fill the disk the form parser spools to;
    a body still arriving `timeout_s` after its headers gets 408, so a stalled or trickling sender holds
    none of `Admission`'s places for longer (uvicorn has no such limit). An answer that the client has not
    taken `timeout_s` after it was ready is dropped for the same reason: uvicorn waits for a client to read
    what it sends, and a result page with its face crops fills the socket's buffers."""

    class Refused(Exception):
        pass

    class Unread(Exception):
        pass

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(scope, send)
        received, refused = 0, False
        # For every read from the client, so for the body's arrival: the app reads nothing from the client after
        # the body (a StreamingResponse would, listening for it to go away), so the detection is not timed here.
        deadline = anyio.current_time() + self.timeout_s

        async def counted():
            nonlocal received, refused
            try:
                with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                    message = await receive()
            except TimeoutError:
                refused = True
                detail = (f"the upload was still arriving after {self.timeout_s:g} s: send it again over a faster "
                          "connection, or a shorter video.")
                await _refusal(scope["path"], 408, detail)(scope, None, send)
                raise BodyLimit.Refused from None
            received += len(message.get("body", b""))
            if received > self.max_bytes and not refused:
                refused = True  # answer now; the form parser may turn the exception below into its own error,
                await self._refuse(scope, send)  # which `answer` then drops
                raise BodyLimit.Refused
            return message

        async def answer(message):
            if refused:
                return
            try:
                with anyio.fail_after(self.timeout_s):
                    await send(message)
            except TimeoutError:
                # Left unfinished, the answer makes uvicorn close the connection (its log says so too).
                log.warning("a client took no answer for %g s: it is dropped, and its place freed", self.timeout_s)
                raise BodyLimit.Unread from None

        try:
            await self.app(scope, counted, answer)
        except (BodyLimit.Refused, BodyLimit.Unread):
            pass

    async def _refuse(self, scope, send):
        await _refusal(scope["path"], 413, too_large(self.max_bytes - MULTIPART_OVERHEAD))(scope, None, send)


class Admission:
    """ASGI middleware: at most `service.admitted` uploads inside the app at once, running, waiting for a slot
    or still arriving (at most `--upload-timeout-s`); one more gets 503 with Retry-After before its body is
    read. That bounds the bodies spooled to disk and the threads uploads hold. (uvicorn's --limit-concurrency
    would refuse /health and the pages too.)"""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in UPLOAD_PATHS:
            return await self.app(scope, receive, send)
        service = self.service  # counted on the event loop alone: nothing runs between its awaits, no lock
        if service.uploads_inside >= service.admitted:
            return await _refusal(scope["path"], 503, BUSY, {"Retry-After": str(RETRY_AFTER_S)})(scope, receive, send)
        service.uploads_inside += 1
        try:
            await self.app(scope, receive, send)
        finally:
            service.uploads_inside -= 1


def _refusal(path: str, status: int, detail: str, headers: dict | None = None) -> Response:
    """An answer sent before the body is read (the connection then closes): the page for a person, else JSON."""
    if path == "/detect":
        response = HTMLResponse(_error_page(detail), status_code=status, headers=headers)
    else:
        response = JSONResponse({"detail": detail}, status_code=status, headers=headers)
    response.headers["connection"] = "close"
    return _secured(response, path)


def _data_uri(png_or_jpg: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(png_or_jpg).decode()}"


def _plot(result: dict) -> bytes:
    # A Figure of its own, not pyplot: requests draw on many threads at once, and pyplot's global figure
    # registry is not thread-safe.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 2.6))
    ax = fig.subplots()
    scored = [(r["frame"], r["score"]) for r in result["frames"] if r["score"] is not None]
    ax.plot([f for f, _ in scored], [s for _, s in scored], "o-", label="fake score")
    ax.axhline(result["threshold"], color="k", linestyle=":", label="threshold")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("frame")
    ax.set_ylabel("P(fake)")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


STYLE = """body{font-family:sans-serif;max-width:860px;margin:2em auto;padding:0 1em}
.verdict{font-size:2em;font-weight:bold} .fake{color:#b00020} .real{color:#1b5e20}
img.thumb{width:96px;height:96px;margin:2px} .note{color:#555}"""
PAGE = ('<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>'
        + STYLE.replace("{", "{{").replace("}", "}}") + "</style></head><body>{body}</body></html>")
# The upload page checks the file's size before sending it: a server that answers 413 before reading the body
# closes the connection under a browser still sending, which shows "connection reset" instead of the sentence.
# The limit and the sentence come from the form's data attributes, so that the script, and its hash, never change.
SIZE_CHECK = """document.getElementById("upload").addEventListener("submit", function (event) {
  var form = event.target, file = document.getElementById("file").files[0];
  if (file && file.size > Number(form.dataset.maxBytes)) {
    event.preventDefault();
    var message = document.getElementById("too-large");
    message.textContent = form.dataset.tooLarge;
    message.hidden = false;
  }
});"""


def _sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


# The pages' policy: the one stylesheet above and the one script by their hashes, images from the page itself
# (the plot and thumbnails are data: URIs), forms posting back here only, and no framing by other sites.
PAGE_POLICY = (f"default-src 'none'; style-src 'sha256-{_sha256(STYLE)}'; script-src 'sha256-{_sha256(SIZE_CHECK)}'; "
               "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer")]

UPLOAD = """<h1>Is it a deepfake?</h1>
<p>Upload a video or an image with a face. The discriminator of a DCGAN trained on CelebA scores each
sampled frame; read the project's README on what such a detector can and cannot see.</p>
<form action="/detect" method="post" enctype="multipart/form-data" id="upload" data-max-bytes="{max_bytes}"
data-too-large="{too_large}">
<input type="file" name="file" id="file" accept="video/*,image/*" required>
<button type="submit" id="submit">Check</button></form>
<p id="too-large" hidden></p>"""


def result_page(result: dict, thumbnails: list) -> str:
    thumbs = "".join(
        f'<img class="thumb" alt="face in frame {r["frame"]}" src="{_data_uri(cv2.imencode(".jpg", cv2.cvtColor(t, cv2.COLOR_RGB2BGR))[1].tobytes(), "image/jpeg")}">'
        for r, t in zip([r for r in result["frames"] if r["score"] is not None], thumbnails)
    )
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in result["notes"])
    threshold = ("the threshold calibrated at training time" if result["threshold_calibrated"]
                 else "a stand-in: this checkpoint has no calibrated threshold")
    body = (f'<h1>{html.escape(result["file"])}</h1>'
            f'<p class="verdict {result["verdict"]}" id="verdict">{result["verdict"].upper()}</p>'
            f'<p id="score">Mean fake score {result["score"]:.3f} over {result["frames_with_face"]} of '
            f'{result["frames_looked_at"]} frames ({result["kind"]}); fake above {result["threshold"]:.3f}, {threshold}.</p>{notes}'
            f'<img alt="fake score per frame" src="{_data_uri(_plot(result), "image/png")}">'
            f'<h2>Faces scored</h2><div>{thumbs}</div><p><a href="/">Check another file</a></p>')
    return PAGE.format(title="Verdict", body=body)


def _error_page(detail: str) -> str:
    body = f'<h1>Cannot check this file</h1><p id="error">{html.escape(detail)}</p><p><a href="/">Try another</a></p>'
    return PAGE.format(title="Error", body=body)


def _secured(response, path: str):
    """The response with the security headers, and the pages' content security policy on the two pages."""
    for name, value in SECURITY_HEADERS:
        response.headers[name.decode()] = value.decode()
    if response.headers.get("content-type", "").startswith("text/html") and path in ("/", "/detect"):
        response.headers["content-security-policy"] = PAGE_POLICY
    return response


def build_app(service: Service) -> FastAPI:
    app = FastAPI(title="deepfake-gan detector", version=__version__,
                  description="A DCGAN discriminator's verdict on a video or an image, per frame and overall.")
    error_responses = {code: {"model": Problem, "description": text} for code, text in ERRORS.items()}

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        return _secured(await call_next(request), request.url.path)

    # Every handler and page but the two uploads is async: it runs on the event loop, never queued behind uploads
    # that hold the threads synchronous code runs on.
    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, exc: RequestValidationError):
        # One shape for every 4xx ({"detail": a sentence}); 422 stays "no face was found". A person gets the page.
        if request.url.path == "/detect":
            return HTMLResponse(_error_page("choose a video or an image file, then press Check."), status_code=400)
        return JSONResponse({"detail": "the request needs a multipart/form-data field `file` holding a video or an image."},
                            status_code=400)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception):
        # Anything that escaped the detection's own handling (drawing the page, a bug): one sentence, as every other
        # error (uvicorn logs the traceback). Starlette answers this from its outermost layer, outside the headers
        # middleware above, so the headers are set here.
        detail = f"the server failed on this request ({type(exc).__name__}): try again; if it fails again, its log says why."
        if request.url.path == "/detect":
            return _secured(HTMLResponse(_error_page(detail), status_code=500), request.url.path)
        return _secured(JSONResponse({"detail": detail}, status_code=500), request.url.path)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def upload_page() -> str:
        form = UPLOAD.format(max_bytes=service.max_bytes, too_large=html.escape(too_large(service.max_bytes)))
        return PAGE.format(title="Deepfake check", body=f"{form}<script>{SIZE_CHECK}</script>")

    @app.post("/detect", response_class=HTMLResponse, include_in_schema=False)
    def detect_page(file: UploadFile) -> HTMLResponse:
        try:
            result, thumbnails = service.run(file)
        except HTTPException as e:
            return HTMLResponse(_error_page(e.detail), status_code=e.status_code, headers=e.headers)
        return HTMLResponse(result_page(result, thumbnails))

    @app.post("/api/detect", response_model=Detection, responses=error_responses)
    def detect_api(file: UploadFile) -> dict:
        """Score an uploaded video or image (multipart field `file`)."""
        result, _ = service.run(file)
        return result

    @app.get("/health")
    async def health() -> JSONResponse:
        state = {"checkpoint_step": service.template.step, "detectors_built": service.detectors_built,
                 "uploads_inside": service.uploads_inside, "uploads_admitted": service.admitted}
        if service.device_failure:
            return JSONResponse({"status": "failed", "detail": service.device_failure, **state}, status_code=503)
        return JSONResponse({"status": "ok", **state})

    app.add_middleware(Admission, service=service)
    app.add_middleware(BodyLimit, max_bytes=service.max_bytes + MULTIPART_OVERHEAD,  # outermost: before any parsing
                       timeout_s=service.upload_timeout_s)
    return app


def _seconds(parse):
    """`parse`, refusing more seconds than Python's locks and queues can wait for (inf among them): a longer
    --queue-timeout-s made every wait for a slot fail with OverflowError."""
    def seconds(text: str) -> float:
        value = parse(text)
        if not value <= threading.TIMEOUT_MAX:
            raise argparse.ArgumentTypeError(f"{text} is more seconds than Python can wait for (at most "
                                             f"{threading.TIMEOUT_MAX:.0f})")
        return value
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.app", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface (default: %(default)s)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-upload-mb", type=positive_int, default=200)
    parser.add_argument("--frames", type=positive_int, default=32, help="frames sampled from a video")
    parser.add_argument("--max-concurrent", type=positive_int, default=2, help="detections running at once (default: %(default)s)")
    parser.add_argument("--max-waiting", type=non_negative_int, default=8,
                        help="uploads waiting for a slot; one more gets 503 at once (default: %(default)s)")
    parser.add_argument("--upload-timeout-s", type=_seconds(positive_float), default=300.0,
                        help="longest time an upload may take to arrive, then 408 (default: %(default)s)")
    parser.add_argument("--queue-timeout-s", type=_seconds(non_negative_float), default=30.0,
                        help="longest wait for a free slot, then 503 (0: no wait)")
    parser.add_argument("--request-timeout-s", type=_seconds(positive_float), default=120.0,
                        help="longest detection, then 413")
    parser.add_argument("--max-pixels", type=positive_int, default=MAX_PIXELS, help="per image or video frame")
    parser.add_argument("--max-video-frames", type=positive_int, default=MAX_VIDEO_FRAMES, help="frames decoded at most")
    args = parser.parse_args(argv)
    try:
        service = Service(args.checkpoint, args.device, args.max_upload_mb, args.frames, args.max_concurrent,
                          args.queue_timeout_s, args.request_timeout_s, args.max_pixels, args.max_video_frames,
                          args.max_waiting, args.upload_timeout_s)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    import uvicorn

    uvicorn.run(build_app(service), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
