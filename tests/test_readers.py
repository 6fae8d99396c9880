"""The shards read back with the two real readers: the webdataset library and DALI's webdataset reader."""

import json

import numpy as np
import pytest
import webdataset as wds
from nvidia.dali import fn, pipeline_def, types

from shards.manifest import load_manifest, shard_paths


@pytest.fixture(params=["celeba", "celebdf"])
def dataset(request):
    report = request.getfixturevalue(f"{request.param}_shards")
    return request.param, report.out_dir


def _expected(out_dir, split):
    return load_manifest(out_dir)["splits"][split]


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_the_webdataset_library_reads_every_sample_once(dataset, split):
    name, out_dir = dataset
    tars = [str(t) for t, _ in shard_paths(out_dir, split)]
    samples = list(wds.WebDataset(tars, shardshuffle=False, empty_check=False).decode("rgb"))
    expected = _expected(out_dir, split)
    assert len(samples) == expected["samples"]
    assert len({s["__key__"] for s in samples}) == len(samples)
    labels = {}
    for s in samples:
        labels[str(s["cls"])] = labels.get(str(s["cls"]), 0) + 1
        assert s["json"]["split"] == split
        assert s["jpg"].dtype == np.float32 and s["jpg"].ndim == 3
        if name == "celebdf":
            assert s["cls"] == int(s["json"]["folder"] == "Celeb-synthesis")
    assert labels == expected["labels"]


def _dali_epoch(tars, indexes, batch_size=8):
    @pipeline_def(batch_size=batch_size, num_threads=2, device_id=None)
    def reader():
        jpg, cls, meta = fn.readers.webdataset(
            paths=tars, index_paths=indexes, ext=["jpg", "cls", "json"],
            missing_component_behavior="error", name="shards", pad_last_batch=True,
        )
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), cls, meta

    pipe = reader()
    pipe.build()
    n = pipe.epoch_size("shards")
    images, labels, metas = [], [], []
    for _ in range((n + batch_size - 1) // batch_size):
        img, cls, meta = pipe.run()
        for i in range(len(img)):
            images.append(img.at(i).shape)
            labels.append(int(bytes(cls.at(i))))
            metas.append(json.loads(bytes(meta.at(i))))
    return n, images[:n], labels[:n], metas[:n]


@pytest.mark.parametrize("split", ["train", "test"])
def test_dali_reads_the_shards_through_their_index_files(dataset, split):
    name, out_dir = dataset
    pairs = shard_paths(out_dir, split)
    n, shapes, labels, metas = _dali_epoch([str(t) for t, _ in pairs], [str(i) for _, i in pairs])
    expected = _expected(out_dir, split)
    assert n == expected["samples"]
    ids = [(m.get("file") or m["video"], m.get("frame")) for m in metas]
    assert len(set(ids)) == n
    assert {str(k): labels.count(k) for k in set(labels)} == expected["labels"]
    assert set(shapes) == ({(256, 256, 3)} if name == "celeba" else {(128, 128, 3)})  # the face crops
