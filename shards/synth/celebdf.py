"""A synthetic Celeb-DF v2 in the exact layout of the real one, for the demo and the tests.

Real videos pan and zoom over real face photos that ship inside wheels (matplotlib's
`grace_hopper.jpg`, scikit-image's `astronaut.png`), so that dlib finds real faces in them. Each
"celebrity" is one photo, maybe mirrored, with its own colour cast. A fake `id<t>_id<d>_<j>` reuses the
camera path of the target's real video `id<t>_<j>` over the target's photo with the donor's face pasted
in, leaving the marks real face swaps leave: a blending seam, a colour mismatch and a blurrier face.

`write_celebdf_photos` writes the same layout from about 937 real people (`shards.synth.photos`), with
face swaps made as swap tools make them (`shards.synth.swap`) and a test list of the test people only.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.faces import FaceDetector
from shards.synth import swap
from shards.synth.common import staged_folder
from shards.synth.photos import blur_outside

FRAME_W, FRAME_H, FPS = 320, 240, 25


def _package_file(package: str, rel: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the synthetic Celeb-DF needs the package {package}: pip install it")
    return Path(spec.submodule_search_locations[0]) / rel


def photo_paths() -> list[Path]:
    return [
        _package_file("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
        _package_file("skimage", "data/astronaut.png"),
    ]


@functools.lru_cache(maxsize=None)
def _base_photos() -> tuple[np.ndarray, ...]:
    grace, astronaut = (cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in photo_paths())
    # The astronaut's suit badge is a second "face" to dlib; the upper part holds her face alone.
    return grace, np.ascontiguousarray(astronaut[:300, 40:440])


@dataclass(frozen=True)
class Portrait:
    image: np.ndarray  # RGB
    landmarks: np.ndarray  # [68, 2]
    box: tuple[int, int, int, int]


@functools.lru_cache(maxsize=None)
def _detector() -> FaceDetector:
    return FaceDetector(upsample=1, landmarks=True)


@functools.lru_cache(maxsize=64)
def portrait(person: int, seed: int) -> Portrait:
    """Person k: a base photo, mirrored for some, with a colour cast of its own."""
    photos = _base_photos()
    img = photos[person % len(photos)]
    if (person // len(photos)) % 2:
        img = img[:, ::-1]
    rng = np.random.default_rng([seed, 2, person])
    cast = rng.uniform(0.8, 1.2, 3)
    img = np.ascontiguousarray(np.clip(img * cast, 0, 255).astype(np.uint8))
    face = _detector().largest(img)
    if face is None:
        raise RuntimeError(f"dlib found no face in synthetic person {person}")
    return Portrait(img, face.landmarks, face.box)


def swap_face(target: Portrait, donor: Portrait, seed: int) -> np.ndarray:
    """The target's photo with the donor's inner face warped onto it, imperfectly on purpose."""
    rng = np.random.default_rng([seed, 3])
    h, w = target.image.shape[:2]
    inner = slice(17, 68)  # brows, eyes, nose, mouth: the points a face swap aligns
    M, _ = cv2.estimateAffinePartial2D(donor.landmarks[inner], target.landmarks[inner])
    warped = cv2.warpAffine(donor.image, M, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    # Resolution mismatch: swap models render the face small and upscale it.
    factor = rng.uniform(0.25, 0.4)
    small = cv2.resize(warped, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
    warped = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    # Colour mismatch: the donor's skin tone is not corrected to the target's.
    warped = np.clip(warped * rng.uniform(0.85, 1.15, 3) + rng.uniform(-12, 12, 3), 0, 255)
    mask = np.zeros((h, w), np.uint8)
    hull = cv2.convexHull(target.landmarks[:27].astype(np.int32))  # jaw line and brows
    cv2.fillConvexPoly(mask, hull, 255)
    mask = cv2.erode(mask, np.ones((5, 5), np.uint8))
    # A narrow feather leaves a visible seam, as many real swaps do.
    alpha = cv2.GaussianBlur(mask, (5, 5), 0).astype(np.float32)[..., None] / 255
    return (warped * alpha + target.image * (1 - alpha)).astype(np.uint8)


def camera_frames(
    image: np.ndarray, box: tuple[int, int, int, int], seed: int, n_frames: int, size: tuple[int, int] = (FRAME_W, FRAME_H)
) -> list[np.ndarray]:
    """A slow pan and zoom that keeps the face in view, with a little sensor noise; `size` is (width, height)."""
    rng = np.random.default_rng([seed, 4])
    frame_w, frame_h = size
    left, top, right, bottom = box
    face_h = bottom - top
    fcx, fcy = (left + right) / 2, (top + bottom) / 2
    zoom = rng.uniform(0.5, 0.75, 2) * frame_h / face_h  # face 50-75% of the frame height
    centre = np.array([fcx, fcy])[None] + rng.uniform(-0.15, 0.15, (2, 2)) * face_h
    frames = []
    for i in range(n_frames):
        t = i / max(1, n_frames - 1)
        s = zoom[0] + (zoom[1] - zoom[0]) * t
        cx, cy = centre[0] + (centre[1] - centre[0]) * t
        M = np.array([[s, 0, frame_w / 2 - s * cx], [0, s, frame_h / 2 - s * cy]])
        frame = cv2.warpAffine(image, M, (frame_w, frame_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        frame = np.clip(frame + rng.normal(0, 2, frame.shape), 0, 255).astype(np.uint8)
        frames.append(frame)
    return frames


def write_video(path: Path, frames: list[np.ndarray], fps: int = FPS) -> None:
    """RGB frames to an MPEG-4 file with OpenCV's own FFmpeg."""
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path}")
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()


