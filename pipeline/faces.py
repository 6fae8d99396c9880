"""Face detection, square face crops and 68-point landmarks, shared by the sharding tool and `detect`.

The field's recipe for Celeb-DF (DeepfakeBench, SelfBlendedImages): dlib's HOG detector with one
upsample on RGB, keep the largest face, crop a square 1.3x the box, resize to 256x256. Using the same
code at sharding and at detection time keeps the detector's input distribution the same.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.errors import UserError

# box_from_five_points: measured with dlib's HOG boxes on real frontal faces (see test_faces).
BOX_SIDE_PER_EYE_MOUTH = 2.3
BOX_CENTRE_BELOW_EYES = 0.5

LANDMARKS_MODEL = "models/shape_predictor_68_face_landmarks.dat"
FACE_SCALE = 1.3  # the crop square's side over the detector box's longer side (DeepfakeBench, SBI)
FACE_SIZE = 256  # the crops' side in pixels, as Celeb-DF is usually prepared
# How the sharding tool crops faces by default (its --face-size and --upsample); shards record theirs in
# manifest["faces"] and checkpoints carry it, for detection to repeat.
DEFAULT_GEOMETRY = {"face_size": FACE_SIZE, "face_scale": FACE_SCALE, "upsample": 1}
JPEG_QUALITY = 95  # of the stored crops; detection repeats this round trip so that its input matches training's
LANDMARK_POINTS = 68
# CelebA's five points, as named in list_landmarks_align_celeba.txt.
CELEBA_POINTS = ("lefteye", "righteye", "nose", "leftmouth", "rightmouth")


@dataclass(frozen=True)
class Face:
    """A detected face in frame pixel coordinates."""

    box: tuple[int, int, int, int]  # (left, top, right, bottom), right/bottom exclusive as in dlib
    landmarks: np.ndarray | None  # [68, 2] float32 (x, y), or None when landmarks were not asked for

    @property
    def area(self) -> int:
        left, top, right, bottom = self.box
        return max(0, right - left) * max(0, bottom - top)


@dataclass(frozen=True)
class FaceCrop:
    """A square crop around a face, resized to `size` pixels, and how it maps back to the frame."""

    image: np.ndarray  # [size, size, 3] uint8 RGB
    face: Face  # in frame coordinates
    square: tuple[int, int, int]  # (left, top, side) of the crop square in frame pixels; may leave the frame
    landmarks: np.ndarray | None  # [68, 2] float32 in crop pixels

    def to_json(self) -> dict:
        left, top, side = self.square
        out = {"box": list(self.face.box), "crop": {"left": left, "top": top, "side": side}}
        if self.landmarks is not None:
            out["landmarks"] = np.round(self.landmarks, 1).tolist()
        return out


def landmarks_model_path() -> Path:
    """The 68-point shape predictor that ships inside the face-recognition-models wheel.

    Found by its spec, not imported: the package's `__init__` imports `pkg_resources`, which new
    setuptools no longer provides.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("The face landmark model is missing: install it with `pip install face-recognition-models`.")
    path = Path(spec.submodule_search_locations[0]) / LANDMARKS_MODEL
    if not path.is_file():
        raise UserError(f"The face landmark model {path} is missing: reinstall face-recognition-models.")
    return path


def require_face_tools() -> None:
    """dlib and the landmark model, checked before a tool writes anything: its workers would each fail without them."""
    try:
        import dlib  # noqa: F401
    except ImportError:
        raise UserError("dlib is missing: install it with `pip install dlib-bin` (`make install` does).") from None
    landmarks_model_path()


