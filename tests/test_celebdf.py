import json
import shutil
import tarfile

import cv2
import numpy as np
import pytest
from conftest import CELEBDF_ARGS, run_shards

from pipeline.errors import UserError
from shards.build import build
from shards.celebdf import CelebDFSource, identities_of
from shards.synth.celebdf import write_celebdf, write_video
from shards.video import even_indices, sample_frames


def _metas(dataset_dir, split=None):
    """(key, cls, json) of every sample, optionally of one split."""
    out = []
    for tar_path in sorted(dataset_dir.glob(f"{split or '*'}-*.tar")):
        with tarfile.open(tar_path) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar}
        for name in sorted(files):
            if name.endswith(".json"):
                key = name[: -len(".json")]
                out.append((key, int(files[f"{key}.cls"]), json.loads(files[name])))
    return out


def _test_list(root):
    return {line.split()[1]: line.split()[0] for line in (root / "List_of_testing_videos.txt").read_text().splitlines()}


def test_the_test_split_is_exactly_the_test_list_with_labels_from_folders(celebdf_root, celebdf_shards):
    listed = _test_list(celebdf_root)
    test = _metas(celebdf_shards.out_dir, "test")
    assert {m["video"] for _, _, m in test} == set(listed)
    for key, cls, meta in test:
        assert cls == (1 if meta["folder"] == "Celeb-synthesis" else 0)
        assert listed[meta["video"]] == ("0" if cls else "1")  # the list's own convention: 1 is real
        assert key == f"{meta['folder']}_{meta['video'].split('/')[1][:-4]}_{meta['frame']:04d}"
    others = _metas(celebdf_shards.out_dir, "train") + _metas(celebdf_shards.out_dir, "val")
    assert not {m["video"] for _, _, m in others} & set(listed)


def test_no_person_is_on_both_sides_of_train_and_val(celebdf_shards):
    def people(split):
        return {p for _, _, m in _metas(celebdf_shards.out_dir, split) for p in (m["identity"], m.get("donor")) if p}

    train, val = people("train"), people("val")
    assert train and val
    assert not train & val
    reasons = celebdf_shards.manifest["skipped"]["by_reason"]
    assert set(reasons) <= {"target and donor on different sides of the identity split"}


def test_frames_are_evenly_spaced_face_crops_with_landmarks(celebdf_shards):
    by_video = {}
    for _, _, meta in _metas(celebdf_shards.out_dir):
        by_video.setdefault(meta["video"], []).append(meta)
    for metas in by_video.values():
        frames = sorted(m["frame"] for m in metas)
        assert frames == even_indices(metas[0]["frames_decoded"], CELEBDF_ARGS["frames_per_video"])
        for m in metas:
            marks = np.array(m["landmarks"])
            assert marks.shape == (68, 2)
            inner = marks[17:]  # brows, eyes, nose, mouth; the jaw may run past a 1.3x crop of dlib's tight box
            assert (inner >= 0).all() and (inner < CELEBDF_ARGS["face_size"]).all()
            assert m["fps"] == 25.0 and m["crop"]["side"] >= m["box"][2] - m["box"][0]


def test_key_names_and_identities_follow_the_file_names():
    assert identities_of("Celeb-synthesis", "id0_id16_0000") == ("id0", "id16")
    assert identities_of("Celeb-real", "id3_0007") == ("id3",)
    assert identities_of("YouTube-real", "00170") == ("youtube-real/00170",)
    # A copy (a second download) is its celebrity's, never a new person the split could set beside its original.
    assert identities_of("Celeb-real", "id3_0007 (1)") == ("id3",)
    assert identities_of("Celeb-synthesis", "id0_id16_0000 (2)") == ("id0", "id16")
    assert identities_of("YouTube-real", "00170 - Copy (2)") == ("youtube-real/00170",)