def plan_videos(n_videos: int, seed: int) -> tuple[list[tuple[int, int]], list[tuple[int, int, int]], list[int]]:
    """(person, index) of real Celeb videos, (target, donor, index) of fakes, and YouTube persons."""
    if n_videos < 4:
        raise ValueError("a synthetic Celeb-DF needs at least 4 videos")
    n_youtube = max(1, round(0.15 * n_videos))
    n_real = max(2, round(0.35 * n_videos))
    n_fake = n_videos - n_youtube - n_real
    n_people = max(4, math.ceil(n_real / 2))
    per_person = math.ceil(n_real / n_people)
    real = [(p, j) for j in range(per_person) for p in range(n_people)][:n_real]
    candidates = [(t, d, j) for t, j in real for d in range(n_people) if d != t]
    order = np.random.default_rng([seed, 5]).permutation(len(candidates))
    fakes = sorted(candidates[i] for i in order[:n_fake])
    youtube = list(range(n_people, n_people + n_youtube))  # persons of their own
    return real, fakes, youtube


def write_celebdf(
    out: Path,
    n_videos: int,
    seed: int = 0,
    placement: str = "flat",
    test_fraction: float = 0.25,
    frame_size: tuple[int, int] = (FRAME_W, FRAME_H),
) -> Path:
    """Write a synthetic Celeb-DF v2 root at `out`, which must not exist yet; return it.

    `frame_size` (width, height): small by default for fast tests; Celeb-DF's own are about 942x500.
    """
    real, fakes, youtube = plan_videos(n_videos, seed)
    frames_of = lambda key: 50 + int(np.random.default_rng([seed, 6, key]).integers(0, 26))  # noqa: E731
    with staged_folder(out) as root:
        def folder(name: str) -> Path:
            path = root / name / ("videos" if placement == "videos" else "")
            path.mkdir(parents=True, exist_ok=True)
            return path

        listed: list[str] = []
        for p, j in real:
            motion = seed * 1_000_003 + p * 1000 + j
            person = portrait(p, seed)
            frames = camera_frames(person.image, person.box, motion, frames_of(motion), frame_size)
            write_video(folder("Celeb-real") / f"id{p}_{j:04d}.mp4", frames)
            listed.append(f"1 Celeb-real/id{p}_{j:04d}.mp4")
        for t, d, j in fakes:
            target = portrait(t, seed)
            swapped = swap_face(target, portrait(d, seed), seed * 7919 + t * 100 + d)
            motion = seed * 1_000_003 + t * 1000 + j  # the camera path of the real video it was made from
            write_video(folder("Celeb-synthesis") / f"id{t}_id{d}_{j:04d}.mp4", camera_frames(swapped, target.box, motion, frames_of(motion), frame_size))
            listed.append(f"0 Celeb-synthesis/id{t}_id{d}_{j:04d}.mp4")
        for k, p in enumerate(youtube):
            motion = seed * 1_000_003 + 999_000 + k
            person = portrait(p, seed)
            write_video(folder("YouTube-real") / f"{k:05d}.mp4", camera_frames(person.image, person.box, motion, frames_of(motion), frame_size))
            listed.append(f"1 YouTube-real/{k:05d}.mp4")

        rng = np.random.default_rng([seed, 7])
        test = []
        for prefix in ("1 Celeb-real/", "1 YouTube-real/", "0 Celeb-synthesis/"):
            group = [line for line in listed if line.startswith(prefix)]
            k = max(1, round(test_fraction * len(group)))
            test += [group[i] for i in sorted(rng.choice(len(group), k, replace=False))]
        (root / "List_of_testing_videos.txt").write_text("".join(line + "\n" for line in test))
    return out


