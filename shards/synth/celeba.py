"""A synthetic CelebA in the exact layout of the real one, for the demo and the tests.

The images are procedural faces (178x218 JPEG, eyes where CelebA's alignment puts them) that vary in
pose, size, skin, hair, expression, accessories, lighting and background, so that a GAN trained on
them has structure to learn. Each image is drawn from its own seeded generator: any image can be
made again alone, in any order, with the same bytes.

`write_celeba_photos` writes the same layout from real people's photos (`shards.synth.photos`), aligned
on the eyes as CelebA aligns, split by person.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from shards.synth.common import staged_folder
from shards.synth.photos import blur_outside

WIDTH, HEIGHT = 178, 218
SCALE = 2  # drawn at twice the size, then downsampled, for smooth edges

ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()
LANDMARK_COLUMNS = [f"{p}_{c}" for p in ("lefteye", "righteye", "nose", "leftmouth", "rightmouth") for c in "xy"]
SKIN = np.array([(255, 224, 196), (241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36), (92, 56, 32)])
HAIR = {"Black_Hair": (28, 24, 22), "Brown_Hair": (101, 62, 32), "Blond_Hair": (222, 190, 122), "Gray_Hair": (165, 165, 160)}
IRIS = np.array([(85, 55, 30), (60, 110, 170), (70, 120, 70), (40, 30, 25)])
SPLIT_FRACTIONS = (162_770 / 202_599, 19_867 / 202_599)  # CelebA's own train and val shares


@dataclass(frozen=True)
class Person:
    """What stays the same across one identity's images."""

    skin: tuple[int, int, int]
    hair: str  # a key of HAIR, or "Bald"
    long_hair: bool
    bangs: bool
    male: bool
    young: bool
    face_w: float  # half-width of the face, in 178x218 pixels
    face_h: float  # half-height
    iris: tuple[int, int, int]
    nose: float  # nose length factor
    lips: tuple[int, int, int]


def make_person(seed: int, identity: int) -> Person:
    rng = np.random.default_rng([seed, 1, identity])
    male = bool(rng.random() < 0.45)
    hair = str(rng.choice(list(HAIR) + ["Bald"], p=[0.35, 0.3, 0.2, 0.1, 0.05] if male else [0.35, 0.3, 0.25, 0.1, 0.0]))
    skin = SKIN[rng.integers(len(SKIN))] + rng.normal(0, 8, 3)
    lips = (160, 70, 80) if not male and rng.random() < 0.5 else tuple(int(c) for c in skin * [0.8, 0.55, 0.55])
    return Person(
        skin=tuple(int(c) for c in np.clip(skin, 0, 255)),
        hair=hair,
        long_hair=bool(not male and rng.random() < 0.8 or male and rng.random() < 0.1),
        bangs=bool(rng.random() < 0.25),
        male=male,
        young=bool(rng.random() < 0.75),
        face_w=float(rng.uniform(33, 43)),
        face_h=float(rng.uniform(47, 57)),
        iris=tuple(int(c) for c in IRIS[rng.integers(len(IRIS))]),
        nose=float(rng.uniform(0.8, 1.25)),
        lips=tuple(int(c) for c in lips),
    )


class _Pen:
    """Draws in face-local coordinates (u right, v down, origin the face centre, 178x218 units)."""

    def __init__(self, img: np.ndarray, cx: float, cy: float, size: float, roll_deg: float):
        self.img, self.cx, self.cy, self.size, self.roll = img, cx, cy, size, roll_deg
        r = np.deg2rad(roll_deg)
        self.c, self.s = np.cos(r), np.sin(r)

    def pt(self, u: float, v: float) -> tuple[float, float]:
        x = self.cx + self.size * (u * self.c - v * self.s)
        y = self.cy + self.size * (u * self.s + v * self.c)
        return x, y

    def _px(self, u: float, v: float) -> tuple[int, int]:
        x, y = self.pt(u, v)
        return int(round(x * SCALE)), int(round(y * SCALE))

    def ellipse(self, u, v, au, av, color, thickness=-1, start=0, end=360, angle=0.0):
        axes = (max(1, int(au * self.size * SCALE)), max(1, int(av * self.size * SCALE)))
        cv2.ellipse(self.img, self._px(u, v), axes, self.roll + angle, start, end, color, thickness, cv2.LINE_AA)

    def line(self, points, color, thickness):
        pts = np.array([self._px(u, v) for u, v in points], np.int32)
        cv2.polylines(self.img, [pts], False, color, max(1, int(thickness * self.size * SCALE)), cv2.LINE_AA)

    def poly(self, points, color):
        cv2.fillPoly(self.img, [np.array([self._px(u, v) for u, v in points], np.int32)], color, cv2.LINE_AA)