class FaceDetector:
    """dlib's frontal HOG detector plus, optionally, the 68-point landmark predictor.

    Not thread-safe; build one per process or thread. Building costs about a second (the
    landmark model is 100 MB).
    """

    def __init__(self, upsample: int = 1, landmarks: bool = True):
        import dlib  # imported here so that modules importing faces stay light

        self.upsample = upsample
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(landmarks_model_path())) if landmarks else None
        self._rect = dlib.rectangle

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """All faces in an RGB uint8 image, largest first."""
        rgb = np.ascontiguousarray(rgb)
        faces = []
        for r in self._detector(rgb, self.upsample):
            faces.append(Face((r.left(), r.top(), r.right(), r.bottom()), self._landmarks(rgb, r)))
        # Ties in area are broken by position so that the choice never depends on dlib's order.
        faces.sort(key=lambda f: (-f.area, f.box))
        return faces

    def largest(self, rgb: np.ndarray) -> Face | None:
        faces = self.detect(rgb)
        return faces[0] if faces else None

    def at(self, rgb: np.ndarray, box: tuple[int, int, int, int]) -> Face:
        """The face in a box found by other means, with the 68 landmarks the predictor places in it."""
        return Face(tuple(int(v) for v in box), self._landmarks(np.ascontiguousarray(rgb), self._rect(*box)))

    def _landmarks(self, rgb: np.ndarray, rect) -> np.ndarray | None:
        """The 68 points the predictor places in a dlib rectangle, or None without a predictor."""
        if self._predictor is None:
            return None
        return np.array([(p.x, p.y) for p in self._predictor(rgb, rect).parts()], dtype=np.float32)


def square_around(box: tuple[int, int, int, int], scale: float) -> tuple[int, int, int]:
    """(left, top, side) of a square `scale` times the box's longer side, centred on the box."""
    left, top, right, bottom = box
    side = max(1, int(round(scale * max(right - left, bottom - top))))
    cx, cy = (left + right) / 2, (top + bottom) / 2
    return int(round(cx - side / 2)), int(round(cy - side / 2)), side


def crop_face(rgb: np.ndarray, face: Face, size: int = 256, scale: float = 1.3) -> FaceCrop:
    """Cut the square around `face` (zero padding where it leaves the frame) and resize it to `size`."""
    h, w = rgb.shape[:2]
    left, top, side = square_around(face.box, scale)
    # Pad rather than clamp, so that the crop stays square and the face stays centred at the edges.
    pad = max(0, -left, -top, left + side - w, top + side - h)
    src = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0) if pad else rgb
    patch = src[top + pad : top + pad + side, left + pad : left + pad + side]
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    image = cv2.resize(patch, (size, size), interpolation=interp)
    landmarks = None
    if face.landmarks is not None:
        landmarks = (face.landmarks - np.array([left, top], np.float32)) * (size / side)
    return FaceCrop(image, face, (left, top, side), landmarks)


@functools.lru_cache(maxsize=None)
def shared_detector(upsample: int = 1, landmarks: bool = True) -> FaceDetector:
    """One detector per process and setting, for worker processes that handle many items."""
    return FaceDetector(upsample=upsample, landmarks=landmarks)


def box_from_five_points(points: dict[str, list[float]]) -> tuple[int, int, int, int]:
    """The box dlib's detector would draw around a face, estimated from CelebA's five landmarks.

    For faces where dlib finds none: the box's centre and side follow the eye centre and the
    eye-to-mouth distance with ratios measured on dlib's own boxes (`test_faces` checks them on real
    photos): the side is 2.3 eye-to-mouth distances, the centre half of that distance below the eyes.
    """
    eyes = (np.array(points["lefteye"], np.float32) + np.array(points["righteye"], np.float32)) / 2
    mouth = (np.array(points["leftmouth"], np.float32) + np.array(points["rightmouth"], np.float32)) / 2
    d = float(np.linalg.norm(mouth - eyes))
    axis = (mouth - eyes) / max(d, 1e-6)
    cx, cy = eyes + axis * BOX_CENTRE_BELOW_EYES * d
    half = BOX_SIDE_PER_EYE_MOUTH * d / 2
    return int(round(cx - half)), int(round(cy - half)), int(round(cx + half)), int(round(cy + half))


def encode_face_jpeg(image: np.ndarray) -> bytes:
    """An RGB crop as the shards store it (OpenCV, quality 95)."""
    ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("OpenCV failed to encode a JPEG")
    return jpg.tobytes()


def landmarks_bytes(landmarks: np.ndarray | None, size: int) -> bytes:
    """68 (x, y) in crop pixels -> the shards' `lmk` member: 68 x 2 float32, little-endian, in [0, 1] of the crop.

    Normalized, so they follow any resize of the crop; NaN where there are none, so every sample has the
    member and DALI's batches stay dense.
    """
    if landmarks is None:
        return np.full((LANDMARK_POINTS, 2), np.nan, "<f4").tobytes()
    return (np.asarray(landmarks, np.float32) / size).astype("<f4").tobytes()
