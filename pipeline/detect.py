"""Is this video or image a deepfake? The trained discriminator's verdict, per frame and overall.

    python -m pipeline.detect clip.mp4 --checkpoint runs/dcgan-10ep/checkpoints/step-00012710.pt
    python -m pipeline.detect face.jpg --checkpoint CKPT --json

Frames are sampled as the sharding tool samples Celeb-DF (evenly spaced over the frames that decode),
faces are found and cropped with the same code and settings (dlib HOG, a square 1.3x crop at 256 px unless
the training shards were made otherwise: the checkpoint records their `faces`), put through the
shards' JPEG round trip and the loader's DALI decode and resize, and scored: fake score =
sigmoid(-logit of D). Where a frame has several faces, the largest counts, as in the shards. The overall
score is the mean over frames with a face, as the evaluation's video score, and the verdict compares it
with the threshold calibrated at training time (saved in the checkpoint).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

from pipeline.data.preprocess import FacePreprocessor
from pipeline.errors import UserError
from pipeline.evaluate import load_discriminator, verdict_threshold
from pipeline.faces import DEFAULT_GEOMETRY, FaceCrop, FaceDetector, crop_face
from pipeline.models import fake_score
from shards.cli import positive_int
from shards.video import MAX_VIDEO_FRAMES

log = logging.getLogger(__name__)


class NotMediaError(UserError):
    """The file decodes neither as an image nor as a video."""


class NoFaceError(UserError):
    """No frame looked at shows a face."""


class MediaTooLargeError(UserError):
    """An image or video beyond the pixel or frame limits, refused before it is decoded; `option` is the limit's."""

    def __init__(self, message: str, option: str):
        super().__init__(message)
        self.option = option


class TooSlowError(UserError):
    """Detection ran past its deadline."""


# The containers a person may upload, told by their first bytes (never by the name). MP4 and MOV put
# "ftyp" (or, in old QuickTime files, another atom) at byte 4; AVI is a RIFF file of form "AVI ".
QUICKTIME_ATOMS = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip")
MATROSKA = b"\x1a\x45\xdf\xa3"  # WebM and MKV, whose frame count FFmpeg estimates from the duration (if any)
MAX_PIXELS = 40_000_000  # per image or video frame: an 8K frame is 33 megapixels


def media_kind(head: bytes) -> str | None:
    """"image" or "video" from a file's first 12 bytes, if they are a JPEG, PNG, MP4/MOV, AVI or WebM/MKV."""
    if head.startswith(b"\xff\xd8\xff") or head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image"
    if head[4:8] in QUICKTIME_ATOMS or (head.startswith(b"RIFF") and head[8:12] == b"AVI ") or head.startswith(MATROSKA):
        return "video"
    return None


# Images that are not read here (the decoders are kept to JPEG, PNG and FFmpeg's videos), told by their first 12 bytes so
# that a phone's HEIC photo or a browser's WebP is named as what it is, with the fix, not called "neither image nor video".
HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}


def unread_image_format(head: bytes) -> str | None:
    """The name of an image format that `media_kind` refuses, from a file's first 12 bytes."""
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "AVIF"
    if head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS:  # media_kind would take any ftyp box for a video
        return "HEIC"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WebP"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"BM") and head[6:10] == b"\0\0\0\0":  # BITMAPFILEHEADER's reserved words
        return "BMP"
    if head.startswith((b"II*\0", b"MM\0*")):
        return "TIFF"
    return None


# Video codecs that OpenCV's FFmpeg opens but cannot decode (the opencv-python-headless wheels, 4.x and 5.0, have no
# AV1 decoder: FFmpeg's own needs a hardware decoder, and they link neither libdav1d nor libaom), by CAP_PROP_FOURCC's tag.
# Phones and YouTube make such videos; they are named, with the fix, where a file that decodes no frame is refused.
UNDECODED_CODECS = {"AV01": "AV1", "av01": "AV1"}


def check_media_path(path: Path) -> None:
    if path.is_dir():
        raise UserError(f"{path} is a folder: pass a video or an image file.")
    if not path.is_file():
        raise UserError(f"{path} does not exist: pass a video or an image file.")


