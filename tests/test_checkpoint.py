"""The checkpoint folder's rules: the newest k kept, and a run that went on from an older checkpoint."""

from pipeline.checkpoint import SUPERSEDED, CheckpointManager


def test_a_run_resumed_from_an_older_checkpoint_keeps_its_own_and_auto_resumes_it(tmp_path):
    ckpt = CheckpointManager(tmp_path, keep_last=2)
    for step in (1000, 2000, 3000):
        ckpt.save({"step": step}, step)
    assert [p.name for p in ckpt.existing()] == ["step-00003000.pt", "step-00002000.pt"]
    # train.resume=<step-2000 file>, then the new branch saves at 2500: the old branch's 3000 must not win.
    path = ckpt.save({"step": 2500}, 2500)
    assert path.is_file() and ckpt.find("auto") == path
    assert [p.name for p in ckpt.existing()] == ["step-00002500.pt", "step-00002000.pt"]
    (aside,) = (tmp_path / SUPERSEDED).iterdir()
    assert [p.name for p in aside.iterdir()] == ["step-00003000.pt"]
    # Back again, to before every checkpoint kept: the new one is the only one left, and nothing is lost.
    path = ckpt.save({"step": 1500}, 1500)
    assert ckpt.existing() == [path] and ckpt.find("auto") == path
    moved = sorted(p.name for p in (tmp_path / SUPERSEDED).glob("*/*.pt"))
    assert moved == ["step-00002000.pt", "step-00002500.pt", "step-00003000.pt"]
