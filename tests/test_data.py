"""The loaders on the CPU (DALI in CPU mode and the baseline), over deliberately uneven shards."""

import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time

import pytest
import torch
from conftest import REPO

from pipeline.data import DataConfig, build_loader
from pipeline.errors import UserError
from shards.build import build
from shards.celeba import CelebASource
from shards.tarwriter import Sample, write_shard

LOADERS = ["dali", "baseline"]


@pytest.fixture(scope="module")
def uneven(celeba_root, tmp_path_factory):
    """CelebA shards of 10, 10, 10, 10 and 8 training images."""
    report = build(CelebASource(celeba_root, maxcount=10), tmp_path_factory.mktemp("uneven"), progress=False)
    assert [e["samples"] for e in report.manifest["shards"] if e["split"] == "train"] == [10, 10, 10, 10, 8]
    return report.out_dir


def _cfg(shards, loader, **kw):
    # Runs of 3 samples: DALI reads the 10-sample shards as runs of 3, 3, 3 and 1 (at the default 128, whole).
    base = dict(shards=str(shards), loader=loader, batch_size=4, threads=2, with_meta=True, shuffle_buffer=64, shuffle_chunk=3)
    return DataConfig(**{**base, **kw})


def _epoch_keys(loader):
    return [k for b in loader for k in b.keys]


@pytest.mark.parametrize("loader", LOADERS)
def test_batches_have_the_promised_shape_dtype_and_range(uneven, loader):
    with build_loader(_cfg(uneven, loader)) as data:
        batch = next(iter(data))
    assert batch.images.shape == (4, 3, 64, 64) and batch.images.dtype == torch.float32
    assert -1 <= batch.images.min() < -0.5 and 0.5 < batch.images.max() <= 1
    assert batch.labels.tolist() == [0, 0, 0, 0] and len(batch.keys) == 4


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_and_channels_last(uneven, loader, dtype):
    with build_loader(_cfg(uneven, loader, dtype=dtype, channels_last=True, image_size=32)) as data:
        images = next(iter(data)).images
    assert images.shape == (4, 3, 32, 32) and images.dtype == getattr(torch, dtype)
    assert images.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("batch_size", [4, 5])  # 5: a rank's part holds more than the epoch's batches