def read_frames(path: Path, frames: int, max_pixels: int = MAX_PIXELS, max_video_frames: int = MAX_VIDEO_FRAMES,
                deadline: float | None = None,
                keep: Callable[[np.ndarray], object] | None = None) -> tuple[str, list[tuple[int, object]]]:
    """("image" or "video", [(frame index, RGB)]); the kind is told by the content, never the name, and the
    size is checked from the headers before anything is decoded. A video still decoding at `deadline`
    (time.monotonic()) is a TooSlowError. Frames come shrunk to a long side of 1920 px at most (shards.video.shrink:
    memory and dlib's time), as the shards' video frames do. With `keep`, each frame is `keep(RGB)`, made as the
    frame decodes, so that only one whole frame is held at a time however many are asked for."""
    from PIL import JpegImagePlugin, PngImagePlugin

    from shards.video import NO_FRAME, PAST_DEADLINE, VideoError, codec_tag, probe, sample_frames, shrink

    keep = keep or (lambda rgb: rgb)

    check_media_path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(12)
        kind = media_kind(head)
    except OSError as e:  # not readable by this user, or a device's error
        raise UserError(f"{path} cannot be read ({e.strerror or e}): check its permissions, or copy it somewhere "
                        "readable.") from None
    not_media = NotMediaError(f"{path} is neither an image nor a video that can be decoded: pass a JPEG/PNG image or an "
                              "MP4/MOV, AVI or WebM/MKV video.")
    if fmt := unread_image_format(head):
        raise NotMediaError(f"{path} is a {fmt} image, which is not read here: save it as JPEG or PNG first.")
    if kind is None:
        raise not_media
    if kind == "image":
        # The header alone, by the format's own reader: Image.open refuses images over twice PIL's bomb limit (179
        # megapixels) before their size is known, and --max-pixels may be raised beyond it.
        opener = PngImagePlugin.PngImageFile if head.startswith(b"\x89PNG") else JpegImagePlugin.JpegImageFile
        try:
            with opener(path) as im:
                width, height = im.size
        except Exception:
            raise not_media from None
        _check_pixels(path, width, height, max_pixels)
        image = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise not_media
        kept = keep(cv2.cvtColor(shrink(image), cv2.COLOR_BGR2RGB))
        if deadline is not None and time.monotonic() > deadline:
            raise TooSlowError(f"{path} took too long to check: send a smaller image.")
        return "image", [(0, kept)]
    try:
        claimed, _, width, height = probe(str(path))
        _check_pixels(path, width, height, max_pixels)
        if claimed > max_video_frames:
            raise MediaTooLargeError(f"{path} claims {claimed} frames, more than the limit of {max_video_frames}: send a "
                                     "shorter video.", "--max-video-frames")
        # A frame count estimated wrong would have the faces of up to twice the frames looked at (those the estimate
        # planned, then those the real count gives): such files are counted first, by a decode that converts nothing.
        sampled = sample_frames(str(path), frames, max_video_frames, deadline, keep,
                                count_first=head.startswith(MATROSKA)).frames
        if not sampled:  # frames decoded, and OpenCV converted none of them: no picture to look at
            raise not_media
        return "video", sampled
    except VideoError as e:
        if e.reason.startswith("more than"):
            raise MediaTooLargeError(f"{path} has {e.reason}, the limit: send a shorter video.",
                                     "--max-video-frames") from None
        if e.reason == PAST_DEADLINE:
            raise TooSlowError(f"{path} took too long to check: send a shorter or smaller video.") from None
        if e.reason == NO_FRAME and (codec := UNDECODED_CODECS.get(codec_tag(str(path)))):
            raise NotMediaError(f"{path} is an {codec} video, whose frames are not decoded here: re-encode it as H.264 "
                                "first (ffmpeg's -c:v libx264).") from None
        raise not_media from None