def _background(rng: np.random.Generator) -> np.ndarray:
    h, w = HEIGHT * SCALE, WIDTH * SCALE
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    t = ((xx * np.cos(theta) + yy * np.sin(theta)) / np.hypot(w, h) + 1) / 2
    img = (a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]).astype(np.uint8)
    for _ in range(rng.integers(0, 5)):  # out-of-focus shapes behind the person
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.circle(img, centre, int(rng.integers(20, 90)), tuple(int(c) for c in rng.integers(0, 256, 3)), -1)
    return cv2.GaussianBlur(img, (0, 0), 6)


def draw_face(rng: np.random.Generator, person: Person) -> tuple[np.ndarray, dict[str, int], list[int]]:
    """One image: [218, 178, 3] uint8 RGB, its attributes (1/-1) and its 5 landmarks."""
    img = _background(rng)
    roll = float(rng.normal(0, 5))
    yaw = float(np.clip(rng.normal(0, 0.25), -0.5, 0.5))  # shifts the features sideways inside the face
    size = float(rng.uniform(0.9, 1.1))
    cx, cy = WIDTH / 2 + rng.normal(0, 3), 128 + rng.normal(0, 3)
    pen = _Pen(img, cx, cy, size, roll)
    w, h = person.face_w, person.face_h
    skin = person.skin
    shade = tuple(int(c * 0.78) for c in skin)
    hair = HAIR.get(person.hair, skin)
    smiling, mouth_open = bool(rng.random() < 0.5), bool(rng.random() < 0.3)
    glasses, hat = bool(rng.random() < 0.08), bool(rng.random() < 0.05)
    stubble = person.male and bool(rng.random() < 0.3)
    clothes = tuple(int(c) for c in rng.integers(0, 256, 3))

    pen.ellipse(0, h + 62, 75, 42, clothes)  # shoulders
    pen.poly([(-14, h - 20), (14, h - 20), (15, h + 30), (-15, h + 30)], shade)  # neck
    if person.hair != "Bald" and person.long_hair:
        pen.ellipse(0, 5, w + 12, h + 15, hair)
        pen.poly([(-w - 12, 0), (w + 12, 0), (w + 16, h + 35), (-w - 16, h + 35)], hair)
    for side in (-1, 1):  # ears
        pen.ellipse(side * (w - 1), -4, 6, 11, shade)
    pen.ellipse(0, 0, w, h, skin)
    if stubble:
        pen.ellipse(0, h * 0.45, w * 0.85, h * 0.5, tuple(int(c * 0.7) for c in skin), start=0, end=180)
    if person.hair != "Bald":
        top = h * 0.55 if person.bangs else h * 0.75
        pen.ellipse(0, -h * 0.35, w + 3, top, hair, start=180, end=360)

    du = yaw * w * 0.45
    eyes = [(-17 + du, -15.0), (17 + du, -15.0)]
    for i, (u, v) in enumerate(eyes):
        far = (i == 0 and yaw > 0) or (i == 1 and yaw < 0)
        k = 1 - abs(yaw) * 0.6 if far else 1.0  # the far eye foreshortens
        pen.ellipse(u, v, 7 * k, 3.6, (245, 245, 240))
        pen.ellipse(u, v, 3.2 * k, 3.2, person.iris)
        pen.ellipse(u, v, 1.4 * k, 1.4, (10, 10, 10))
        pen.line([(u - 8 * k, v - 8), (u, v - 10 - (not person.male)), (u + 8 * k, v - 8)], tuple(int(c * 0.7) for c in hair), 1.6 if person.male else 1.0)
    nose_len = 17 * person.nose
    nose = (du * 1.2, -14 + nose_len)
    pen.line([(du * 0.8 - 1, -10), (nose[0] - 3, nose[1]), (nose[0] + 3, nose[1])], shade, 1.1)
    mouth_v = nose[1] + 14
    half = 13 + 3 * smiling
    mouth = [(du - half, mouth_v - 2 * smiling), (du + half, mouth_v - 2 * smiling)]
    if mouth_open:
        pen.ellipse(du, mouth_v, half * 0.8, 4 + 2 * smiling, (70, 20, 25))
    if smiling:
        pen.ellipse(du, mouth_v - 3, half, 6, person.lips, thickness=max(1, int(2.2 * size * SCALE)), start=15, end=165)
    else:
        pen.line([mouth[0], (du, mouth_v + 1), mouth[1]], person.lips, 2.2)
    if glasses:
        for u, v in eyes:
            pen.ellipse(u, v, 10, 8, (20, 20, 20), thickness=max(1, int(1.5 * SCALE)))
        pen.line([(eyes[0][0] + 10, -15), (eyes[1][0] - 10, -15)], (20, 20, 20), 1.2)
    if hat:
        pen.ellipse(0, -h * 0.7, w + 18, h * 0.45, clothes, start=180, end=360)

    gain = 1 + 0.18 * np.cos(np.linspace(0, np.pi, img.shape[1]) + rng.uniform(0, np.pi))  # side light
    img = np.clip(img * gain[None, :, None], 0, 255).astype(np.uint8)
    img = cv2.resize(cv2.GaussianBlur(img, (3, 3), 0), (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA)
    img = np.clip(img + rng.normal(0, 2.5, img.shape), 0, 255).astype(np.uint8)

    landmarks = [pen.pt(*eyes[0]), pen.pt(*eyes[1]), pen.pt(*nose), pen.pt(*mouth[0]), pen.pt(*mouth[1])]
    on = {
        "Male": person.male, "Young": person.young, "Smiling": smiling, "Mouth_Slightly_Open": mouth_open,
        "Eyeglasses": glasses, "Wearing_Hat": hat, "Bald": person.hair == "Bald", "Bangs": person.bangs,
        "5_o_Clock_Shadow": stubble, "No_Beard": not stubble, "Pale_Skin": sum(skin) > 640,
        "Straight_Hair": person.long_hair, "Wearing_Lipstick": person.lips == (160, 70, 80), person.hair: True,
    }
    attributes = {name: 1 if on.get(name) else -1 for name in ATTRIBUTES}
    return img, attributes, [int(round(c)) for p in landmarks for c in p]


def _split(i: int, n: int) -> int:
    train, val = SPLIT_FRACTIONS
    return 0 if i < round(train * n) else 1 if i < round((train + val) * n) else 2


def write_celeba(out: Path, n_images: int, seed: int = 0, layout: str = "official", quality: int = 92) -> Path:
    """Write a synthetic CelebA root at `out`, which must not exist yet; return it."""
    n_people = max(2, n_images // 20)  # CelebA has about 20 images a person
    people = [make_person(seed, k) for k in range(n_people)]
    with staged_folder(out) as root:
        images = root / "img_align_celeba" / ("img_align_celeba" if layout == "kaggle" else "")
        images.mkdir(parents=True)
        rows = []
        for i in range(n_images):
            rng = np.random.default_rng([seed, 0, i])
            identity = int(rng.integers(n_people))
            img, attributes, landmarks = draw_face(rng, people[identity])
            name = f"{i + 1:06d}.jpg"
            ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
            (images / name).write_bytes(jpg.tobytes())
            box = [int(v) for v in rng.integers(40, 120, 2)] + [int(v) for v in rng.integers(150, 300, 2)]
            rows.append((name, _split(i, n_images), identity + 1, attributes, landmarks, box))
        (_write_kaggle_lists if layout == "kaggle" else _write_official_lists)(root, rows)
    return out


def _write_official_lists(root: Path, rows) -> None:
    n = len(rows)
    (root / "list_eval_partition.txt").write_text("".join(f"{r[0]} {r[1]}\n" for r in rows))
    (root / "identity_CelebA.txt").write_text("".join(f"{r[0]} {r[2]}\n" for r in rows))
    # The real files right-align numbers with runs of spaces; readers must cope, so we write them alike.
    if rows[0][3] is not None:  # None: people without attributes, and no file claiming they have them
        attr = [f"{n}\n", " ".join(ATTRIBUTES) + " \n"]
        attr += [r[0] + "".join(f" {r[3][a]:2d}" for a in ATTRIBUTES) + "\n" for r in rows]
        (root / "list_attr_celeba.txt").write_text("".join(attr))
    marks = [f"{n}\n", " ".join(LANDMARK_COLUMNS) + " \n"] + [r[0] + "".join(f"{v:6d}" for v in r[4]) + "\n" for r in rows]
    (root / "list_landmarks_align_celeba.txt").write_text("".join(marks))
    bbox = [f"{n}\n", "image_id x_1 y_1 width height \n"] + [r[0] + "".join(f"{v:6d}" for v in r[5]) + "\n" for r in rows]
    (root / "list_bbox_celeba.txt").write_text("".join(bbox))


def _write_kaggle_lists(root: Path, rows) -> None:
    def table(name: str, header: list[str], values) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(values)
        (root / name).write_text(buf.getvalue())

    table("list_eval_partition.csv", ["image_id", "partition"], [(r[0], r[1]) for r in rows])
    if rows[0][3] is not None:
        table("list_attr_celeba.csv", ["image_id", *ATTRIBUTES], [(r[0], *(r[3][a] for a in ATTRIBUTES)) for r in rows])
    table("list_landmarks_align_celeba.csv", ["image_id", *LANDMARK_COLUMNS], [(r[0], *r[4]) for r in rows])
    table("list_bbox_celeba.csv", ["image_id", "x_1", "y_1", "width", "height"], [(r[0], *r[5]) for r in rows])


# ---------------------------------------------------------------- real photos

# Where CelebA's alignment puts the eye centres in its 178x218 images (typical of its landmark list).
CELEBA_EYES = ((69.0, 111.0), (107.0, 111.0))


def five_points(landmarks: np.ndarray, mirrored: bool = False) -> np.ndarray:
    """CelebA's five points from dlib's 68 ([5, 2]: eyes, nose tip, mouth corners, left of the image first).

    dlib's 36-41 is the eye on the image's left; a mirrored photo's 68 points keep their numbers, so
    its left and right swap.
    """
    eyes = [landmarks[36:42].mean(0), landmarks[42:48].mean(0)]
    mouth = [landmarks[48], landmarks[54]]
    if mirrored:
        eyes, mouth = eyes[::-1], mouth[::-1]
    return np.array([eyes[0], eyes[1], landmarks[30], mouth[0], mouth[1]], np.float32)


def _similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """[2, 3]: the rotation, uniform scale and shift taking two points `src` onto two points `dst`."""
    s, d = complex(*(src[1] - src[0])), complex(*(dst[1] - dst[0]))
    a = d / s
    shift = complex(*dst[0]) - a * complex(*src[0])
    return np.array([[a.real, -a.imag, shift.real], [a.imag, a.real, shift.imag]], np.float64)


def align_photo(rgb: np.ndarray, landmarks: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One CelebA-like image (178x218, eyes where CelebA puts them) of a photo, with small random variations.

    Mirror, rotation of up to 5 degrees and scale of up to 5% (CelebA's own alignment is about this
    loose), and a brightness and colour cast, so one photo gives several different images. Returns the
    image and its five points.
    """
    mirrored = bool(rng.random() < 0.5)
    if mirrored:
        rgb = rgb[:, ::-1]
        landmarks = landmarks * [-1, 1] + [rgb.shape[1] - 1, 0]
    points = five_points(landmarks, mirrored)
    M = _similarity(points[:2], np.array(CELEBA_EYES))
    angle, scale = rng.uniform(-5, 5), rng.uniform(0.95, 1.05)
    jitter = cv2.getRotationMatrix2D(tuple(np.mean(CELEBA_EYES, 0)), angle, scale)
    jitter[:, 2] += rng.normal(0, 1.5, 2)
    M = jitter @ np.vstack([M, [0, 0, 1]])
    flags = cv2.INTER_AREA if M[0, 0] ** 2 + M[1, 0] ** 2 < 1 else cv2.INTER_CUBIC
    img = cv2.warpAffine(np.ascontiguousarray(rgb), M, (WIDTH, HEIGHT), flags=flags, borderMode=cv2.BORDER_REPLICATE)
    # Small photos (ORL's 92x112) leave much of the frame outside them.
    img = blur_outside(img, cv2.warpAffine(np.ones(rgb.shape[:2], np.float32), M, (WIDTH, HEIGHT), borderValue=0))
    cast = rng.uniform(0.8, 1.2) * rng.uniform(0.93, 1.07, 3)
    img = np.clip(img * cast + rng.normal(0, 5), 0, 255).astype(np.uint8)
    return img, points @ M[:, :2].T + M[:, 2]


def _person_splits(people: list, seed: int) -> dict[str, int]:
    """person id -> CelebA partition (0 train, 1 val, 2 test), by person in CelebA's 80/10/10 shares."""
    ids = sorted(p.id for p in people)
    order = [ids[i] for i in np.random.default_rng([seed, 22]).permutation(len(ids))]
    n = len(ids)
    n_val = round(SPLIT_FRACTIONS[1] * n)
    n_test = n - round(SPLIT_FRACTIONS[0] * n) - n_val
    if n >= 3:  # every split gets someone
        n_val, n_test = max(1, n_val), max(1, n_test)
    return {pid: 1 if k < n_val else 2 if k < n_val + n_test else 0 for k, pid in enumerate(order)}


def write_celeba_photos(out: Path, people: list, seed: int = 0, images_per_person: int = 10, layout: str = "official",
                        quality: int = 92) -> Path:
    """Write a CelebA root of real people (`shards.synth.photos.Person`) at `out`, which must not exist yet.

    Each person gives `images_per_person` aligned images, cycling over their photos with random
    variations, so that someone with one photo still gives several. Identities are `number + 1`, the
    same people as `id<number>` in the photo Celeb-DF. The attribute list is left out (these people have
    none; the sharding tool does not need it); the boxes in list_bbox_celeba.txt are dlib's, in the photos.
    """
    splits = _person_splits(people, seed)
    with staged_folder(out) as root:
        images = root / "img_align_celeba" / ("img_align_celeba" if layout == "kaggle" else "")
        images.mkdir(parents=True)
        rows = []
        for person in sorted(people, key=lambda p: p.number):
            for i in range(images_per_person):
                k = i % len(person.photos)
                img, points = align_photo(person.photos[k], person.landmarks[k], np.random.default_rng([seed, 23, person.number, i]))
                name = f"{len(rows) + 1:06d}.jpg"
                ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
                (images / name).write_bytes(jpg.tobytes())
                left, top, right, bottom = person.boxes[k]
                box = [left, top, right - left, bottom - top]
                rows.append((name, splits[person.id], person.number + 1, None, [int(round(v)) for v in points.ravel()], box))
        (_write_kaggle_lists if layout == "kaggle" else _write_official_lists)(root, rows)
    return out
