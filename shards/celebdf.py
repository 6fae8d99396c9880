"""Celeb-DF (v1 or v2) as users have it: face crops from evenly spaced frames of every video.

Labels come from the folder (`*-real` real, `Celeb-synthesis` fake; `cls` 1 = fake) and are checked
against `List_of_testing_videos.txt`, where 1 means REAL. The videos in that list are the test split;
the rest are split into train and val by identity, so that no person is on both sides.

The list's celebrities also appear in the rest (Celeb-DF's 59 celebrities are in most of its test videos), so
a detector trained on the rest's real frames is scored on people it has seen. `exclude_test_people` leaves
every video of a listed person out of train and val (counted), for a score on people never seen.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.faces import FACE_SCALE, FACE_SIZE, crop_face, encode_face_jpeg, landmarks_bytes, require_face_tools, shared_detector
from shards.build import ItemResult, read_list_text, visible_files
from shards.tarwriter import Sample, key_of
from shards.video import MAX_VIDEO_FRAMES, VideoError, sample_frames

# canonical folder name -> label in our convention (1 = fake)
FOLDERS = {"Celeb-real": 0, "YouTube-real": 0, "Celeb-synthesis": 1}
TEST_LIST = "List_of_testing_videos.txt"
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv")
# Unanchored at the end: a copy (`id0_0000 (1).mp4`, a second download) is still that celebrity's, never a new person
# whom the identity split could put on the other side of its original.
CELEB_REAL = re.compile(r"^(id\d+)_\d+")
CELEB_FAKE = re.compile(r"^(id\d+)_(id\d+)_\d+")
COPY_MARK = re.compile(r"(?: - Copy)?(?: \(\d+\))?$")  # what a second download or a file manager's copy appends
# Celeb-DF v2's videos per folder, and those its test list names (DATASETS.md): a copy with v2's folders
# and a list that names other counts has a damaged list, which would move test videos into training.
V2_VIDEOS = {"Celeb-real": 590, "YouTube-real": 300, "Celeb-synthesis": 5639}
V2_TEST_VIDEOS = {"Celeb-real": 108, "YouTube-real": 70, "Celeb-synthesis": 340}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Video:
    folder: str  # canonical name, e.g. "YouTube-real"
    name: str  # file name, e.g. "00170.mp4"
    path: str
    size: int
    mtime_ns: int  # with the size, what tells a replaced file (a repaired download) from the one sharded before
    label: int  # 1 = fake
    identities: tuple[str, ...]  # (person,) for real, (target, donor) for fakes

    @property
    def rel(self) -> str:
        return f"{self.folder}/{self.name}"

    @property
    def stem(self) -> str:
        return self.name.rsplit(".", 1)[0]


def identities_of(folder: str, stem: str) -> tuple[str, ...]:
    """Celebrities are named in the file names; each YouTube video is its own unknown person."""
    if m := CELEB_FAKE.match(stem):
        return m.group(1), m.group(2)
    if m := CELEB_REAL.match(stem):
        return (m.group(1),)
    return (f"{folder.lower()}/{original_stem(stem)}",)


def original_stem(stem: str) -> str:
    """The name a copy was made from: `00170 (1)` and `00170 - Copy` are 00170's."""
    return COPY_MARK.sub("", stem)


def _child_ci(folder: Path, name: str) -> Path | None:
    """The entry of `folder` called `name`, ignoring case (`Youtube-real` appears in the wild)."""
    for entry in sorted(folder.iterdir()):
        if entry.name.lower() == name.lower():
            return entry
    return None


def find_videos(root: Path) -> tuple[dict[str, Path], str]:
    """Video folder per canonical folder name, and which placement was found."""
    if not root.is_dir():
        raise UserError(f"Celeb-DF root {root} is not a folder: pass the folder that holds Celeb-real/ and Celeb-synthesis/.")
    found = {}
    for canonical in FOLDERS:
        folder = _child_ci(root, canonical)
        if folder is not None and folder.is_dir():
            videos = _child_ci(folder, "videos")
            if videos is not None and videos.is_dir():
                # One place a folder: flat videos beside videos/ (a move tool stopped halfway) would be left out unseen.
                if flat := [p.name for p in visible_files(folder) if p.suffix.lower() in VIDEO_SUFFIXES]:
                    raise UserError(f"{folder} holds videos both in {videos.name}/ and beside it ({flat[0]}, ...): move them "
                                    "all into one of the two, then run again.")
                folder = videos
            found[canonical] = folder
    if not found:
        raise UserError(
            f"{root} matches no Celeb-DF layout: expected the folders Celeb-real/, YouTube-real/ and "
            "Celeb-synthesis/ (videos directly inside or in <folder>/videos/)."
        )
    placements = {"<folder>/videos/*.mp4" if p.name.lower() == "videos" else "<folder>/*.mp4" for p in found.values()}
    return found, " and ".join(sorted(placements))


