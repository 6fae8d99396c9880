"""Evenly spaced frames from a video with OpenCV, trusting only the frames that really decode.

Container frame counts can be wrong (Celeb-DF has such files). We plan from the container's count,
decode to the end (so the real count is known), and in the rare case the two differ, decode again
for the indices the real count gives. The field's spacing is `np.linspace(0, n - 1, k, dtype=int)`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np


PAST_DEADLINE = "decoding ran past its deadline"
NO_FRAME = "no frame decoded"
MAX_VIDEO_FRAMES = 100_000  # frames decoded at most: about 55 minutes at 30 fps (a damaged file may never end)
DEADLINE_EVERY_FRAMES = 16  # the clock is read this often: about a second of 8K video at worst
# Kept frames are shrunk to this long side (pixels) as they decode: 32 frames of 8K video would hold 3.2 GB and cost
# dlib minutes. Celeb-DF's frames are all smaller (942x500 is typical), so its shards never meet it.
MAX_SIDE_PX = 1920


class VideoError(Exception):
    """A video that gives no frames; `reason` is the short text counted in the manifest."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class SampledFrames:
    # (frame index, [H, W, 3] uint8 RGB, long side <= MAX_SIDE_PX), in order; or what `keep` made of that frame
    frames: list[tuple[int, object]]
    decoded: int  # frames that actually decoded
    container_count: int  # what the container claimed
    fps: float
    width: int
    height: int
    unconverted: list[int]  # wanted frames that decoded but that OpenCV failed to convert (retrieve())


def even_indices(n_frames: int, k: int) -> list[int]:
    if n_frames <= 0:
        return []
    return sorted(set(np.linspace(0, n_frames - 1, k, dtype=int).tolist()))


def shrink(rgb: np.ndarray, max_side_px: int = MAX_SIDE_PX) -> np.ndarray:
    """The frame (any channel order) itself, or scaled down (area interpolation) to a long side of `max_side_px`."""
    side = max(rgb.shape[:2])
    if side <= max_side_px:
        return rgb
    scale = max_side_px / side
    size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def _open(path: str) -> cv2.VideoCapture:
    # By its absolute path: FFmpeg reads a relative name with a colon (`take:2.mp4`, `10:30.mov`) as a protocol's URL.
    cap = cv2.VideoCapture(os.path.abspath(path))
    # Upright as the video is shown: a phone's portrait clip is stored sideways with a rotation to apply (OpenCV's
    # default, said here so that no build or version can turn it off under us).
    cap.set(cv2.CAP_PROP_ORIENTATION_AUTO, 1)
    if not cap.isOpened():
        raise VideoError("unreadable video")
    return cap


def _decode(path: str, wanted: set[int], max_frames: int | None = None, deadline: float | None = None,
            keep: Callable[[np.ndarray], object] | None = None) -> tuple[dict[int, object], int]:
    """The wanted frames (RGB, long side at most MAX_SIDE_PX; or `keep` of each, made as it decodes) and the number of
    frames decoded, reading to the end (or past `max_frames`, or `deadline` on time.monotonic(): VideoError)."""
    cap = _open(path)
    frames, n = {}, 0
    try:
        while cap.grab():  # grab() decodes; retrieve() only converts, so call it for wanted frames alone
            if max_frames is not None and n >= max_frames:
                raise VideoError(f"more than {max_frames} frames")
            if deadline is not None and n % DEADLINE_EVERY_FRAMES == 0 and time.monotonic() > deadline:
                raise VideoError(PAST_DEADLINE)
            if n in wanted:
                ok, frame = cap.retrieve()
                if ok:  # converted now: one copy of each kept frame, not a BGR and an RGB one
                    rgb = cv2.cvtColor(shrink(frame), cv2.COLOR_BGR2RGB)
                    frames[n] = rgb if keep is None else keep(rgb)
                    if deadline is not None and time.monotonic() > deadline:  # `keep`'s own time counts too
                        raise VideoError(PAST_DEADLINE)
            n += 1
    finally:
        cap.release()
    return frames, n


def probe(path: str) -> tuple[int, float, int, int]:
    """What the container claims, without decoding a frame: (frame count, fps, width, height)."""
    cap = _open(path)
    try:
        claimed = max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT)))
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        return claimed, fps, int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    finally:
        cap.release()


def codec_tag(path: str) -> str:
    """The video's codec as the container tags it ('h264', 'hevc', 'AV01'), or '' where it has none or cannot be read."""
    try:
        cap = _open(path)
    except VideoError:
        return ""
    try:
        return max(0, int(cap.get(cv2.CAP_PROP_FOURCC))).to_bytes(4, "little").decode("latin-1").strip("\0 ")
    finally:
        cap.release()


def sample_frames(path: str, k: int, max_frames: int | None = None, deadline: float | None = None,
                  keep: Callable[[np.ndarray], object] | None = None, count_first: bool = False) -> SampledFrames:
    """`max_frames` bounds the decoding, whatever the container claims: a longer video is a VideoError; so is
    decoding still going at `deadline` (time.monotonic(); reason PAST_DEADLINE).

    `keep` turns each sampled frame into what is kept of it as soon as it decodes, so that however many frames are
    asked for, one whole frame at a time is held (`pipeline.detect` keeps the face crops and scores). Where the
    container's count is wrong, it also runs for the frames that count planned, and the real count's are decoded
    again; `count_first` plans from the real count instead, found by a first decode that converts no frame."""
    claimed, fps, width, height = probe(path)
    plan = _decode(path, set(), max_frames, deadline)[1] if count_first else claimed
    frames, decoded = _decode(path, set(even_indices(plan, k)), max_frames, deadline, keep)
    if decoded == 0:
        raise VideoError(NO_FRAME)
    wanted = even_indices(decoded, k)
    if set(wanted) != set(frames):
        missing, decoded_again = _decode(path, set(wanted) - set(frames), deadline=deadline, keep=keep)
        if decoded_again != decoded:
            raise VideoError("frame count differs between two decodes")
        frames |= missing  # frames of the first plan that are not wanted now are left out below
    return SampledFrames([(i, frames[i]) for i in wanted if i in frames], decoded, claimed, fps, width, height,
                         [i for i in wanted if i not in frames])
