"""The loaders' face geometry: landmarks that follow flips, several dataset folders, real_only, formats."""

import json
import shutil
import tempfile

import numpy as np
import pytest
import torch

from pipeline.data import DataConfig, build_loader
from pipeline.errors import UserError
from test_data import _rewrite

LOADERS = ["dali", "baseline"]


def _cfg(shards, loader, **kw):
    base = dict(shards=shards, loader=loader, batch_size=4, threads=1, with_meta=True, shuffle_buffer=64)
    return DataConfig(**{**base, **kw})


def _by_key(cfg):
    with build_loader(cfg) as data:
        return {k: (img, lm) for b in data for k, img, lm in zip(b.keys, b.images, b.landmarks)}


@pytest.mark.parametrize("loader", LOADERS)
def test_landmarks_are_normalized_and_follow_the_flips(celebdf_shards, loader):
    shards = str(celebdf_shards.out_dir)
    plain = _by_key(_cfg(shards, loader, flip=False, shuffle=False, with_landmarks=True))
    flipped = _by_key(_cfg(shards, loader, flip=True, shuffle=False, with_landmarks=True))
    assert plain.keys() == flipped.keys()
    mirrored = 0
    for key, (image, landmarks) in plain.items():
        image_f, landmarks_f = flipped[key]
        assert landmarks.shape == (68, 2) and 0.05 < landmarks[30, 0] < 0.95  # the nose tip, inside the crop
        if torch.equal(image_f, image):
            assert torch.equal(landmarks_f, landmarks)
        else:
            mirrored += 1
            assert torch.allclose(image_f, image.flip(-1), atol=1e-6)
            assert torch.allclose(landmarks_f[:, 0], 1 - landmarks[:, 0]) and torch.equal(landmarks_f[:, 1], landmarks[:, 1])
    assert 0 < mirrored < len(plain)


@pytest.mark.parametrize("loader", LOADERS)
def test_real_only_reads_every_real_sample_of_several_folders_once(celeba_shards, celebdf_shards, loader):
    folders = [str(celeba_shards.out_dir), str(celebdf_shards.out_dir)]
    expected = celeba_shards.manifest["splits"]["train"]["samples"] + celebdf_shards.manifest["splits"]["train"]["labels"]["0"]
    keys, labels = [], []
    for rank in range(2):
        with build_loader(_cfg(folders, loader, real_only=True, drop_last=False), rank, 2) as data:
            for b in data:
                keys += b.keys
                labels += b.labels.tolist()
    assert set(labels) == {0} and len(set(keys)) == expected
    celeba = {k for k in keys if k.split("/")[1].isdigit()}  # CelebA's keys are its file numbers; DALI pads with repeats
    assert len(celeba) == celeba_shards.manifest["splits"]["train"]["samples"]
    assert all("-real_" in k for k in set(keys) - set(celeba))
    with build_loader(_cfg(folders, loader)) as data:  # without real_only, Celeb-DF's fakes come along
        assert data.split.samples == expected + celebdf_shards.manifest["splits"]["train"]["labels"]["1"]


def test_dali_keeps_no_index_file_on_disk_once_its_pipeline_is_built(celeba_shards, celebdf_shards, tmp_path, monkeypatch):
    # real_only's share of a shard and every shuffled run get index files of their own: a rank that is killed runs no
    # clean-up, so none may outlive the pipeline's build.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cfg = _cfg([str(celeba_shards.out_dir), str(celebdf_shards.out_dir)], "dali", real_only=True, shuffle_chunk=5)
    with build_loader(cfg) as data:
        epochs = [[(k, label) for b in data for k, label in zip(b.keys, b.labels.tolist())]]
        assert list(tmp_path.iterdir()) == []
        epochs.append([(k, label) for b in data for k, label in zip(b.keys, b.labels.tolist())])
        state = data.state_dict()
    with build_loader(cfg) as resumed:
        resumed.load_state_dict(state)
        epochs.append([(k, label) for b in resumed for k, label in zip(b.keys, b.labels.tolist())])
    assert list(tmp_path.iterdir()) == []
    for pairs in epochs:  # read from files deleted long before: real_only's share, each sample once
        assert len(set(pairs)) == len(pairs) > 0 and {label for _, label in pairs} == {0}


def test_shards_of_an_older_format_are_refused_with_the_reshard_command(celeba_shards, tmp_path):
    shards = tmp_path / "celeba"
    shutil.copytree(celeba_shards.out_dir, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    (shards / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(UserError, match=rf"is shard format 1, and this version reads format 2 .* `python -m shards celeba --root .* --out {tmp_path}`"):
        build_loader(_cfg(str(shards), "dali"))


@pytest.mark.parametrize("loader", LOADERS)
def test_shards_without_landmarks_are_named_with_the_fix_when_self_blends_need_them(celeba_shards, tmp_path, loader):
    shards = tmp_path / "celeba"
    shutil.copytree(celeba_shards.out_dir, shards)

    def drop_landmarks(samples):
        for s in samples:
            del s.fields["lmk"]
        return samples

    _rewrite(shards / "train-000000.tar", drop_landmarks)
    build_loader(_cfg(str(shards), loader)).close()  # a plain GAN needs no landmarks
    with pytest.raises(UserError, match=r"sample 000001 in .*train-000000.tar has no landmarks \(lmk\), which the self-blends need: write the shards again with `python -m shards`"):
        build_loader(_cfg(str(shards), loader, with_landmarks=True))


@pytest.mark.parametrize("loader", LOADERS)
def test_the_centre_crop_reads_celebas_original_files_and_refuses_face_crops(celeba_shards, celebdf_shards, loader):
    with build_loader(_cfg(str(celeba_shards.out_dir), loader, crop="center", shuffle=False, flip=False)) as data:
        centre = next(iter(data))
    with build_loader(_cfg(str(celeba_shards.out_dir), loader, crop="face", shuffle=False, flip=False)) as data:
        face = next(iter(data))
    assert centre.keys == face.keys and centre.images.shape == face.images.shape == (4, 3, 64, 64)
    assert (centre.images - face.images).abs().mean() > 0.05  # two geometries of the same image
    with pytest.raises(UserError, match=r"holds celebdf face crops, which have no centre crop: use data.crop=face"):
        build_loader(_cfg(str(celebdf_shards.out_dir), loader, crop="center"))
    with pytest.raises(UserError, match=r"data.crop center has no landmarks"):
        build_loader(_cfg(str(celeba_shards.out_dir), loader, crop="center", with_landmarks=True))