def read_test_list(path: Path, videos: dict[tuple[str, str], Video]) -> set[str]:
    """The `rel` of every listed video, after checking each exists and agrees with its folder."""
    listed = set()
    for n, line in enumerate(read_list_text(path).splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[0] not in ("0", "1") or "/" not in fields[1]:
            raise UserError(f"{path} line {n} is {line.strip()!r}, not '<1 real|0 fake> <folder>/<video>': fix that line.")
        folder, name = fields[1].split("/", 1)
        video = videos.get((folder.lower(), name.split("/")[-1]))
        if video is None:
            raise UserError(f"{path} line {n} names {fields[1]}, which is not among the videos under {path.parent}: restore that video or the original list.")
        list_says_real = fields[0] == "1"
        if list_says_real != (video.label == 0):
            raise UserError(
                f"{path} line {n} labels {fields[1]} {'real' if list_says_real else 'fake'} (1 means real in this file), "
                f"but its folder {video.folder} holds {'fake' if video.label else 'real'} videos: correct the line or move the video."
            )
        listed.add(video.rel)
    if not listed:
        raise UserError(f"{path} lists no video, so Celeb-DF would have no test split: restore it from the download "
                        f"(v2's lists {sum(V2_TEST_VIDEOS.values())}).")
    return listed


def _per_folder(videos: list[Video]) -> dict[str, int]:
    return {folder: sum(v.folder == folder for v in videos) for folder in FOLDERS}


def check_test_list(path: Path, videos: list[Video], listed_videos: list[Video]) -> dict[str, int]:
    """The test split's videos per folder; a warning where the videos are v2's and the list is not."""
    listed = _per_folder(listed_videos)
    if _per_folder(videos) == V2_VIDEOS and listed != V2_TEST_VIDEOS:
        log.warning("%s lists %d videos (%s) where Celeb-DF v2's lists %d (%s): the videos it leaves out go to "
                    "training; restore it from the download unless that is intended.", path, sum(listed.values()),
                    ", ".join(f"{n} {f}" for f, n in listed.items()), sum(V2_TEST_VIDEOS.values()),
                    ", ".join(f"{n} {f}" for f, n in V2_TEST_VIDEOS.items()))
    return listed


def split_identities(people: set[str], val_fraction: float, seed: int, min_val: int) -> set[str]:
    """The people who go to val: a seeded draw, at least `min_val`, never everyone; nobody at val_fraction 0."""
    ordered = sorted(people)
    random.Random(seed).shuffle(ordered)
    if len(ordered) < 2 or val_fraction == 0:
        return set()
    n_val = min(len(ordered) - 1, max(min_val, round(val_fraction * len(ordered))))
    return set(ordered[:n_val])


class CelebDFSource:
    dataset = "celebdf"
    item_unit = "video"

    def __init__(
        self,
        root: Path,
        frames_per_video: int = 32,
        face_size: int = FACE_SIZE,
        face_scale: float = FACE_SCALE,
        maxcount: int = 10_000,
        val_fraction: float = 0.1,
        seed: int = 0,
        upsample: int = 1,
        exclude_test_people: bool = False,
    ):
        self.root = Path(root).resolve()
        self.frames_per_video = frames_per_video
        self.face_size = face_size
        self.face_scale = face_scale
        self.maxcount = maxcount
        self.items_per_shard = max(1, maxcount // frames_per_video)  # videos, so shards stay under maxcount frames
        self.val_fraction = val_fraction
        self.seed = seed
        self.upsample = upsample
        self.exclude_test_people = exclude_test_people
        self.placement = ""
        self.test_list = self.root / TEST_LIST  # the file plan() read, in its own spelling
        self.test_videos: dict[str, int] = {}

    def describe(self) -> dict[str, Any]:
        return {"root": str(self.root), "layout": f"Celeb-DF, {self.placement}", "test_list": str(self.test_list),
                "test_videos": self.test_videos}

    def content_args(self) -> dict[str, Any]:
        # Not exclude_test_people: the videos it leaves out are simply not in the plans, and the shards it
        # does not change (the test split's) are kept.
        return {k: getattr(self, k) for k in
                ("frames_per_video", "face_size", "face_scale", "maxcount", "val_fraction", "seed", "upsample")}

    def _list_videos(self, folders: dict[str, Path]) -> tuple[dict[tuple[str, str], Video], list[dict[str, Any]]]:
        videos, skipped = {}, []
        keys: dict[str, str] = {}  # sample key stem -> the video that has it
        for canonical, folder in folders.items():
            for p in visible_files(folder):
                if p.suffix.lower() not in VIDEO_SUFFIXES:
                    skipped.append({"file": f"{canonical}/{p.name}", "reason": "not a video file"})
                    continue
                stem = p.name.rsplit(".", 1)[0]
                # Keys drop the extension and turn '.' and spaces into '_': `a.mp4` and `a.avi`, or `a b` and `a_b`,
                # would give one key to two videos' frames.
                rel, key = f"{canonical}/{p.name}", key_of(f"{canonical}_{stem}")
                if keys.setdefault(key, rel) != rel:
                    skipped.append({"file": rel, "reason": f"its frames' keys would be {keys[key]}'s: rename it"})
                    continue
                stat = p.stat()
                v = Video(canonical, p.name, str(p), stat.st_size, stat.st_mtime_ns, FOLDERS[canonical],
                          identities_of(canonical, stem))
                videos[(canonical.lower(), p.name)] = v
        return videos, skipped

    def plan(self) -> tuple[dict[str, list[Any]], list[dict[str, Any]]]:
        require_face_tools()
        folders, self.placement = find_videos(self.root)
        test_list = _child_ci(self.root, TEST_LIST)
        if test_list is None or not test_list.is_file():
            raise UserError(f"{self.root / TEST_LIST} is missing: Celeb-DF's test split is defined by that file; restore it from the download.")
        videos, skipped = self._list_videos(folders)
        test = read_test_list(test_list, videos)
        listed = [v for v in videos.values() if v.rel in test]
        self.test_videos = check_test_list(test_list, list(videos.values()), listed)
        self.test_list = test_list

        pool = [v for v in videos.values() if v.rel not in test]
        # A copy of a listed video (a second download, `id0_0000 (1).mp4`) holds its very frames: never training data.
        originals = {(v.folder, v.stem) for v in listed}
        copies = {v.rel for v in pool if (v.folder, original_stem(v.stem)) in originals}
        skipped += [{"file": rel, "reason": "a copy of a test-list video"} for rel in sorted(copies)]
        pool = [v for v in pool if v.rel not in copies]
        if self.exclude_test_people:
            listed_people = {p for v in listed for p in v.identities}
            seen = {v.rel for v in pool if listed_people & set(v.identities)}
            skipped += [{"file": rel, "reason": "a person of the test list (exclude_test_people)"} for rel in sorted(seen)]
            pool = [v for v in pool if v.rel not in seen]
        celebs = {p for v in pool for p in v.identities if p.startswith("id")}
        others = {p for v in pool for p in v.identities if not p.startswith("id")}
        # Two celebrities at least, so that val can hold fakes: a fake needs its target and its donor there.
        val_people = split_identities(celebs, self.val_fraction, self.seed, min_val=2 if len(celebs) >= 4 else 1)
        val_people |= split_identities(others, self.val_fraction, self.seed, min_val=1)

        items: dict[str, list[Any]] = {"train": [], "val": [], "test": []}
        for v in sorted(pool + listed, key=lambda v: v.rel):
            sides = {p in val_people for p in v.identities}
            if v.rel in test:
                items["test"].append((v, "test"))
            elif len(sides) > 1:
                skipped.append({"file": v.rel, "reason": "target and donor on different sides of the identity split"})
            else:
                split = "val" if sides == {True} else "train"
                items[split].append((v, split))
        return items, skipped

    def item_id(self, item: Any) -> str:
        video, split = item
        return f"{video.rel} {video.size} {video.mtime_ns} {split}"

    def process(self, item: Any) -> ItemResult:
        video, split = item
        if video.size == 0:
            return ItemResult(skipped=[{"file": video.rel, "reason": "empty video file"}])
        try:
            # At most MAX_VIDEO_FRAMES decoded: a damaged file that FFmpeg decodes without end would hold a worker for good.
            sampled = sample_frames(video.path, self.frames_per_video, MAX_VIDEO_FRAMES)
        except VideoError as e:
            return ItemResult(skipped=[{"file": video.rel, "reason": e.reason}])
        detector = shared_detector(self.upsample, True)
        result = ItemResult(skipped=[{"file": video.rel, "frame": index, "reason": "frame did not convert"}
                                     for index in sampled.unconverted])
        for index, rgb in sampled.frames:
            faces = detector.detect(rgb)
            if not faces:
                result.skipped.append({"file": video.rel, "frame": index, "reason": "no face in frame"})
                continue
            crop = crop_face(rgb, faces[0], self.face_size, self.face_scale)
            meta = {
                "source": "celebdf", "split": split, "video": video.rel, "folder": video.folder,
                "identity": video.identities[0], "frame": index, "frames_decoded": sampled.decoded,
                # width and height: the frame the box and landmarks are in, shrunk where the video is over
                # MAX_SIDE_PX on its long side (Celeb-DF's never are); video_width and video_height: the video's
                "fps": round(sampled.fps, 3), "width": rgb.shape[1], "height": rgb.shape[0],
                "video_width": sampled.width, "video_height": sampled.height,
                "faces_in_frame": len(faces), **crop.to_json(),
            }
            if video.label:
                meta["donor"] = video.identities[1] if len(video.identities) > 1 else None
            key = key_of(f"{video.folder}_{video.stem}_{index:04d}")
            fields = {
                "jpg": encode_face_jpeg(crop.image),
                "lmk": landmarks_bytes(crop.landmarks, self.face_size),
                "cls": str(video.label).encode(),
                "json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode(),
            }
            result.samples.append(Sample(key, fields, video.label))
        return result
