"""Files as cameras, phones and the datasets make them, encoded by FFmpeg's own encoders.

The synthetic datasets are written by OpenCV, whose wheel encodes MPEG-4 Part 2 alone; Celeb-DF's videos are H.264,
a phone's are HEVC or AV1, stored sideways with a rotation to apply, and its photos carry an EXIF orientation.
imageio-ffmpeg's static FFmpeg (a test dependency) makes such files here.
"""

import subprocess

import cv2
import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from shards.synth.celebdf import camera_frames, photo_paths, portrait
from shards.video import even_indices, sample_frames

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


def encode(path, frames: list[np.ndarray], *codec: str, fps: int = 10) -> None:
    """RGB frames to `path` with FFmpeg's encoder `codec` (its arguments)."""
    h, w = frames[0].shape[:2]
    subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
                    "-s", f"{w}x{h}", "-r", str(fps), "-i", "-", *codec, "-pix_fmt", "yuv420p", str(path)],
                   input=b"".join(np.ascontiguousarray(f).tobytes() for f in frames), check=True, timeout=120)


def ffmpeg_frames(path, width: int, height: int) -> np.ndarray:
    """Every frame as FFmpeg itself decodes it (rotation applied), [N, H, W, 3] RGB."""
    raw = subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-i", str(path), "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "-"], capture_output=True, check=True, timeout=120).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)


def face_clip(n_frames: int) -> list[np.ndarray]:
    person = portrait(0, 0)
    return camera_frames(person.image, person.box, seed=1, n_frames=n_frames)


@pytest.mark.parametrize("name, codec", [
    ("celeb.mp4", ("-c:v", "libx264", "-bf", "3", "-g", "12", "-crf", "18")),  # Celeb-DF's codec
    ("phone.mov", ("-c:v", "libx265", "-x265-params", "log-level=error:bframes=3:keyint=12", "-tag:v", "hvc1")),
    ("browser.webm", ("-c:v", "libvpx-vp9", "-g", "12", "-crf", "20", "-b:v", "0")),
])
def test_a_video_gives_the_frames_ffmpeg_gives_at_the_sampled_indices(tmp_path, name, codec):
    # H.264's and HEVC's B-frames are stored out of display order: the frames sampled for the shards (and for
    # detection) must be the ones shown at those indices, every one of them different here.
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(40)]
    path = tmp_path / name
    encode(path, frames, *codec)
    truth = ffmpeg_frames(path, 96, 64)
    sampled = sample_frames(str(path), 7)
    assert sampled.decoded == len(truth) == 40  # (WebM's count is estimated from its duration, the others' stored)
    assert [i for i, _ in sampled.frames] == even_indices(40, 7)
    for i, rgb in sampled.frames:  # two FFmpeg builds convert colours apart by a level or two; frames differ by about 85
        distances = [np.abs(rgb.astype(int) - frame).mean() for frame in truth]
        assert np.argmin(distances) == i and distances[i] < 20, (i, distances[i])


def test_a_phones_portrait_hevc_clip_is_looked_at_upright(smoke_checkpoint, tmp_path):
    # A phone stores a portrait clip sideways, with a display rotation: its faces lie on their side unless the rotation
    # is applied, and dlib finds no face lying down.
    from pipeline.detect import Detector, read_frames

    upright = face_clip(8)
    sideways = tmp_path / "sideways.mov"
    encode(sideways, [np.rot90(f, -1) for f in upright], "-c:v", "libx265", "-x265-params", "log-level=error",
           "-tag:v", "hvc1")
    clip = tmp_path / "IMG_0001.MOV"  # the same stream, with the rotation that shows it upright
    subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-display_rotation", "90", "-i", str(sideways),
                    "-c", "copy", str(clip)], check=True, timeout=60)
    _, looked = read_frames(clip, 3)
    for i, rgb in looked:
        assert rgb.shape == upright[i].shape and np.abs(rgb.astype(int) - upright[i]).mean() < 12, i
    result, _ = Detector(smoke_checkpoint).detect(clip, 3)
    assert result["frames_with_face"] == result["frames_looked_at"] == 3


def test_a_photo_with_an_exif_orientation_is_looked_at_upright(smoke_checkpoint, tmp_path):
    from pipeline.detect import Detector, read_frames

    upright = cv2.imread(str(photo_paths()[0]))[:, :, ::-1]
    photo = Image.fromarray(np.ascontiguousarray(np.rot90(upright)))  # stored turned left,
    exif = photo.getexif()
    exif[0x0112] = 6  # "turn right to show": what a phone held upright writes
    photo.save(tmp_path / "IMG_0002.JPG", quality=95, exif=exif)
    _, [(_, rgb)] = read_frames(tmp_path / "IMG_0002.JPG", 1)
    assert rgb.shape == upright.shape and np.abs(rgb.astype(int) - upright).mean() < 6
    result, _ = Detector(smoke_checkpoint).detect(tmp_path / "IMG_0002.JPG")
    assert result["frames_with_face"] == 1


@pytest.mark.parametrize("container", ["mp4", "webm"])
def test_an_av1_video_is_named_with_the_fix_where_its_frames_do_not_decode(tmp_path, container):
    from pipeline.detect import NotMediaError, read_frames

    path = tmp_path / f"clip.{container}"
    encode(path, face_clip(6), "-c:v", "libaom-av1", "-cpu-used", "8", "-crf", "40")
    if cv2.VideoCapture(str(path)).read()[0]:  # an OpenCV build that decodes AV1 reads it like any other video
        assert len(read_frames(path, 3)[1]) == 3
        return
    with pytest.raises(NotMediaError, match=rf"clip.{container} is an AV1 video, whose frames are not decoded here: "
                                            r"re-encode it as H.264 first \(ffmpeg's -c:v libx264\)\."):
        read_frames(path, 3)
