from collections import Counter

import cv2
from conftest import CELEBA_IMAGES, CELEBDF_VIDEOS, run_shards

from shards.synth.celeba import ATTRIBUTES, draw_face, make_person


def test_synthetic_celeba_has_the_official_layout(celeba_root):
    images = sorted((celeba_root / "img_align_celeba").glob("*.jpg"))
    assert [p.name for p in images[:2]] == ["000001.jpg", "000002.jpg"] and len(images) == CELEBA_IMAGES
    assert cv2.imread(str(images[0])).shape == (218, 178, 3)
    for name in ("list_eval_partition", "list_attr_celeba", "list_landmarks_align_celeba", "identity_CelebA", "list_bbox_celeba"):
        assert (celeba_root / f"{name}.txt").is_file()
    attr = (celeba_root / "list_attr_celeba.txt").read_text().splitlines()
    assert attr[0] == str(CELEBA_IMAGES) and attr[1].split() == ATTRIBUTES
    splits = Counter(line.split()[1] for line in (celeba_root / "list_eval_partition.txt").read_text().splitlines())
    assert splits == {"0": 48, "1": 6, "2": 6}  # CelebA's own 80/10/10 shares


def test_synthetic_faces_vary(celeba_root):
    import numpy as np

    a, b = (draw_face(np.random.default_rng(i), make_person(0, i))[0] for i in (1, 2))
    assert np.abs(a.astype(int) - b).mean() > 20


def test_synthetic_celebdf_has_the_v2_layout_and_its_test_list_convention(celebdf_root):
    videos = sorted(p.relative_to(celebdf_root).as_posix() for p in celebdf_root.glob("*/*.mp4"))
    assert len(videos) == CELEBDF_VIDEOS
    assert {v.split("/")[0] for v in videos} == {"Celeb-real", "YouTube-real", "Celeb-synthesis"}
    for line in (celebdf_root / "List_of_testing_videos.txt").read_text().splitlines():
        label, video = line.split()
        assert video in videos
        assert label == ("0" if video.startswith("Celeb-synthesis/") else "1")  # 1 means real


def test_synth_refuses_to_overwrite_an_existing_folder(tmp_path):
    (tmp_path / "celeba").mkdir()
    (tmp_path / "celeba" / "mine.txt").write_text("keep me")
    result = run_shards("synth", "celeba", "--out", tmp_path / "celeba", "--images", 4)
    assert result.returncode == 2 and "already exists" in result.stderr
    assert (tmp_path / "celeba" / "mine.txt").read_text() == "keep me"


def test_synth_from_the_command_line(tmp_path):
    result = run_shards("synth", "celebdf", "--out", tmp_path / "df", "--faces", "twophotos", "--videos", 4, "--placement", "videos")
    assert result.returncode == 0, result.stderr
    assert len(list(tmp_path.glob("df/*/videos/*.mp4"))) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