def _check_pixels(path: Path, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise MediaTooLargeError(f"{path} has more pixels than the limit of {max_pixels / 1e6:g} megapixels a frame "
                                 f"(at least {width}x{height}): send a smaller one.", "--max-pixels")


class Detector:
    """The model and the face detector, loaded once; not thread-safe (dlib), so one per thread or a lock.

    With `tools=False` it holds the model alone, and `with_tools()` makes detectors that share it (the app's slots)."""

    def __init__(self, checkpoint: Path, device: str = "cpu", tools: bool = True):
        try:
            self.device = torch.device(device)
        except RuntimeError as e:
            raise UserError(f"--device {device} is not a device ({e}): pass cpu or cuda.") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {device}: this machine has no CUDA device that torch can use: pass --device cpu.")
        if self.device.type == "cuda" and (self.device.index or 0) >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}: pass one of them.")
        self.D, meta = load_discriminator(Path(checkpoint), self.device)
        self.image_size = meta["config"]["data"]["image_size"]
        self.step = meta["step"]
        self.threshold, self.threshold_note = verdict_threshold(meta, checkpoint)
        self.threshold_calibrated = meta["threshold"] is not None
        if self.threshold_note:
            log.warning(self.threshold_note)
        # Faces are found and cropped as the training shards' were (checkpoints from before that record: the
        # sharding tool's defaults).
        self.geometry = meta["faces"] or DEFAULT_GEOMETRY
        self.face_size, self.face_scale = self.geometry["face_size"], self.geometry["face_scale"]
        self.faces, self.preprocess = (self._tools() if tools else (None, None))

    def _tools(self) -> tuple[FaceDetector, FacePreprocessor]:
        """dlib's face detector and a DALI preprocessing pipeline (on the GPU with a CUDA device): neither is thread-safe."""
        return (FaceDetector(upsample=self.geometry["upsample"], landmarks=False),
                FacePreprocessor(self.image_size, self.device))

    def with_tools(self) -> Detector:
        """A detector of its own tools that shares this one's model, which only runs inference."""
        mine = copy.copy(self)
        mine.faces, mine.preprocess = self._tools()
        return mine

    @torch.no_grad()
    def score_faces(self, crops: list[np.ndarray]) -> list[float]:
        """P(fake) of RGB face crops (from `crop`), prepared exactly as the training shards are."""
        return fake_score(self.D(self.preprocess(crops))).cpu().tolist()

    def crop(self, rgb: np.ndarray, face) -> FaceCrop:
        """A face of an RGB frame cropped as the training shards' faces were."""
        return crop_face(rgb, face, self.face_size, self.face_scale)

    def _look(self, rgb: np.ndarray) -> tuple[dict, np.ndarray | None]:
        """One frame's row of the report (without its index) and the crop of the face that counts, if it has one."""
        faces = self.faces.detect(rgb)
        if not faces:
            return {"faces": 0, "score": None}, None
        crops = [self.crop(rgb, f) for f in faces]
        scores = self.score_faces([c.image for c in crops])
        # The largest face counts (faces come largest first), as the shards keep it: evaluation measured, and the
        # threshold was calibrated on, one such face a frame; the most suspicious of several would only ever raise a
        # real video's score.
        row = {"faces": len(faces), "score": scores[0], "box": list(faces[0].box)}
        if len(faces) > 1:
            row["other_faces_max_score"] = max(scores[1:])
        return row, crops[0].image

    def detect(self, path: Path, frames: int = 32, deadline: float | None = None, keep_crops: bool = True,
               **limits) -> tuple[dict, list[np.ndarray]]:
        """The report (JSON-ready) and the scored face crops, one per frame with a face (none without `keep_crops`:
        at 256 px they take 192 KB a frame, and the command line asks for as many frames as a video has).

        `deadline` (time.monotonic()) stops the decoding, and the work between frames; `limits` go to `read_frames`.
        Each frame is looked at as it decodes, and only its face crop is kept."""
        look = self._look if keep_crops else lambda rgb: (self._look(rgb)[0], None)
        kind, looked = read_frames(Path(path), frames, deadline=deadline, keep=look, **limits)
        results, crops_kept = [], []
        for index, (row, crop) in looked:
            results.append({"frame": index, **row})
            if crop is not None:
                crops_kept.append(crop)
        scored = [r["score"] for r in results if r["score"] is not None]
        if not scored:
            raise NoFaceError(f"no face was found in {path} ({len(results)} frames looked at): the detector needs a visible frontal face.")
        scores_arr = np.array(scored)
        score = float(scores_arr.mean())
        notes = [self.threshold_note] if self.threshold_note else []
        if any(r["faces"] > 1 for r in results):
            notes.append("some frames show several faces; each frame's largest face counts, as in training and evaluation "
                         "(the others' highest score is shown beside it)")
        if len(scored) < len(results):
            notes.append(f"{len(results) - len(scored)} of {len(results)} frames had no face and were not scored")
        return {
            "file": str(path), "kind": kind, "checkpoint_step": self.step, "frames_looked_at": len(results),
            "frames_with_face": len(scored), "frames_without_face": len(results) - len(scored),
            "frames": results, "score": score, "score_min": float(scores_arr.min()), "score_max": float(scores_arr.max()),
            "threshold": self.threshold, "threshold_calibrated": self.threshold_calibrated,
            "verdict": "fake" if score > self.threshold else "real", "notes": notes,
        }, crops_kept


def report_text(result: dict) -> str:
    lines = [f"{result['file']} ({result['kind']}): {len(result['frames'])} frames looked at, {result['frames_with_face']} with a face"]
    for r in result["frames"]:
        lines.append(f"  frame {r['frame']:5d}: " + (f"fake score {r['score']:.3f}" + (f" (the largest of {r['faces']} faces; the others "
                                                                                   f"up to {r['other_faces_max_score']:.3f})" if r["faces"] > 1 else "")
                                                   if r["score"] is not None else "no face"))
    lines += [f"  note: {n}" for n in result["notes"]]
    lines.append(f"verdict: {result['verdict'].upper()} (mean fake score {result['score']:.3f}; fake above {result['threshold']:.3f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.detect", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="a video or an image")
    parser.add_argument("--checkpoint", type=Path, required=True, help="a training checkpoint (<run>/checkpoints/step-N.pt)")
    parser.add_argument("--frames", type=positive_int, default=32, help="frames sampled from a video (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-pixels", type=positive_int, default=MAX_PIXELS,
                        help="per image or video frame, refused above (default: %(default)s)")
    parser.add_argument("--max-video-frames", type=positive_int, default=MAX_VIDEO_FRAMES,
                        help="frames decoded at most, refused above (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        check_media_path(args.path)  # before the checkpoint loads: a mistyped path costs no wait
        result, _ = Detector(args.checkpoint, args.device).detect(args.path, args.frames, keep_crops=False,
                                                                  max_pixels=args.max_pixels,
                                                                  max_video_frames=args.max_video_frames)
    except UserError as e:
        # Here the limits are the user's own: say which one to raise.
        more = f" To check it all the same, raise {e.option}." if isinstance(e, MediaTooLargeError) else ""
        print(f"error: {e}{more}", file=sys.stderr)
        return e.exit_code
    print(json.dumps(result, indent=2) if args.json else report_text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