def test_a_test_list_that_is_not_utf8_exits_2_naming_it(tmp_path, celebdf_root):
    root = _copy(celebdf_root, tmp_path)
    path = root / "List_of_testing_videos.txt"
    path.write_bytes(path.read_text().encode("utf-16"))  # Notepad's "Unicode"
    result = run_shards("celebdf", "--root", root, "--out", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"{path} is not UTF-8 text (an editor may have saved it as UTF-16): save it as plain text" in result.stderr
    assert not (tmp_path / "out").exists()


def test_videos_subfolders_and_other_case_of_folders_and_test_list_are_accepted(tmp_path, celebdf_shards):
    root = write_celebdf(tmp_path / "nested", 12, seed=1, placement="videos")
    (root / "YouTube-real").rename(root / "Youtube-real")
    (root / "List_of_testing_videos.txt").rename(root / "list_of_testing_videos.txt")
    assert (root / "Celeb-real" / "videos").is_dir()
    report = build(CelebDFSource(root, **CELEBDF_ARGS), tmp_path / "out", progress=False)
    assert report.manifest["source"]["layout"] == "Celeb-DF, <folder>/videos/*.mp4"
    assert report.manifest["source"]["test_list"] == str(root / "list_of_testing_videos.txt")  # the file read
    keys = lambda d: [k for k, _, _ in _metas(d)]  # noqa: E731
    assert keys(report.out_dir) == keys(celebdf_shards.out_dir)


def _copy(root, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst


def test_videos_both_in_a_videos_folder_and_beside_it_are_refused(tmp_path, celebdf_root):
    # A move into <folder>/videos/ stopped halfway: the videos left beside it would be left out, unseen and uncounted.
    root = _copy(celebdf_root, tmp_path)
    folder = root / "Celeb-real"
    first = sorted(folder.glob("*.mp4"))[0]
    (folder / "videos").mkdir()
    first.rename(folder / "videos" / first.name)
    with pytest.raises(UserError) as error:
        CelebDFSource(root).plan()
    left = sorted(folder.glob("*.mp4"))[0].name
    assert str(error.value) == (f"{folder} holds videos both in videos/ and beside it ({left}, ...): move them all into "
                                "one of the two, then run again.")


def test_a_video_longer_than_the_frame_cap_is_skipped_and_counted(celebdf_root, monkeypatch):
    # The cap (100,000 frames) stops a damaged file that FFmpeg would decode without end; here, 5 frames.
    import shards.celebdf

    monkeypatch.setattr(shards.celebdf, "MAX_VIDEO_FRAMES", 5)
    source = CelebDFSource(celebdf_root, **CELEBDF_ARGS)
    video, split = source.plan()[0]["train"][0]
    assert source.process((video, split)).skipped == [{"file": video.rel, "reason": "more than 5 frames"}]


def test_unreadable_and_empty_videos_and_faceless_frames_are_skipped_and_counted(tmp_path, celebdf_root):
    root = _copy(celebdf_root, tmp_path)
    (root / "Celeb-real" / "id0_0007.mp4").write_bytes(b"")
    (root / "Celeb-real" / "id1_0007.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    rng = np.random.default_rng(0)
    write_video(root / "Celeb-real" / "id2_0007.mp4", [rng.integers(0, 255, (96, 128, 3), dtype=np.uint8) for _ in range(20)])
    (root / "Celeb-real" / "notes.txt").write_text("not a video")

    report = build(CelebDFSource(root, **CELEBDF_ARGS), tmp_path / "out", progress=False)
    items = report.manifest["skipped"]["items"]
    by_file = {}
    for s in items:
        by_file.setdefault(s["file"], []).append(s)
    assert [s["reason"] for s in by_file["Celeb-real/id0_0007.mp4"]] == ["empty video file"]
    assert [s["reason"] for s in by_file["Celeb-real/id1_0007.mp4"]] == ["unreadable video"]
    faceless = by_file["Celeb-real/id2_0007.mp4"]
    assert [s["frame"] for s in faceless] == even_indices(20, CELEBDF_ARGS["frames_per_video"])
    assert {s["reason"] for s in faceless} == {"no face in frame"}
    assert [s["reason"] for s in by_file["Celeb-real/notes.txt"]] == ["not a video file"]
    assert report.manifest["complete"]


def test_a_video_name_with_spaces_gives_shards_the_loaders_read(tmp_path, celebdf_root):
    from pipeline.data.common import check_samples, read_index

    root = tmp_path / "spaces"
    (root / "Celeb-real").mkdir(parents=True)
    for name in ("id0_0000.mp4", "id0_0000 (1).mp4", "id1_0000.mp4"):  # the second a browser's copy of the first
        shutil.copy(celebdf_root / "Celeb-real" / "id0_0000.mp4", root / "Celeb-real" / name)
    (root / "List_of_testing_videos.txt").write_text("1 Celeb-real/id1_0000.mp4\n")  # (a listed video's copy is skipped)
    report = build(CelebDFSource(root, **CELEBDF_ARGS), tmp_path / "out", progress=False)
    keys = []
    for tar in sorted(report.out_dir.glob("*.tar")):
        entries = read_index(tar, tar.with_suffix(".idx"))
        check_samples(tar, entries)
        keys += [e.key for e in entries]
    copies = [k for k in keys if k.startswith("Celeb-real_id0_0000_(1)_")]
    assert len(copies) == CELEBDF_ARGS["frames_per_video"] and len(keys) == 3 * len(copies)


def test_a_video_over_1920_px_is_shrunk_and_its_samples_say_the_size_their_boxes_are_in(tmp_path, celebdf_root):
    # 2560x1920 frames are shrunk to 1920x1440 before dlib: the box and landmarks are in those pixels, and so must be
    # the sample's width and height; the video's own size is kept beside them.
    source = sample_frames(str(sorted((celebdf_root / "Celeb-real").glob("*.mp4"))[0]), 4)
    big = [cv2.resize(rgb, (2560, 1920), interpolation=cv2.INTER_CUBIC) for _, rgb in source.frames]
    root = tmp_path / "big"
    (root / "Celeb-real").mkdir(parents=True)
    write_video(root / "Celeb-real" / "id0_0000.mp4", big)
    (root / "List_of_testing_videos.txt").write_text("1 Celeb-real/id0_0000.mp4\n")
    report = build(CelebDFSource(root, **{**CELEBDF_ARGS, "frames_per_video": 2}), tmp_path / "out", progress=False)
    metas = [meta for _, _, meta in _metas(report.out_dir)]
    assert metas, report.manifest["skipped"]
    for meta in metas:
        assert (meta["width"], meta["height"], meta["video_width"], meta["video_height"]) == (1920, 1440, 2560, 1920)
        left, top, right, bottom = meta["box"]
        assert 0 <= left < right <= 1920 and 0 <= top < bottom <= 1440 and right - left > 400  # the face, scaled


def test_frames_come_from_the_frames_that_really_decode(tmp_path):
    writer = cv2.VideoWriter(str(tmp_path / "v.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 25, (160, 120))
    for i in range(40):
        writer.write(np.full((120, 160, 3), 6 * i, np.uint8))
    writer.release()
    data = (tmp_path / "v.avi").read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[: len(data) // 2])  # the header still claims 40 frames

    full = sample_frames(str(tmp_path / "v.avi"), 5)
    cut = sample_frames(str(tmp_path / "cut.avi"), 5)
    assert full.container_count == full.decoded == 40
    assert [i for i, _ in full.frames] == [0, 9, 19, 29, 39]
    assert cut.container_count == 40 and 0 < cut.decoded < 40
    assert [i for i, _ in cut.frames] == even_indices(cut.decoded, 5)
    for i, frame in cut.frames:  # the pixels are those of frame i, not of another one
        assert abs(int(frame.mean()) - 6 * i) <= 3
    # Made into something else as they decode (`keep`, as detection does): the frames the claimed count planned that
    # the real count also wants are kept from the first decode, and the second decodes only the others.
    kept = []
    cut_kept = sample_frames(str(tmp_path / "cut.avi"), 5, keep=lambda rgb: kept.append(int(rgb.mean())) or len(kept))
    planned = {i for i in even_indices(40, 5) if i < cut.decoded}
    assert [i for i, _ in cut_kept.frames] == even_indices(cut.decoded, 5) and cut_kept.unconverted == []
    assert len(kept) == len(planned) + len(set(even_indices(cut.decoded, 5)) - planned)
    for (i, _), (_, n) in zip(cut.frames, cut_kept.frames):  # frame i's own `keep`
        assert abs(kept[n - 1] - 6 * i) <= 3
    kept_once = []
    counted_first = sample_frames(str(tmp_path / "cut.avi"), 5, keep=kept_once.append, count_first=True)
    assert [i for i, _ in counted_first.frames] == even_indices(cut.decoded, 5) and len(kept_once) == 5  # once each


def test_a_frame_opencv_fails_to_convert_is_counted_as_skipped(tmp_path, celebdf_root, monkeypatch):
    import shards.video

    capture = cv2.VideoCapture

    class FailsFrame10:  # a fault no real file here produces: retrieve() fails after grab(). (Subclassing
        # cv2.VideoCapture crashes its garbage collection, so this wraps one.)
        def __init__(self, path):
            self.cap, self.grabbed = capture(path), 0

        def grab(self):
            self.grabbed += 1
            return self.cap.grab()

        def retrieve(self):
            return (False, None) if self.grabbed == 11 else self.cap.retrieve()

        def __getattr__(self, name):
            return getattr(self.cap, name)

    monkeypatch.setattr(shards.video.cv2, "VideoCapture", FailsFrame10)
    root = tmp_path / "one"
    (root / "Celeb-real").mkdir(parents=True)
    shutil.copy(celebdf_root / "Celeb-real" / "id0_0000.mp4", root / "Celeb-real")
    (root / "List_of_testing_videos.txt").write_text("1 Celeb-real/id0_0000.mp4\n")
    report = build(CelebDFSource(root, **CELEBDF_ARGS), tmp_path / "out", progress=False)
    assert report.manifest["skipped"]["items"] == [{"file": "Celeb-real/id0_0000.mp4", "frame": 10, "reason": "frame did not convert"}]
    assert [m["frame"] for _, _, m in _metas(report.out_dir)] == [0, 20, 30, 40, 50]


def _edit_test_list(root, edit):
    path = root / "List_of_testing_videos.txt"
    path.write_text(edit(path.read_text()))
    return path


def test_a_test_list_naming_a_missing_video_exits_2_and_writes_nothing(tmp_path, celebdf_root):
    root = _copy(celebdf_root, tmp_path)
    path = _edit_test_list(root, lambda t: t + "1 Celeb-real/id9_0099.mp4\n")
    result = run_shards("celebdf", "--root", root, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert f"{path} line {len(path.read_text().splitlines())} names Celeb-real/id9_0099.mp4" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_test_list_label_that_disagrees_with_its_folder_exits_2(tmp_path, celebdf_root):
    root = _copy(celebdf_root, tmp_path)
    path = _edit_test_list(root, lambda t: t.replace("0 Celeb-synthesis/", "1 Celeb-synthesis/", 1))
    result = run_shards("celebdf", "--root", root, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert str(path) in result.stderr and "labels Celeb-synthesis/" in result.stderr and "1 means real" in result.stderr
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_an_empty_test_list_exits_2_and_writes_nothing(tmp_path, celebdf_root):
    root = _copy(celebdf_root, tmp_path)
    path = _edit_test_list(root, lambda t: "\r\n\n")
    result = run_shards("celebdf", "--root", root, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert f"{path} lists no video, so Celeb-DF would have no test split: restore it" in result.stderr
    assert not (tmp_path / "out").exists()


def _v2_names(tmp_path, listed):
    """Empty files with Celeb-DF v2's names and counts, and a test list of `listed` (per folder) of them."""
    root = tmp_path / "Celeb-DF-v2"
    names = {"Celeb-real": [f"id{p}_{i:04d}.mp4" for p in range(59) for i in range(10)],
             "YouTube-real": [f"{i:05d}.mp4" for i in range(300)],
             "Celeb-synthesis": [f"id{t}_id{(t + d) % 59}_{i:04d}.mp4" for t in range(59) for d in range(1, 11)
                                 for i in range(10)][:5639]}
    for folder, files in names.items():
        (root / folder).mkdir(parents=True)
        for name in files:
            (root / folder / name).touch()
    lines = [f"{0 if folder == 'Celeb-synthesis' else 1} {folder}/{name}" for folder, n in listed.items()
             for name in names[folder][:n]]
    (root / "List_of_testing_videos.txt").write_text("\n".join(lines) + "\n")
    return root


def test_a_test_list_shorter_than_v2s_is_a_warning_and_the_manifest_counts_the_test_videos(tmp_path, caplog):
    from shards.celebdf import V2_TEST_VIDEOS

    source = CelebDFSource(_v2_names(tmp_path / "whole", V2_TEST_VIDEOS))
    source.plan()
    assert source.describe()["test_videos"] == V2_TEST_VIDEOS
    assert not caplog.records

    cut = {"Celeb-real": 108, "YouTube-real": 70, "Celeb-synthesis": 200}  # a list cut short
    source = CelebDFSource(_v2_names(tmp_path / "cut", cut))
    items, _ = source.plan()
    assert len(items["test"]) == 378 and source.describe()["test_videos"] == cut
    (record,) = caplog.records
    assert record.levelname == "WARNING"
    assert record.getMessage().startswith(f"{source.root / 'List_of_testing_videos.txt'} lists 378 videos (108 Celeb-real, "
                                          "70 YouTube-real, 200 Celeb-synthesis) where Celeb-DF v2's lists 518")


def test_two_videos_whose_frames_would_share_keys_keep_the_first(tmp_path):
    # Keys drop the extension and turn '.' and spaces into '_': both videos' frames would be one sample each.
    from shards.celebdf import V2_TEST_VIDEOS

    root = _v2_names(tmp_path, V2_TEST_VIDEOS)
    (root / "Celeb-real" / "id58_0009.avi").touch()  # beside id58_0009.mp4, which the test list does not name
    items, skipped = CelebDFSource(root).plan()
    assert [s for s in skipped if s["file"].startswith("Celeb-real/id58_0009")] == [
        {"file": "Celeb-real/id58_0009.mp4", "reason": "its frames' keys would be Celeb-real/id58_0009.avi's: rename it"}]
    assert "Celeb-real/id58_0009.avi" in {v.rel for split in items.values() for v, _ in split}


def test_copies_of_test_list_videos_never_reach_train_or_val(tmp_path):
    from shards.celebdf import V2_TEST_VIDEOS

    root = _v2_names(tmp_path, V2_TEST_VIDEOS)
    listed = [line.split(" ", 1)[1] for line in (root / "List_of_testing_videos.txt").read_text().splitlines()]
    real, youtube = (next(rel for rel in listed if rel.startswith(folder)) for folder in ("Celeb-real/", "YouTube-real/"))
    copies = [real.replace(".mp4", " (1).mp4"), youtube.replace(".mp4", " - Copy.mp4")]  # a second download, a file manager's
    for rel in copies:
        (root / rel).touch()
    items, skipped = CelebDFSource(root).plan()
    assert [s for s in skipped if s["file"] in copies] == [{"file": rel, "reason": "a copy of a test-list video"}
                                                           for rel in sorted(copies)]
    assert not {v.rel for split in ("train", "val") for v, _ in items[split]} & set(copies)
    assert len(items["test"]) == sum(V2_TEST_VIDEOS.values())


@pytest.mark.parametrize("damage", ["no test list", "no folders"])
def test_a_root_without_the_celebdf_layout_exits_2(tmp_path, celebdf_root, damage):
    root = _copy(celebdf_root, tmp_path)
    if damage == "no test list":
        (root / "List_of_testing_videos.txt").unlink()
        expected = "List_of_testing_videos.txt is missing"
    else:
        for folder in ("Celeb-real", "YouTube-real", "Celeb-synthesis"):
            shutil.rmtree(root / folder)
        expected = "matches no Celeb-DF layout"
    result = run_shards("celebdf", "--root", root, "--out", tmp_path / "out")
    assert result.returncode == 2 and expected in result.stderr
    assert not (tmp_path / "out").exists()


def test_val_fraction_0_keeps_every_training_person_in_train(celebdf_root):
    items, skipped = CelebDFSource(celebdf_root, val_fraction=0).plan()
    assert not items["val"] and items["train"] and items["test"]
    assert not [s for s in skipped if s["reason"] == "target and donor on different sides of the identity split"]


def test_exclude_test_people_leaves_every_video_of_a_listed_person_out_of_train_and_val(celebdf_root):
    def people(items, split):
        return {p for video, _ in items[split] for p in video.identities}

    items, _ = CelebDFSource(celebdf_root).plan()
    listed = people(items, "test")
    assert listed & (people(items, "train") | people(items, "val"))  # as in the real Celeb-DF: the list's people recur

    excluded, skipped = CelebDFSource(celebdf_root, exclude_test_people=True).plan()
    assert excluded["test"] == items["test"]
    assert not listed & (people(excluded, "train") | people(excluded, "val"))
    left_out = {s["file"] for s in skipped if s["reason"] == "a person of the test list (exclude_test_people)"}
    seen_before = {video.rel for video, _ in items["train"] + items["val"] if listed & set(video.identities)}
    assert seen_before and seen_before <= left_out
    for rel in left_out:
        folder, name = rel.split("/")
        assert listed & set(identities_of(folder, name.rsplit(".", 1)[0])), rel


def test_exclude_test_people_keeps_the_test_shards_already_written(tmp_path, celebdf_root, celebdf_shards):
    out = tmp_path / "out"
    shutil.copytree(celebdf_shards.out_dir, out / "celebdf")
    before = {p.name: p.read_bytes() for p in (out / "celebdf").glob("test-*.tar")}
    report = build(CelebDFSource(celebdf_root, exclude_test_people=True, **CELEBDF_ARGS), out, progress=False)
    tests = [s for s in report.manifest["shards"] if s["split"] == "test"]
    assert report.shards_reused >= len(tests) == len(before) > 0
    assert {p.name: p.read_bytes() for p in (out / "celebdf").glob("test-*.tar")} == before


def test_the_cli_passes_exclude_test_people_and_the_manifest_counts_the_videos_left_out(tmp_path, celebdf_root):
    result = run_shards("celebdf", "--root", celebdf_root, "--out", tmp_path / "out", "--exclude-test-people",
                        "--frames-per-video", 2, "--face-size", 64, "--no-progress")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "celebdf" / "manifest.json").read_text())
    assert manifest["arguments"]["exclude_test_people"] is True
    assert manifest["skipped"]["by_reason"]["a person of the test list (exclude_test_people)"] > 0


def test_the_manifest_records_how_faces_were_cropped_and_older_ones_read_from_their_arguments(celebdf_shards, tmp_path):
    from shards.manifest import detection_geometry

    assert detection_geometry([celebdf_shards.out_dir]) == {"face_size": 128, "face_scale": 1.3, "upsample": 1}
    manifest = json.loads((celebdf_shards.out_dir / "manifest.json").read_text())
    del manifest["faces"]  # as written before the record existed
    for arguments, expected in (({"face_size": 96, "upsample": 0}, (96, 0)), ({}, (256, 1))):
        (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "arguments": arguments}))
        assert detection_geometry([tmp_path]) == {"face_size": expected[0], "face_scale": 1.3, "upsample": expected[1]}