def test_ranks_get_equal_batch_counts_and_each_sample_once(uneven, loader, world_size, batch_size):
    epochs = 3  # DALI's reader deals the parts out afresh at each epoch: check more than the first
    per_rank = []
    for rank in range(world_size):
        with build_loader(_cfg(uneven, loader, batch_size=batch_size), rank, world_size) as data:
            per_rank.append([_epoch_keys(data) for _ in range(epochs)])
            assert all(len(keys) == len(data) * batch_size for keys in per_rank[-1])
    assert len({len(k) for keys in per_rank for k in keys}) == 1  # the same number of batches on every rank
    assert len(per_rank[0][0]) == (48 // world_size) // batch_size * batch_size
    for epoch in range(epochs):
        everything = [k for keys in per_rank for k in keys[epoch]]
        assert len(set(everything)) == len(everything)  # no sample twice in an epoch, across ranks


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("world_size, batch_size", [(2, 5), (5, 3)])  # parts of 24; of 9, 10, 9, 10 and 10
def test_without_drop_last_every_sample_is_read_exactly_once(uneven, loader, world_size, batch_size):
    parts, counted, batches = [], [], []
    for rank in range(world_size):
        cfg = _cfg(uneven, loader, drop_last=False, shuffle=False, batch_size=batch_size)
        with build_loader(cfg, rank, world_size) as data:
            epoch = list(data)
            batches.append((len(epoch), data.common_batches()))
        keys = [k for b in epoch for k in b.keys]
        whole = len(epoch) * batch_size
        assert len(keys) == whole if loader == "dali" else len(keys) <= whole  # DALI pads the last batch
        parts.append(set(keys))  # DALI's pad copies carry the key of the sample they copy
        counted += [k for b in epoch for k in b.keys[:b.valid]]  # what validation counts: the padding left out
    assert sum(len(p) for p in parts) == 48 and len(set().union(*parts)) == 48
    assert sorted(counted) == sorted(set().union(*parts))
    assert {common for _, common in batches} == {min(count for count, _ in batches)}
    assert len({count for count, _ in batches}) == (2 if world_size == 5 else 1)


@pytest.mark.parametrize("loader", LOADERS)
def test_the_order_is_a_function_of_seed_and_epoch(uneven, loader):
    def two_epochs(seed):
        with build_loader(_cfg(uneven, loader, seed=seed)) as data:
            return _epoch_keys(data), _epoch_keys(data)

    a, b, c = two_epochs(0), two_epochs(0), two_epochs(1)
    assert a == b
    assert a[0] != a[1]  # a new order each epoch
    assert a != c


@pytest.mark.parametrize("loader", LOADERS)
def test_each_epoch_deals_the_split_out_afresh(uneven, loader):
    # A small buffer: DALI's epoch order is then mostly the order of its runs, which must change every epoch, the
    # same way on every rank; else the global batch at step t would draw from the same few runs every epoch.
    per_rank = []
    for rank in range(2):
        with build_loader(_cfg(uneven, loader, shuffle_buffer=2), rank, 2) as data:
            per_rank.append([_epoch_keys(data) for _ in range(3)])
    heads = [{k for keys in per_rank for k in keys[epoch][:8]} for epoch in range(3)]  # the first 2 global steps
    overlaps = [len(heads[e] & heads[e + 1]) for e in range(2)]
    assert max(overlaps) <= 10, overlaps  # 16 of 48 samples: 5.3 in common expected, 16 if the order repeats


@pytest.mark.parametrize("loader", LOADERS)
def test_the_same_seed_gives_the_same_pixels_and_flips(uneven, loader):
    def first(seed):
        with build_loader(_cfg(uneven, loader, seed=seed)) as data:
            return next(iter(data)).images

    assert torch.equal(first(3), first(3))


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("where", ["mid-epoch", "an epoch's last batch"])
def test_a_restored_position_sees_exactly_the_batches_of_an_uninterrupted_run(uneven, loader, where):
    with build_loader(_cfg(uneven, loader)) as data:
        uninterrupted = [b.keys for _ in range(4) for b in data]
        batches = len(data)
    take = 2 if where == "mid-epoch" else batches
    with build_loader(_cfg(uneven, loader)) as data:
        seen = [b.keys for _ in range(2) for b in data]  # saved in epoch 2: DALI has dealt the split out thrice
        it = iter(data)
        seen += [next(it).keys for _ in range(take)]
        state = data.state_dict()  # as the trainer saves it: while the last batch taken trains
    assert {k: state[k] for k in ("epoch", "batch", "world_size", "batch_size")} == {
        "epoch": 2, "batch": take, "world_size": 1, "batch_size": 4}
    with build_loader(_cfg(uneven, loader)) as resumed:
        resumed.load_state_dict(state)
        seen += [b.keys for _ in range(4 - resumed.epoch) for b in resumed]
        assert resumed.state_dict()["epoch"] == 4
    assert seen == uninterrupted


def test_dali_builds_one_pipeline_per_run(uneven):
    with build_loader(_cfg(uneven, "dali")) as data:
        pipes = set()
        for _ in range(3):
            for _ in data:
                pipes.add(id(data._pipe))
        assert len(pipes) == 1 and data.epoch == 3


def test_dali_mixes_runs_of_every_shard_from_the_first_batch(uneven):
    def first_shards(chunk):  # the shards of the first 12 samples, with a buffer of 4
        with build_loader(_cfg(uneven, "dali", shuffle_buffer=4, shuffle_chunk=chunk, batch_size=12)) as data:
            return {key.split("/")[0] for key in next(iter(data)).keys}

    assert len(first_shards(0)) <= 2  # whole 10-sample shards: one after the other
    assert len(first_shards(3)) >= 3


def _state_after(cfg, batches: int) -> dict:
    with build_loader(cfg) as data:
        it = iter(data)
        for _ in range(batches):
            next(it)
        return data.state_dict()


def _resumed_epoch(cfg, state) -> tuple[list[str], int]:
    """The keys of the rest of the resumed epoch, and the epoch's batch count."""
    with build_loader(cfg) as resumed:
        resumed.load_state_dict(state)
        return [k for b in resumed for k in b.keys], len(resumed)


def test_dali_resumed_with_another_reader_starts_a_fresh_stream_at_the_saved_position(uneven, caplog):
    state = _state_after(_cfg(uneven, "dali"), 2)
    # With landmarks the pipeline has another reader output, which DALI's saved state does not hold.
    rest, batches = _resumed_epoch(_cfg(uneven, "dali", with_landmarks=True), state)
    assert len(rest) == (batches - 2) * 4 and len(set(rest)) == len(rest)
    assert "loader resumed from a checkpoint with another reader" in caplog.text


def test_a_dali_state_that_does_not_restore_starts_a_fresh_stream(uneven, caplog):
    state = _state_after(_cfg(uneven, "dali"), 1)
    state["dali"] = state["dali"][: len(state["dali"]) // 2]  # as another DALI version's might not parse
    rest, batches = _resumed_epoch(_cfg(uneven, "dali"), state)
    assert len(rest) == (batches - 1) * 4 and len(set(rest)) == len(rest)
    assert "the saved DALI state does not fit this pipeline" in caplog.text


def test_a_dali_state_that_restores_on_one_rank_only_starts_a_fresh_stream_on_every_rank(uneven, tmp_path):
    # DALI deals the parts out afresh at each reader epoch: a rank alone at a fresh reader epoch 0 would read its
    # epoch-0 part while its neighbour, restored at epoch 1, reads epoch 1's, and the two overlap.
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "tests/dali_two_ranks.py", str(uneven)], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    keys = {int(r): json.loads(k) for r, k in re.findall(r"KEYS rank (\d): (.*)", result.stdout)}
    assert sorted(keys) == [0, 1] and keys[0] and keys[1]
    assert not set(keys[0]) & set(keys[1]), "both ranks read the same part"
    assert "the saved DALI state does not fit this pipeline on 1 rank(s)" in result.stdout + result.stderr


def test_a_split_that_shrank_since_the_save_resumes_at_its_epochs_end(uneven, tmp_path):
    with build_loader(_cfg(uneven, "dali")) as data:
        state = {**data.state_dict(), "batch": len(data) - 1}
    shards = _copy(uneven, tmp_path)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["shards"] = [s for s in manifest["shards"] if s["file"] != "train-000000.tar"]  # 38 samples: 9 batches
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with build_loader(_cfg(shards, "dali")) as resumed:
        resumed.load_state_dict(state)
        assert resumed.batch == len(resumed) == 9
        assert list(resumed) == [] and resumed.epoch == 1
        keys = [k for b in resumed for k in b.keys]
    assert len(keys) == 36 and len(set(keys)) == 36


def test_the_baselines_workers_are_not_forks_of_a_process_with_threads(uneven):
    # A fork copies the locks other threads hold at that moment (DALI's threads, here), and such a worker once waited
    # forever in the test suite. The workers come from a forkserver: their parent is not this process.
    import os
    from pathlib import Path

    with build_loader(_cfg(uneven, "dali")) as dali:  # DALI's threads alive in this process while the workers start
        next(iter(dali))
        assert len(os.listdir("/proc/self/task")) > 1
        with build_loader(_cfg(uneven, "baseline")) as data:
            batches = iter(data)
            next(batches)
            workers = data._workers._workers
            assert len(workers) == 2
            parents = {int(Path(f"/proc/{w.pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) for w in workers}
            assert os.getpid() not in parents and len(parents) == 1  # one forkserver
            assert len(list(batches)) == len(data) - 1


def test_resuming_with_another_world_size_keeps_the_count_of_samples_seen(uneven):
    with build_loader(_cfg(uneven, "baseline"), 0, 2) as data:
        data.load_state_dict({"epoch": 3, "batch": 4, "world_size": 1, "batch_size": 4, "seed": 0})
        assert (data.epoch, data.batch) == (3, 2)
        assert len(list(data)) == len(data) - 2


@pytest.mark.parametrize("split", ["val", "test"])
def test_dali_and_the_baseline_give_the_same_pixels(celeba_shards, celebdf_shards, split):
    for shards, size in ((celeba_shards.out_dir, 64), (celebdf_shards.out_dir, 96)):
        out = {}
        for loader in LOADERS:
            cfg = _cfg(shards, loader, split=split, shuffle=False, flip=False, batch_size=2, image_size=size)
            with build_loader(cfg) as data:
                out[loader] = {k: img for b in data for k, img in zip(b.keys, b.images)}
        assert out["dali"].keys() == out["baseline"].keys() and out["dali"]
        diff = torch.stack([out["dali"][k] - out["baseline"][k] for k in out["dali"]]).abs() * 127.5  # grey levels
        assert diff.mean() < 0.5 and diff.flatten().quantile(0.99) <= 2, (diff.mean(), diff.max())


@pytest.mark.parametrize("loader", LOADERS)
def test_loaders_shut_down_cleanly_and_a_second_one_works(uneven, loader):
    threads_before = threading.active_count()
    with build_loader(_cfg(uneven, loader)) as data:
        next(iter(data))  # an epoch left half-way
    with build_loader(_cfg(uneven, loader)) as data:
        assert len(_epoch_keys(data)) == 48
    assert multiprocessing.active_children() == []
    deadline = time.monotonic() + 5  # queue feeder threads end on their own once their queue is closed
    while threading.active_count() > threads_before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() <= threads_before, [t.name for t in threading.enumerate()]


# ---------------------------------------------------------------- bad input

def _copy(src, tmp_path):
    dst = tmp_path / "shards"
    shutil.copytree(src, dst)
    return dst


def _rewrite(tar_path, edit):
    """Rewrite a shard (and its index) from its samples after `edit(samples)`, as another tool might."""
    with tarfile.open(tar_path) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar}
    samples = {}
    for name, data in files.items():
        key, ext = name.split(".", 1)
        samples.setdefault(key, {})[ext] = data
    edited = edit([Sample(k, v, 0) for k, v in sorted(samples.items())])
    info = write_shard(tar_path, edited)
    manifest = tar_path.parent / "manifest.json"  # and record its new size, as a run of `python -m shards` would
    data = json.loads(manifest.read_text())
    for shard in data["shards"]:
        if shard["file"] == tar_path.name:
            shard["bytes"] = info.bytes
    manifest.write_text(json.dumps(data))


@pytest.mark.parametrize("loader", LOADERS)
def test_a_corrupt_jpeg_in_a_shard_is_named_by_shard_and_key(uneven, tmp_path, loader):
    shards = _copy(uneven, tmp_path)

    def corrupt(samples):
        samples[3].fields["jpg"] = samples[3].fields["jpg"][:200] + bytes(range(256)) * 4
        return samples

    _rewrite(shards / "train-000002.tar", corrupt)
    with pytest.raises(UserError, match=r"train-000002.tar holds sample 000024, whose JPEG does not decode") as error:
        with build_loader(_cfg(shards, loader, shuffle=False, threads=1)) as data:
            list(data)
    # One sentence: not the baseline's worker traceback, which DataLoader makes the message of what it re-raises.
    assert str(error.value).startswith(str(shards / "train-000002.tar")) and "\n" not in str(error.value)


def test_a_dali_error_that_is_not_a_decoders_is_passed_on_without_a_rescan(uneven, tmp_path):
    shards = _copy(uneven, tmp_path)
    data = build_loader(_cfg(shards, "dali", shuffle=False))
    tar = shards / "train-000002.tar"
    content = tar.read_bytes()
    tar.write_bytes(content[:len(content) // 3])  # cut short after the index was read: the reader fails, not a decoder
    with pytest.raises(RuntimeError) as caught:
        for _ in range(2):
            list(data)
    data.close()
    # A rescan would have found the cut JPEGs and named one (a UserError); DALI's own error names the reader.
    assert not isinstance(caught.value, UserError) and "readers.webdataset" in str(caught.value)


def test_a_shard_cut_short_or_replaced_is_named_before_reading(uneven, tmp_path):
    shards = _copy(uneven, tmp_path)
    tar = shards / "train-000002.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 3])
    with pytest.raises(UserError, match=rf"{tar} holds \d+ bytes where .*manifest.json records \d+: it was cut short"):
        build_loader(_cfg(shards, "baseline"))


def test_a_malformed_index_line_is_named_and_blank_lines_are_skipped(uneven, tmp_path):
    shards = _copy(uneven, tmp_path)
    idx = shards / "train-000001.idx"
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join(lines) + "\n\n")  # a trailing blank line reads as nothing
    assert build_loader(_cfg(shards, "baseline")).split.samples == build_loader(_cfg(uneven, "baseline")).split.samples
    idx.write_text("\n".join([lines[0], lines[1].rsplit(" ", 1)[0]] + lines[2:]) + "\n")  # a member's name cut off
    with pytest.raises(UserError, match=rf"{idx} line 2 is not '<ext> <offset> <size> <name>' per member"):
        build_loader(_cfg(shards, "baseline"))


@pytest.mark.parametrize("loader", LOADERS)
def test_a_shard_without_an_index_is_named(uneven, tmp_path, loader):
    shards = _copy(uneven, tmp_path)
    (shards / "train-000001.idx").unlink()
    with pytest.raises(UserError, match=r"train-000001.tar has no index file train-000001.idx"):
        build_loader(_cfg(shards, loader))


@pytest.mark.parametrize("loader", LOADERS)
def test_a_sample_without_cls_is_named(uneven, tmp_path, loader):
    shards = _copy(uneven, tmp_path)

    def drop_cls(samples):
        del samples[5].fields["cls"]
        return samples

    _rewrite(shards / "train-000000.tar", drop_cls)
    with pytest.raises(UserError, match=r"sample 000006 in .*train-000000.tar has no cls"):
        build_loader(_cfg(shards, loader))


@pytest.mark.parametrize("loader", LOADERS)
def test_a_cls_of_more_than_one_digit_is_named(uneven, tmp_path, loader):
    shards = _copy(uneven, tmp_path)

    def newline(samples):  # "1\n", as a tool writing text files might
        samples[2].fields["cls"] = b"0\n"
        return samples

    _rewrite(shards / "train-000001.tar", newline)
    with pytest.raises(UserError, match=r"sample 000013 in .*train-000001.tar has a cls of 2 bytes where the loaders read one"):
        build_loader(_cfg(shards, loader))


def test_an_empty_split_and_too_small_a_split_are_clear_errors(celeba_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(celeba_root, root)
    for line in (root / "list_eval_partition.txt").read_text().splitlines():
        name, part = line.split()
        if part == "1":
            (root / "img_align_celeba" / name).unlink()
    out = build(CelebASource(root), tmp_path / "out", progress=False).out_dir
    with pytest.raises(UserError, match=r"holds no samples in split 'val': choose another split"):
        build_loader(_cfg(out, "dali", split="val"))
    with pytest.raises(UserError, match=r"split 'test' has 6 samples, fewer than world size 2 x batch_size 4"):
        build_loader(_cfg(out, "dali", split="test"), 0, 2)
    with pytest.raises(UserError, match=r"split 'test' has 6 samples, fewer than the 7 ranks: use fewer ranks"):
        build_loader(_cfg(out, "dali", split="test", drop_last=False), 0, 7)  # validation's and evaluation's reading
    with pytest.raises(UserError, match=r"data.loader 'torch' is neither"):
        build_loader(_cfg(out, "torch"))
    with pytest.raises(UserError, match=r"data.shuffle_chunk is -1: it must be 0 \(whole shards\) or more"):
        build_loader(_cfg(out, "dali", shuffle_chunk=-1))


@pytest.mark.gpu
def test_dali_decodes_on_the_gpu_like_on_the_cpu(uneven):
    out = {}
    for device in ("cpu", "cuda"):
        with build_loader(_cfg(uneven, "dali", shuffle=False, flip=False), device=device) as data:
            batch = next(iter(data))
            assert batch.images.device.type == device
            out[device] = dict(zip(batch.keys, batch.images.cpu()))
    assert out["cpu"].keys() == out["cuda"].keys()
    diff = torch.stack([out["cpu"][k] - out["cuda"][k] for k in out["cpu"]]).abs() * 127.5
    assert diff.mean() < 1.0


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_rank_with_a_shorter_part_never_reads_dalis_padding_as_the_next_epoch(uneven, shuffle):
    # 48 samples over 5 ranks: parts of 9 or 10. DALI pads every part to 10 (pad_last_batch repeats the last
    # sample), so rank 0's reader epoch holds 4 batches of 3 where its own part fills 3: the 4th, of padding,
    # must be drained, not read as the next epoch's first batch.
    with build_loader(_cfg(uneven, "dali", batch_size=3, shuffle=shuffle, flip=False), rank=0, world_size=5) as data:
        epochs = [_epoch_keys(data) for _ in range(3)]
    assert all(len(keys) == 9 and len(set(keys)) == 9 for keys in epochs), epochs
    if not shuffle:  # an unshuffled loader (validation) reads the same faces every epoch
        assert epochs[0] == epochs[1] == epochs[2]
