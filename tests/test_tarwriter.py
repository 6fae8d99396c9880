import io
import tarfile

import pytest
from wds2idx import IndexCreator  # DALI's own index tool, installed with nvidia-dali

from shards.tarwriter import Sample, index_text, tar_bytes, write_shard


def _samples(n: int) -> list[Sample]:
    return [
        Sample(f"k{i:03d}", {"jpg": bytes([i]) * (100 + 37 * i), "cls": str(i % 2).encode(), "json": b'{"i": %d}' % i}, i % 2)
        for i in range(n)
    ]


def test_index_matches_what_dalis_wds2idx_writes(tmp_path):
    info = write_shard(tmp_path / "train-000000.tar", _samples(7))
    with IndexCreator(str(tmp_path / "train-000000.tar"), str(tmp_path / "dali.idx"), verbose=False) as creator:
        creator.create_index()
    assert (tmp_path / info.index).read_text() == (tmp_path / "dali.idx").read_text()
    assert (tmp_path / info.index).read_text().startswith("v1.2 7\n")


def test_same_samples_give_identical_bytes():
    assert tar_bytes(_samples(5)) == tar_bytes(_samples(5))
    assert tar_bytes(_samples(5)) != tar_bytes(_samples(4))


def test_members_carry_fixed_metadata():
    with tarfile.open(fileobj=io.BytesIO(tar_bytes(_samples(3)))) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["k000.cls", "k000.jpg", "k000.json"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o444)}


def test_index_offsets_point_at_member_data():
    data = tar_bytes(_samples(4))
    lines = index_text(data).splitlines()[1:]
    fields = lines[2].split()
    ext, offset, size, name = fields[4:8]
    assert name == "k002.jpg" and ext == "jpg"
    assert data[int(offset) : int(offset) + int(size)] == bytes([2]) * (100 + 37 * 2)


@pytest.mark.parametrize("key", ["a.b", "a/b", "", "a b", "a\tb"])
def test_keys_that_webdataset_or_the_index_would_split_are_refused(key):
    with pytest.raises(ValueError, match="key"):
        Sample(key, {"jpg": b"x"}, 0)


def test_a_shard_interrupted_while_written_leaves_no_tar(tmp_path, monkeypatch):
    import pipeline.fsutil as fsutil

    real_fsync, calls = fsutil.os.fsync, []

    def fsync_then_die(fd):  # the index is synced first; "die" while the tar is synced
        calls.append(fd)
        if len(calls) == 2:
            raise OSError("killed")
        real_fsync(fd)

    monkeypatch.setattr(fsutil.os, "fsync", fsync_then_die)
    with pytest.raises(OSError, match="killed"):
        write_shard(tmp_path / "train-000000.tar", _samples(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.idx"]
