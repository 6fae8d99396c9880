import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter

import cv2
import numpy as np
import pytest
from conftest import CELEBA_IMAGES, REPO, run_shards, shard_bytes

from shards.build import build
from shards.celeba import FALLBACK_NOTE, CelebASource, read_partition
from shards.manifest import SYNTHETIC_MARK, synthetic
from shards.synth.celeba import write_celeba


def _members(dataset_dir):
    """member name -> bytes over every tar of the folder."""
    out = {}
    for tar_path in sorted(dataset_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            out.update({m.name: tar.extractfile(m).read() for m in tar})
    return out


def test_counts_per_split_match_the_partition_file(celeba_root, celeba_shards):
    expected = Counter(read_partition(celeba_root / "list_eval_partition.txt").values())
    splits = celeba_shards.manifest["splits"]
    assert {s: splits[s]["samples"] for s in splits} == dict(expected)
    assert sum(expected.values()) == CELEBA_IMAGES
    for split, n in expected.items():
        assert splits[split]["labels"] == {"0": n}
    assert celeba_shards.manifest["complete"] is True
    assert celeba_shards.manifest["skipped"]["total"] == 0


def test_each_sample_holds_the_face_crop_its_landmarks_and_the_original_file(celeba_root, celeba_shards):
    members = _members(celeba_shards.out_dir)
    for jpg in sorted((celeba_root / "img_align_celeba").glob("*.jpg")):
        assert members[f"{jpg.stem}.orig.jpg"] == jpg.read_bytes()
        assert members[f"{jpg.stem}.cls"] == b"0"
        crop = cv2.imdecode(np.frombuffer(members[f"{jpg.stem}.jpg"], np.uint8), cv2.IMREAD_COLOR)
        assert crop.shape == (256, 256, 3)
        landmarks = np.frombuffer(members[f"{jpg.stem}.lmk"], "<f4").reshape(68, 2)
        assert np.isfinite(landmarks).all() and (landmarks > -0.05).all() and (landmarks < 1.05).all()


def test_faces_dlib_misses_take_the_box_from_celebas_landmarks_and_are_counted(celeba_shards):
    metas = [json.loads(v) for k, v in _members(celeba_shards.out_dir).items() if k.endswith(".json")]
    fallback = [m["file"] for m in metas if m["face_found_by"] == "celeba_landmarks"]
    notes = celeba_shards.manifest["notes"]
    assert fallback and notes["total"] == len(fallback)  # the procedural faces are cartoons dlib rarely finds
    assert sorted(n["file"] for n in notes["items"]) == sorted(fallback)
    assert notes["by_note"] == {FALLBACK_NOTE: len(fallback)}
    for m in metas:
        left, top, side = m["crop"]["left"], m["crop"]["top"], m["crop"]["side"]
        eyes = np.mean([m["celeba_landmarks"]["lefteye"], m["celeba_landmarks"]["righteye"]], axis=0)
        assert left < eyes[0] < left + side and top < eyes[1] < top + side  # the crop holds the eyes CelebA marked


def test_an_image_without_a_face_or_landmarks_is_skipped_with_its_reason(celeba_root, tmp_path):
    root = tmp_path / "celeba"
    shutil.copytree(celeba_root, root)
    (root / "list_landmarks_align_celeba.txt").unlink()
    report = build(CelebASource(root, maxcount=100), tmp_path / "out", progress=False)
    skipped = report.manifest["skipped"]
    found = sum(report.manifest["splits"][s]["samples"] for s in report.manifest["splits"])
    assert skipped["by_reason"] == {"no face found and no CelebA landmarks": CELEBA_IMAGES - found}
    assert report.manifest["notes"]["total"] == 0


def test_sample_json_carries_split_identity_attributes_and_landmarks(celeba_root, celeba_shards):
    meta = json.loads(_members(celeba_shards.out_dir)["000002.json"])
    partition = read_partition(celeba_root / "list_eval_partition.txt")
    identity = dict(line.split() for line in (celeba_root / "identity_CelebA.txt").read_text().splitlines())
    marks = (celeba_root / "list_landmarks_align_celeba.txt").read_text().splitlines()[3].split()
    assert meta["source"] == "celeba" and meta["file"] == "000002.jpg"
    assert meta["split"] == partition["000002.jpg"]
    assert meta["identity"] == int(identity["000002.jpg"])
    assert len(meta["attributes"]) == 40 and set(meta["attributes"].values()) <= {-1, 1}
    assert meta["celeba_landmarks"]["lefteye"] == [int(marks[1]), int(marks[2])]
    assert len(meta["landmarks"]) == 68 and set(meta["crop"]) == {"left", "top", "side"}
    assert (meta["width"], meta["height"]) == (178, 218)


def test_the_manifest_records_each_shard_with_checksums(celeba_shards):
    m = celeba_shards.manifest
    assert m["source"]["layout"] == "official"
    assert m["arguments"] == {} and m["tool"]["name"] == "deepfake-shards"
    import hashlib

    for entry in m["shards"]:
        data = (celeba_shards.out_dir / entry["file"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert (celeba_shards.out_dir / entry["index"]).read_text().startswith(f"v1.2 {entry['samples']}\n")
    assert [e["file"] for e in m["shards"]][:2] == ["train-000000.tar", "train-000001.tar"]


def test_the_kaggle_layout_gives_the_same_shards(tmp_path, celeba_shards):
    root = write_celeba(tmp_path / "kaggle", CELEBA_IMAGES, seed=1, layout="kaggle")
    assert (root / "img_align_celeba" / "img_align_celeba" / "000001.jpg").is_file()
    assert (root / "list_eval_partition.csv").read_text().startswith("image_id,partition\n")
    report = build(CelebASource(root, maxcount=16), tmp_path / "out", progress=False)
    assert report.manifest["source"]["layout"] == "kaggle"
    kaggle, official = _members(report.out_dir), _members(celeba_shards.out_dir)
    assert kaggle.keys() == official.keys()
    for name in official:
        if name.endswith(".json"):  # the Kaggle mirror has no identity_CelebA file
            expected = {k: v for k, v in json.loads(official[name]).items() if k != "identity"}
            assert json.loads(kaggle[name]) == expected
        else:
            assert kaggle[name] == official[name]


def test_list_files_with_windows_line_endings_and_trailing_spaces_are_read(tmp_path, celeba_root, celeba_shards):
    root = tmp_path / "crlf"
    shutil.copytree(celeba_root, root)
    for lst in root.glob("*.txt"):
        lst.write_bytes(b"".join(line.rstrip() + b"   \r\n" for line in lst.read_bytes().splitlines()))
    report = build(CelebASource(root, maxcount=16), tmp_path / "out", progress=False)
    assert shard_bytes(report.out_dir) == shard_bytes(celeba_shards.out_dir)


def test_bad_images_are_skipped_counted_and_named(tmp_path, celeba_root):
    root = tmp_path / "bad"
    shutil.copytree(celeba_root, root)
    images = root / "img_align_celeba"
    good = (images / "000001.jpg").read_bytes()
    (images / "000001.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (images / "000002.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8)  # corrupt scan data
    (images / "000003.jpg").write_bytes(b"")
    (images / "000004.jpg").unlink()  # listed but missing
    (images / "999999.jpg").write_bytes(good)  # present but not listed
    (images / "000005.jpg").write_bytes(b"GIF89a not a jpeg")

    report = build(CelebASource(root, maxcount=16), tmp_path / "out", progress=False)
    skipped = report.manifest["skipped"]
    assert skipped["by_reason"] == {
        "corrupt JPEG": 2, "empty file": 1, "image not in partition file": 1,
        "listed in partition file but missing": 1, "not a JPEG": 1,
    }
    by_file = {s["file"]: s["reason"] for s in skipped["items"]}
    assert by_file["000001.jpg"] == by_file["000002.jpg"] == "corrupt JPEG"
    assert by_file["999999.jpg"] == "image not in partition file"
    assert sum(s["samples"] for s in report.manifest["splits"].values()) == CELEBA_IMAGES - 5
    members = _members(report.out_dir)
    assert not any(name.startswith(("000001.", "000002.", "000003.", "000005.", "999999.")) for name in members)


def test_the_cli_summarizes_skips_and_exits_0(tmp_path, celeba_root):
    root = tmp_path / "bad"
    shutil.copytree(celeba_root, root)
    (root / "img_align_celeba" / "000007.jpg").write_bytes(b"")
    result = run_shards("celeba", "--root", root, "--out", tmp_path / "out", "--maxcount", 16, "--workers", 2, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "skipped 1: 1 empty file" in result.stdout
    assert "layout: official" in result.stdout
    assert json.loads((tmp_path / "out/celeba/manifest.json").read_text())["arguments"]["workers"] == 2


def test_a_root_matching_neither_layout_exits_2_and_writes_nothing(tmp_path):
    (tmp_path / "root" / "images").mkdir(parents=True)
    result = run_shards("celeba", "--root", tmp_path / "root", "--out", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "matches neither CelebA layout" in result.stderr
    assert str(tmp_path / "root") in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_missing_partition_file_exits_2_and_writes_nothing(tmp_path, celeba_root):
    root = tmp_path / "nopart"
    shutil.copytree(celeba_root, root)
    (root / "list_eval_partition.txt").unlink()
    result = run_shards("celeba", "--root", root, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert f"{root / 'list_eval_partition.txt'} is missing" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def _keep_lines(path, count):
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:count]))


@pytest.mark.parametrize("damage", ["empty partition", "attributes without rows", "landmarks without rows",
                                    "empty identities", "no image", "a list from another copy"])
def test_list_files_without_rows_and_images_no_list_names_stop_before_writing(tmp_path, celeba_root, damage):
    from pipeline.errors import UserError

    root = tmp_path / "damaged"
    shutil.copytree(celeba_root, root)
    images = root / "img_align_celeba"
    path, expected = {
        "empty partition": ("list_eval_partition.txt", "holds no rows: restore that file"),
        "attributes without rows": ("list_attr_celeba.txt", "holds no rows: restore that file"),
        "landmarks without rows": ("list_landmarks_align_celeba.txt", "holds no rows: restore that file"),
        "empty identities": ("identity_CelebA.txt", "holds no rows: restore that file"),
        "no image": ("img_align_celeba", "holds no .jpg image: unpack img_align_celeba.zip there"),
        "a list from another copy": ("img_align_celeba", "is named in"),
    }[damage]
    if damage == "no image":
        for image in images.iterdir():
            image.unlink()
    elif damage == "a list from another copy":
        for image in images.iterdir():
            image.rename(images / f"9{image.name}")
    else:  # the .txt tables keep their count and names lines
        _keep_lines(root / path, 0 if damage.startswith("empty") else 2)
    with pytest.raises(UserError, match=expected) as error:
        build(CelebASource(root), tmp_path / "out", progress=False)
    assert str(root / path) in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_list_file_that_is_not_utf8_stops_before_writing_naming_it(tmp_path, celeba_root):
    from pipeline.errors import UserError

    root = tmp_path / "utf16"
    shutil.copytree(celeba_root, root)
    path = root / "list_eval_partition.txt"
    path.write_bytes(path.read_text().encode("utf-16"))
    with pytest.raises(UserError, match="is not UTF-8 text .*: save it as plain text") as error:
        build(CelebASource(root), tmp_path / "out", progress=False)
    assert str(path) in str(error.value) and not (tmp_path / "out").exists()


def test_the_default_workers_are_the_cpus_this_process_may_use():
    # A SLURM job given 2 cores of a 64-core node: 8 dlib processes would share them.
    result = subprocess.run(["taskset", "-c", "0", sys.executable, "-m", "shards", "celeba", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "processes (default: 1)" in " ".join(result.stdout.split()), result.stdout


def test_the_google_drive_layout_finds_the_images_in_img(tmp_path, celeba_root, celeba_shards):
    root = tmp_path / "drive"
    (root / "Img").mkdir(parents=True)
    shutil.copytree(celeba_root / "img_align_celeba", root / "Img" / "img_align_celeba")
    (root / "Anno").mkdir()
    (root / "Eval").mkdir()
    for lst in celeba_root.glob("list_*.txt"):
        shutil.copy(lst, root / ("Eval" if "partition" in lst.name else "Anno") / lst.name)
    shutil.copy(celeba_root / "identity_CelebA.txt", root / "Anno")
    report = build(CelebASource(root, maxcount=16), tmp_path / "out", progress=False)
    assert report.manifest["source"]["images"] == str(root / "Img" / "img_align_celeba")
    assert shard_bytes(report.out_dir) == shard_bytes(celeba_shards.out_dir)


@pytest.mark.parametrize("line", ["000001.jpg 7", "000001.jpg"])
def test_a_malformed_partition_line_exits_2_naming_file_and_line(tmp_path, celeba_root, line):
    root = tmp_path / "badline"
    shutil.copytree(celeba_root, root)
    lines = (root / "list_eval_partition.txt").read_text().splitlines()
    lines[0] = line
    (root / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    result = run_shards("celeba", "--root", root, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert "list_eval_partition.txt line 1" in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_manifest_records_whether_the_dataset_is_synthetic(celeba_root, celeba_shards, tmp_path):
    assert (celeba_root / SYNTHETIC_MARK).is_file()
    assert celeba_shards.manifest["source"]["synthetic"] is True and synthetic(celeba_shards.out_dir) is True
    root = tmp_path / "celeba"  # as CelebA is distributed: no mark
    shutil.copytree(celeba_root, root)
    (root / SYNTHETIC_MARK).unlink()
    out = build(CelebASource(root, maxcount=100), tmp_path / "out", progress=False).out_dir
    assert synthetic(out) is False and synthetic(out, celeba_shards.out_dir) is True
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["source"]["synthetic"]  # sharded before the record existed: unknown, never "real"
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert synthetic(out) is None


def test_hidden_files_beside_the_images_are_not_images(tmp_path, celeba_root):
    # macOS leaves a `._<name>` beside every file it copies to an exFAT or FAT drive: 202,599 of them, not skips.
    root = tmp_path / "from-a-mac"
    shutil.copytree(celeba_root, root)
    (root / "img_align_celeba" / "._000001.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert CelebASource(root).plan()[1] == CelebASource(celeba_root).plan()[1]


@pytest.mark.parametrize("dataset", ["celeba", "celebdf"])
@pytest.mark.parametrize("missing", ["dlib", "the landmark model"])
def test_missing_face_tools_exit_2_before_anything_is_written(tmp_path, request, dataset, missing):
    shadows = tmp_path / "shadows"  # found before the installed packages, as a broken environment would be
    if missing == "dlib":
        shadows.mkdir()
        (shadows / "dlib.py").write_text("raise ImportError('no module named _dlib_pybind11')\n")
        expected = "error: dlib is missing: install it with `pip install dlib-bin` (`make install` does)."
    else:
        (shadows / "face_recognition_models").mkdir(parents=True)
        (shadows / "face_recognition_models" / "__init__.py").write_text("")
        model = shadows / "face_recognition_models" / "models" / "shape_predictor_68_face_landmarks.dat"
        expected = f"error: The face landmark model {model} is missing: reinstall face-recognition-models."
    root = request.getfixturevalue(f"{dataset}_root")
    result = subprocess.run([sys.executable, "-m", "shards", dataset, "--root", str(root), "--out",
                             str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(shadows)})
    assert result.returncode == 2 and result.stderr.strip() == expected, result.stderr
    assert not (tmp_path / "out").exists()


def test_a_negative_upsample_is_refused_by_the_command_line(capsys):
    from shards.cli import build_parser

    for dataset in ("celeba", "celebdf"):
        with pytest.raises(SystemExit) as stop:
            build_parser().parse_args([dataset, "--root", "r", "--out", "o", "--upsample", "-1"])
        assert stop.value.code == 2 and "argument --upsample: -1 is below zero" in capsys.readouterr().err


def test_the_official_zip_unpacked_into_a_folder_of_its_name_is_the_official_layout(tmp_path, celeba_root, celeba_shards):
    root = tmp_path / "unzipped"
    shutil.copytree(celeba_root, root)
    (root / "img_align_celeba").rename(tmp_path / "images")
    (root / "img_align_celeba").mkdir()
    (tmp_path / "images").rename(root / "img_align_celeba" / "img_align_celeba")  # as `unzip -d img_align_celeba` leaves it
    report = build(CelebASource(root, maxcount=16), tmp_path / "out", progress=False)
    assert report.manifest["source"]["layout"] == "official"
    assert shard_bytes(report.out_dir) == shard_bytes(celeba_shards.out_dir)
