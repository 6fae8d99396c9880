"""The detector as a web app: upload a video or an image, get a verdict per frame and overall.

    python -m pipeline.app --checkpoint runs/dcgan-10ep/checkpoints/step-00012710.pt --port 5000

Pages: `/` (upload), `POST /detect` (result page: verdict, score, per-frame plot, face thumbnails).
API: `POST /api/detect` (multipart field `file`), described at `/openapi.json` and `/docs`; `/health`.
The model loads once. Uploads are streamed to a private temporary folder under a fixed name (nothing a
user sends becomes a path), limited in size, judged by their content, and deleted after use.
"""

from __future__ import annotations

import argparse
import base64
import copy
import html
import io
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import cv2
from fastapi import FastAPI, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel

from pipeline import __version__
from pipeline.data.preprocess import FacePreprocessor
from pipeline.detect import Detector, NoFaceError, NotMediaError
from pipeline.errors import UserError
from pipeline.faces import FaceDetector

CHUNK = 1 << 20


class FrameScore(BaseModel):
    frame: int
    faces: int
    score: float | None  # P(fake) of the frame's most suspicious face; null without a face
    box: list[int] | None = None  # that face in frame pixels: left, top, right, bottom


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
    verdict: str  # fake | real
    notes: list[str]


class Problem(BaseModel):
    detail: str


ERRORS = {400: "the request has no file, or the upload is empty or unreadable", 413: "the upload is larger than the limit",
          415: "the upload is neither an image nor a video", 422: "no face was found"}


class Service:
    """One model for all requests; one dlib face detector and one DALI preprocessing pipeline per request
    thread (neither is thread-safe)."""

    def __init__(self, checkpoint: Path, device: str = "cpu", max_upload_mb: int = 200, frames: int = 32):
        self.template = Detector(checkpoint, device)
        self.max_bytes = max_upload_mb << 20
        self.frames = frames
        self._local = threading.local()

    def detector(self) -> Detector:
        if not hasattr(self._local, "detector"):
            mine = copy.copy(self.template)  # shares D, which only runs inference
            mine.faces = FaceDetector(upsample=self.template.faces.upsample, landmarks=False)
            mine.preprocess = FacePreprocessor(self.template.image_size, self.template.device)
            self._local.detector = mine
        return self._local.detector

    def run(self, upload: UploadFile) -> tuple[dict, list]:
        folder = Path(tempfile.mkdtemp(prefix="deepfake-upload-"))
        try:
            path = folder / "upload"
            size = 0
            with open(path, "wb") as f:
                while chunk := upload.file.read(CHUNK):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise HTTPException(413, f"the upload is larger than {self.max_bytes >> 20} MB: send a shorter video.")
                    f.write(chunk)
            if size == 0:
                raise HTTPException(400, "the upload is empty: choose a video or an image file.")
            try:
                result, thumbnails = self.detector().detect(path, self.frames)
            except UserError as e:
                status = 415 if isinstance(e, NotMediaError) else 422 if isinstance(e, NoFaceError) else 400
                raise HTTPException(status, str(e).replace(str(path), "the upload")) from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        result["file"] = upload.filename or "upload"  # shown to the user, never used as a path
        return result, thumbnails


def _data_uri(png_or_jpg: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(png_or_jpg).decode()}"


def _plot(result: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.6))
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
    plt.close(fig)
    return buf.getvalue()


PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:860px;margin:2em auto;padding:0 1em}}
.verdict{{font-size:2em;font-weight:bold}} .fake{{color:#b00020}} .real{{color:#1b5e20}}
img.thumb{{width:96px;height:96px;margin:2px}} .note{{color:#555}}</style></head><body>{body}</body></html>"""

UPLOAD = """<h1>Is it a deepfake?</h1>
<p>Upload a video or an image with a face. The discriminator of a DCGAN trained on CelebA scores each
sampled frame; read the project's README on what such a detector can and cannot see.</p>
<form action="/detect" method="post" enctype="multipart/form-data">
<input type="file" name="file" id="file" accept="video/*,image/*" required>
<button type="submit" id="submit">Check</button></form>"""


def result_page(result: dict, thumbnails: list) -> str:
    thumbs = "".join(
        f'<img class="thumb" alt="face in frame {r["frame"]}" src="{_data_uri(cv2.imencode(".jpg", cv2.cvtColor(t, cv2.COLOR_RGB2BGR))[1].tobytes(), "image/jpeg")}">'
        for r, t in zip([r for r in result["frames"] if r["score"] is not None], thumbnails)
    )
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in result["notes"])
    body = (f'<h1>{html.escape(result["file"])}</h1>'
            f'<p class="verdict {result["verdict"]}" id="verdict">{result["verdict"].upper()}</p>'
            f'<p id="score">Mean fake score {result["score"]:.3f} over {result["frames_with_face"]} of '
            f'{result["frames_looked_at"]} frames ({result["kind"]}); fake above {result["threshold"]:.3f}, the threshold calibrated at training time.</p>{notes}'
            f'<img alt="fake score per frame" src="{_data_uri(_plot(result), "image/png")}">'
            f'<h2>Faces scored</h2><div>{thumbs}</div><p><a href="/">Check another file</a></p>')
    return PAGE.format(title="Verdict", body=body)


def build_app(service: Service) -> FastAPI:
    app = FastAPI(title="deepfake-gan detector", version=__version__,
                  description="A DCGAN discriminator's verdict on a video or an image, per frame and overall.")
    error_responses = {code: {"model": Problem, "description": text} for code, text in ERRORS.items()}

    @app.exception_handler(RequestValidationError)
    def malformed(request: Request, exc: RequestValidationError) -> JSONResponse:
        # One shape for every 4xx ({"detail": a sentence}); 422 stays "no face was found".
        return JSONResponse({"detail": "the request needs a multipart/form-data field `file` holding a video or an image."},
                            status_code=400)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def upload_page() -> str:
        return PAGE.format(title="Deepfake check", body=UPLOAD)

    @app.post("/detect", response_class=HTMLResponse, include_in_schema=False)
    def detect_page(file: UploadFile) -> HTMLResponse:
        try:
            result, thumbnails = service.run(file)
        except HTTPException as e:
            body = f'<h1>Cannot check this file</h1><p id="error">{html.escape(e.detail)}</p><p><a href="/">Try another</a></p>'
            return HTMLResponse(PAGE.format(title="Error", body=body), status_code=e.status_code)
        return HTMLResponse(result_page(result, thumbnails))

    @app.post("/api/detect", response_model=Detection, responses=error_responses)
    def detect_api(file: UploadFile) -> dict:
        """Score an uploaded video or image (multipart field `file`)."""
        result, _ = service.run(file)
        return result

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "checkpoint_step": service.template.step}

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.app", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface (default: %(default)s)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-upload-mb", type=int, default=200)
    parser.add_argument("--frames", type=int, default=32, help="frames sampled from a video")
    args = parser.parse_args(argv)
    try:
        service = Service(args.checkpoint, args.device, args.max_upload_mb, args.frames)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    import uvicorn

    uvicorn.run(build_app(service), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
