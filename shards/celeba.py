"""CelebA (aligned and cropped) as users have it: the official layout or the Kaggle mirror.

Official: `img_align_celeba/*.jpg` and whitespace-separated `list_*.txt` files (flat in the root, or in
the Google Drive's `Anno/` and `Eval/` folders, the images then possibly in `Img/img_align_celeba/`). Kaggle: `img_align_celeba/img_align_celeba/*.jpg`
and `list_*.csv` files with headers.

Every sample holds the face the way Celeb-DF's samples do, so that the detector trains on the geometry it
is scored on: dlib's largest face, a square 1.3x its box, resized to `face_size` (`jpg`), and its 68
landmarks (`lmk`). Where dlib finds no face, the box comes from CelebA's own five landmarks and the
predictor places the 68 points in it; such samples are counted in the manifest's notes. The original
JPEG bytes are kept too (`orig.jpg`), for the classic DCGAN centre crop (`data.crop: center`).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

import numpy as np

from pipeline.errors import UserError
from pipeline.faces import CELEBA_POINTS, FACE_SCALE, FACE_SIZE, box_from_five_points, crop_face, encode_face_jpeg, landmarks_bytes, require_face_tools, shared_detector
from shards.build import ItemResult, read_list_text, visible_files
from shards.tarwriter import Sample, key_of

SPLIT_OF_PARTITION = {0: "train", 1: "val", 2: "test"}
FALLBACK_NOTE = "no face found by dlib: box from CelebA's landmarks"
LIST_FOLDERS = ("", "Anno", "Eval")  # flat, or as in the official Google Drive folders


@dataclass(frozen=True)
class Layout:
    name: str  # "official" or "kaggle"
    images: Path
    partition: Path
    attributes: Path | None
    landmarks: Path | None
    identity: Path | None


def _find_list(root: Path, stem: str, preferred: str) -> Path | None:
    """`<stem>.<preferred>` (else the other suffix) flat in the root or in Anno/ or Eval/."""
    other = "csv" if preferred == "txt" else "txt"
    for suffix in (preferred, other):
        for folder in LIST_FOLDERS:
            path = root / folder / f"{stem}.{suffix}"
            if path.is_file():
                return path
    return None


def find_layout(root: Path) -> Layout:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"CelebA root {root} is not a folder: pass the folder that holds img_align_celeba/.")
    nested = root / "img_align_celeba" / "img_align_celeba"
    # Kaggle's copy nests the images; so does the official zip unpacked into a folder of its own name (many unzip tools
    # do): the list files, CSV or text, tell the two apart.
    if nested.is_dir():
        name, images, suffix = "kaggle", nested, "csv"
    elif (root / "img_align_celeba").is_dir():
        name, images, suffix = "official", root / "img_align_celeba", "txt"
    elif (root / "Img" / "img_align_celeba").is_dir():  # img_align_celeba.zip unpacked where the Drive keeps it
        name, images, suffix = "official", root / "Img" / "img_align_celeba", "txt"
    else:
        raise UserError(
            f"{root} matches neither CelebA layout: expected img_align_celeba/*.jpg with list_eval_partition.txt "
            "(official) or img_align_celeba/img_align_celeba/*.jpg with list_eval_partition.csv (Kaggle)."
        )
    partition = _find_list(root, "list_eval_partition", suffix)
    if partition is None:
        raise UserError(
            f"{root / f'list_eval_partition.{suffix}'} is missing: the {name} CelebA layout needs it to assign "
            "images to train/val/test; put it in the root (it ships in the dataset's Eval folder)."
        )
    suffix = partition.suffix[1:]
    name = "kaggle" if suffix == "csv" else "official"
    return Layout(
        name,
        images,
        partition,
        _find_list(root, "list_attr_celeba", suffix),
        _find_list(root, "list_landmarks_align_celeba", suffix),
        _find_list(root, "identity_CelebA", suffix),
    )


# ---------------------------------------------------------------- list files

def _rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every non-empty line; CSV or runs of whitespace, CRLF tolerated."""
    text = read_list_text(path)
    if path.suffix == ".csv":
        rows = csv.reader(io.StringIO(text))
        return [(n, [f.strip() for f in r]) for n, r in enumerate(rows, 1) if r and any(f.strip() for f in r)]
    return [(n, line.split()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _no_rows(path: Path) -> UserError:
    return UserError(f"{path} holds no rows: restore that file from the original CelebA download.")


def _bad_line(path: Path, line: int, what: str) -> UserError:
    return UserError(f"{path} line {line} {what}: fix or restore that file from the original CelebA download.")


def _ints(path: Path, line: int, values: list[str], count: int) -> list[int]:
    if len(values) != count:
        raise _bad_line(path, line, f"has {len(values)} values where {count} were expected")
    try:
        return [int(v) for v in values]
    except ValueError:
        raise _bad_line(path, line, "has a value that is not an integer") from None


def read_partition(path: Path) -> dict[str, str]:
    """file name -> split."""
    rows = _rows(path)
    if path.suffix == ".csv" and rows and rows[0][1][:1] == ["image_id"]:
        rows = rows[1:]
    if not rows:
        raise _no_rows(path)
    out = {}
    for line, fields in rows:
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise _bad_line(path, line, f"is {' '.join(fields)!r}, not '<file> <0|1|2>'")
        out[fields[0]] = SPLIT_OF_PARTITION[int(fields[1])]
    return out


def _read_table(path: Path) -> tuple[list[str], dict[str, list[int]]]:
    """Column names and file -> values, for the attribute and landmark lists.

    The .txt files start with a count line and a names line; the .csv files with a header row.
    """
    rows = _rows(path)
    if len(rows) < (2 if path.suffix == ".csv" else 3):  # a header, and the .txt files' count line
        raise _no_rows(path)
    if path.suffix == ".csv":
        names, body = rows[0][1][1:], rows[1:]
    else:
        names, body = rows[1][1], rows[2:]
    table = {fields[0]: _ints(path, line, fields[1:], len(names)) for line, fields in body}
    return names, table


def read_attributes(path: Path) -> dict[str, dict[str, int]]:
    names, table = _read_table(path)
    return {f: dict(zip(names, v)) for f, v in table.items()}


def read_landmarks(path: Path) -> dict[str, dict[str, list[int]]]:
    _, table = _read_table(path)
    if any(len(v) != 2 * len(CELEBA_POINTS) for v in table.values()):
        raise UserError(f"{path} does not have 10 landmark columns: restore it from the original CelebA download.")
    return {f: {p: v[2 * i : 2 * i + 2] for i, p in enumerate(CELEBA_POINTS)} for f, v in table.items()}


def read_identities(path: Path) -> dict[str, int]:
    rows = _rows(path)
    if path.suffix == ".csv" and rows and not rows[0][1][-1].isdigit():
        rows = rows[1:]
    if not rows:
        raise _no_rows(path)
    return {fields[0]: _ints(path, line, fields[1:], 1)[0] for line, fields in rows}


# ---------------------------------------------------------------- the source

def jpeg_problem(data: bytes) -> tuple[str, str] | None:
    """(reason, detail) when `data` is not a complete, decodable JPEG, or None when it is."""
    if not data:
        return "empty file", ""
    if data[:3] != b"\xff\xd8\xff":
        return "not a JPEG", f"starts with {data[:4].hex()}"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # a full decode: PIL raises on truncated or corrupt scan data
    except Exception as e:  # PIL raises OSError, SyntaxError or ValueError for broken files
        return "corrupt JPEG", str(e)
    return None


def sample_key(file_name: str) -> str:
    return key_of(file_name.rsplit(".", 1)[0])


class CelebASource:
    dataset = "celeba"
    item_unit = "img"

    def __init__(self, root: Path, maxcount: int = 10_000, face_size: int = FACE_SIZE, upsample: int = 1):
        self.root = Path(root).resolve()
        self.items_per_shard = maxcount
        self.face_size = face_size
        self.upsample = upsample
        self.layout: Layout | None = None

    def describe(self) -> dict[str, Any]:
        assert self.layout is not None
        lay = self.layout
        files = {k: str(v) if v else None for k, v in
                 [("partition", lay.partition), ("attributes", lay.attributes),
                  ("landmarks", lay.landmarks), ("identity", lay.identity)]}
        return {"root": str(self.root), "layout": lay.name, "images": str(lay.images), "lists": files}

    def content_args(self) -> dict[str, Any]:
        return {"maxcount": self.items_per_shard, "face_size": self.face_size, "face_scale": FACE_SCALE, "upsample": self.upsample}

    def plan(self) -> tuple[dict[str, list[Any]], list[dict[str, Any]]]:
        require_face_tools()
        self.layout = lay = find_layout(self.root)
        partition = read_partition(lay.partition)
        attributes = read_attributes(lay.attributes) if lay.attributes else {}
        landmarks = read_landmarks(lay.landmarks) if lay.landmarks else {}
        identities = read_identities(lay.identity) if lay.identity else {}
        present = {p.name: p for p in visible_files(lay.images) if p.suffix.lower() in (".jpg", ".jpeg")}
        if not present:
            raise UserError(f"{lay.images} holds no .jpg image: unpack img_align_celeba.zip there.")
        if not present.keys() & partition.keys():
            raise UserError(f"none of the {len(present)} images in {lay.images} is named in {lay.partition}: the two come from "
                            "different copies of CelebA; restore the list from the download the images came from.")

        skipped = [{"file": f, "reason": "listed in partition file but missing"} for f in sorted(partition) if f not in present]
        skipped += [{"file": f, "reason": "image not in partition file"} for f in sorted(present) if f not in partition]
        items: dict[str, list[Any]] = {"train": [], "val": [], "test": []}
        for f in sorted(set(partition) & set(present)):
            split = partition[f]
            meta: dict[str, Any] = {"source": "celeba", "split": split, "file": f}
            if f in identities:
                meta["identity"] = identities[f]
            if f in attributes:
                meta["attributes"] = attributes[f]
            if f in landmarks:
                meta["celeba_landmarks"] = landmarks[f]
            stat = present[f].stat()
            items[split].append((str(present[f]), (stat.st_size, stat.st_mtime_ns), meta))
        return items, skipped

    def item_id(self, item: Any) -> str:
        path, (size, mtime_ns), meta = item
        return f"{meta['file']} {size} {mtime_ns} {json.dumps(meta, sort_keys=True)}"

    def process(self, item: Any) -> ItemResult:
        path, _, meta = item
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            return ItemResult(skipped=[{"file": meta["file"], "reason": "unreadable file", "detail": str(e)}])
        problem = jpeg_problem(data)
        if problem:
            reason, detail = problem
            return ItemResult(skipped=[{"file": meta["file"], "reason": reason, "detail": detail}])
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(im.convert("RGB"))
        meta = {**meta, "width": rgb.shape[1], "height": rgb.shape[0]}
        detector = shared_detector(self.upsample, True)
        face, notes = detector.largest(rgb), []
        if face is None:
            if "celeba_landmarks" not in meta:
                return ItemResult(skipped=[{"file": meta["file"], "reason": "no face found and no CelebA landmarks"}])
            face = detector.at(rgb, box_from_five_points(meta["celeba_landmarks"]))
            notes.append({"file": meta["file"], "note": FALLBACK_NOTE})
        crop = crop_face(rgb, face, self.face_size, FACE_SCALE)
        meta.update(crop.to_json(), face_found_by="dlib" if not notes else "celeba_landmarks")
        fields = {
            "jpg": encode_face_jpeg(crop.image),
            "orig.jpg": data,  # the file byte for byte, for the DCGAN's centre crop
            "lmk": landmarks_bytes(crop.landmarks, self.face_size),
            "cls": b"0",  # every CelebA image is a real face
            "json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode(),
        }
        return ItemResult(samples=[Sample(sample_key(meta["file"]), fields, label=0)], notes=notes)