# ---------------------------------------------------------------- real people

@dataclass(frozen=True)
class PhotoPlan:
    """The videos of a photo Celeb-DF; people are `Person.number`s, so `id<n>` names them."""

    reals: list[tuple[int, int, int]]  # (person, j, photo): Celeb-real/id<person>_<j>.mp4
    youtube: list[tuple[int, int]]  # (person, photo): YouTube-real/<k>.mp4, k counting in this order
    fakes: list[tuple[int, int, int, int]]  # (target, donor, j, donor's photo): Celeb-synthesis/id<t>_id<d>_<j>.mp4
    test: set[int]  # people on the test side


def _side_plan(side: list, rng: np.random.Generator, videos_per_person: int, fakes_per_person: int, youtube_fraction: float):
    """Reals, YouTube videos and fakes among one side's people only, so that no video mixes the sides.

    A YouTube person gets one video and is no one's target or donor: the sharding tool counts every
    YouTube video as a person of its own. Donors are of the same kind as their target (greyscale ORL
    or colour) where possible, as a swap between a greyscale and a colour photo would be trivially seen.
    """
    people = sorted(side, key=lambda p: p.number)
    n_youtube = min(round(youtube_fraction * len(people)), max(0, len(people) - 2))  # two celebrities for a swap
    youtube = {people[i].number for i in rng.permutation(len(people))[:n_youtube]}
    celebs = [p for p in people if p.number not in youtube]
    first_photo = {p.number: int(rng.integers(len(p.photos))) for p in people}
    photo_of = lambda p, j: (first_photo[p.number] + j) % len(p.photos)  # noqa: E731
    reals = [(p.number, j, photo_of(p, j)) for p in celebs for j in range(videos_per_person)]
    youtube_videos = [(p.number, first_photo[p.number]) for p in people if p.number in youtube]
    fakes = []
    for t in celebs:
        others = [d for d in celebs if d.number != t.number]
        alike = [d for d in others if (d.source == "orl") == (t.source == "orl")]
        donors = [(alike or others)[i] for i in rng.permutation(len(alike or others))]
        combos = [(d, j) for j in range(videos_per_person) for d in donors][:fakes_per_person]
        fakes += [(t.number, d.number, j, int(rng.integers(len(d.photos)))) for d, j in combos]
    return reals, youtube_videos, fakes


def plan_photo_videos(train_people: list, test_people: list, seed: int, videos_per_person: int = 1,
                      fakes_per_test_person: int = 2, fakes_per_train_person: int = 1, youtube_fraction: float = 0.2) -> PhotoPlan:
    rng = np.random.default_rng([seed, 8])
    plan = PhotoPlan([], [], [], {p.number for p in test_people})
    for side, n_fakes in ((train_people, fakes_per_train_person), (test_people, fakes_per_test_person)):
        reals, youtube, fakes = _side_plan(side, rng, videos_per_person, n_fakes, youtube_fraction)
        plan.reals.extend(reals)
        plan.youtube.extend(youtube)
        plan.fakes.extend(fakes)
    plan.reals.sort(), plan.youtube.sort(), plan.fakes.sort()
    return plan


