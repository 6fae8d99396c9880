import pytest

from pipeline.fsutil import atomic_path, remove_stale_tmp, tmp_name, write_json_atomic


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "manifest.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "half')
            raise RuntimeError("killed mid-write")
    assert target.read_text() == '{\n  "v": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_temporary_names_are_hidden_from_globs(tmp_path):
    tmp = tmp_name(tmp_path / "train-000000.tar")
    tmp.write_bytes(b"partial")
    assert list(tmp_path.glob("*.tar")) == []
    assert remove_stale_tmp(tmp_path) == [tmp]
    assert not tmp.exists()