def _framed(photo: np.ndarray, box: tuple[int, int, int, int], frame_size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The photo with room around it for camera_frames' widest view, and the face box in it.

    The camera shows up to twice the face height vertically (the face is 50-75% of the frame) and pans
    by 15% of it; small photos such as ORL's need that room, which camera_frames would fill by mirroring.
    """
    frame_w, frame_h = frame_size
    left, top, right, bottom = box
    face_h = bottom - top
    cx, cy = (left + right) / 2, (top + bottom) / 2
    reach_x, reach_y = face_h * (frame_w / frame_h + 0.2), face_h * 1.2
    h, w = photo.shape[:2]
    pads = [max(0, int(np.ceil(v))) for v in (reach_y - cy, cy + reach_y - h, reach_x - cx, cx + reach_x - w)]
    if not any(pads):
        return photo, box
    padded = cv2.copyMakeBorder(photo, *pads, cv2.BORDER_REPLICATE)
    inside = cv2.copyMakeBorder(np.ones((h, w), np.float32), *pads, cv2.BORDER_CONSTANT, value=0)
    return blur_outside(padded, inside), (left + pads[2], top + pads[0], right + pads[2], bottom + pads[0])


def write_celebdf_photos(
    out: Path, train_people: list, test_people: list, seed: int = 0, frame_size: tuple[int, int] = (FRAME_W, FRAME_H),
    videos_per_person: int = 1, fakes_per_test_person: int = 2, youtube_fraction: float = 0.2,
    fakes_per_train_person: int = 1, frames_per_video: int = 60, placement: str = "flat",
) -> Path:
    """Write a Celeb-DF v2 root of real people (`shards.synth.photos.Person`) at `out`, which must not exist yet.

    Celebrities are `id<number>`. List_of_testing_videos.txt holds exactly the videos of the test
    people (their reals, YouTube videos and the fakes among them), so the training pool holds train
    people only. A fake uses the camera path and photo of its target's real video `id<t>_<j>`.
    """
    by_number = {p.number: p for p in [*train_people, *test_people]}
    plan = plan_photo_videos(train_people, test_people, seed, videos_per_person, fakes_per_test_person,
                             fakes_per_train_person, youtube_fraction)
    motion = lambda n, j: seed * 1_000_003 + n * 1000 + j  # noqa: E731  the real video's camera, reused by its fakes

    def clip(photo: np.ndarray, k: int, n: int, j: int) -> list[np.ndarray]:
        framed, box = _framed(photo, by_number[n].boxes[k], frame_size)
        return camera_frames(framed, box, motion(n, j), frames_per_video, frame_size)

    with staged_folder(out) as root:
        def folder(name: str) -> Path:
            path = root / name / ("videos" if placement == "videos" else "")
            path.mkdir(parents=True, exist_ok=True)
            return path

        listed = []
        for n, j, k in plan.reals:
            write_video(folder("Celeb-real") / f"id{n}_{j:04d}.mp4", clip(by_number[n].photos[k], k, n, j))
            listed.append((n in plan.test, f"1 Celeb-real/id{n}_{j:04d}.mp4"))
        for i, (n, k) in enumerate(plan.youtube):
            write_video(folder("YouTube-real") / f"{i:05d}.mp4", clip(by_number[n].photos[k], k, n, 999))
            listed.append((n in plan.test, f"1 YouTube-real/{i:05d}.mp4"))
        real_photo = {(n, j): k for n, j, k in plan.reals}
        for t, d, j, dk in plan.fakes:
            target, donor, k = by_number[t], by_number[d], real_photo[(t, j)]
            rng = np.random.default_rng([seed, 9, t, d, j])
            swapped = swap.swap_face(target.photos[k], target.landmarks[k], donor.photos[dk], donor.landmarks[dk], rng)
            write_video(folder("Celeb-synthesis") / f"id{t}_id{d}_{j:04d}.mp4", clip(swapped, k, t, j))
            listed.append((t in plan.test, f"0 Celeb-synthesis/id{t}_id{d}_{j:04d}.mp4"))
        (root / "List_of_testing_videos.txt").write_text("".join(line + "\n" for test, line in listed if test))
    return out
