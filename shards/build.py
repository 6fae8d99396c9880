"""The driver every dataset shares: plan shards, process items in parallel, write, record, resume.

A dataset is a `Source`: it validates its root and lists its work items per split (raising
`UserError` before anything is written), and turns one item (an image, a video) into samples or
skip records. Items are assigned to shards before any is processed, so a shard's content depends
only on the input and the arguments: shards can be written in parallel, checked and reused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import multiprocessing as mp
import re
import signal
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

from tqdm import tqdm

import shards
from pipeline.errors import UserError
from pipeline.faces import DEFAULT_GEOMETRY
from pipeline.fsutil import TMP_MARKER, remove_stale_tmp, write_json_atomic
from shards.manifest import FORMAT_VERSION, GEOMETRY, SYNTHETIC_MARK, manifest_path, read_previous, shard_is_intact
from shards.tarwriter import Sample, write_shard

SPLITS = ("train", "val", "test")
SHARD_FILE = re.compile(r"^(train|val|test)-\d{6}\.(tar|idx)$")
LOCK_FILE = ".shards.lock"  # in OUT/<dataset>/, held by the run writing there
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)  # a file system that takes no more writes

log = logging.getLogger(__name__)


class WorkerDied(UserError):
    """A worker process ended without a result (killed for memory, or a crash in a decoder)."""

    exit_code = 3


@dataclass
class ItemResult:
    samples: list[Sample] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"file", "reason", ...}
    notes: list[dict[str, Any]] = field(default_factory=list)  # {"file", "note"}: kept, but made differently


def read_list_text(path: Path) -> str:
    """A dataset's list file as text (UTF-8, with or without a byte-order mark): one that is not, re-saved as UTF-16
    by an editor, or unreadable, is one sentence naming it."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text (an editor may have saved it as UTF-16): save it as plain text, "
                        "or restore it from the dataset.") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror or e}): check its permissions, or restore it from the "
                        "dataset.") from None


def visible_files(folder: Path) -> list[Path]:
    """The files of a dataset's folder by name, without hidden ones: macOS leaves a `._<name>` beside every file it
    copies to an exFAT or FAT drive."""
    return [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]


class Source(Protocol):
    dataset: str  # the output folder's name: "celeba", "celebdf"
    root: Path  # the dataset as distributed (or as shards/synth writes it, with SYNTHETIC_MARK)
    item_unit: str  # what the progress bar counts: "img", "video"
    items_per_shard: int

    def describe(self) -> dict[str, Any]:
        """Facts for the manifest: root, layout found, and so on."""

    def content_args(self) -> dict[str, Any]:
        """The arguments that change the shards' bytes (not --workers)."""

    def plan(self) -> tuple[dict[str, list[Any]], list[dict[str, Any]]]:
        """Items per split in their final order, and the skips found while listing."""

    def item_id(self, item: Any) -> str:
        """A stable text naming the item and its input (path, size and modification time, as rsync's quick check
        and make tell a changed file), for the plan checksum: a replaced input redoes its shard."""

    def process(self, item: Any) -> ItemResult: ...


@dataclass
class ShardPlan:
    split: str
    name: str  # "train-000003"
    items: list[Any]
    plan_sha256: str


@dataclass
class BuildReport:
    out_dir: Path
    manifest: dict[str, Any]
    shards_written: int
    shards_reused: int
    items_processed: int
    seconds: float

    @property
    def items_per_s(self) -> float:
        return self.items_processed / self.seconds if self.seconds > 0 else 0.0


def make_plans(source: Source, items_by_split: dict[str, list[Any]]) -> list[ShardPlan]:
    header = json.dumps(
        {"dataset": source.dataset, "version": shards.__version__, **source.content_args()}, sort_keys=True
    )
    plans = []
    for split in SPLITS:
        items = items_by_split.get(split, [])
        for n, start in enumerate(range(0, len(items), source.items_per_shard)):
            chunk = items[start : start + source.items_per_shard]
            h = hashlib.sha256(header.encode())
            for item in chunk:
                h.update(b"\n" + source.item_id(item).encode())
            plans.append(ShardPlan(split, f"{split}-{n:06d}", chunk, h.hexdigest()))
    return plans


# Worker processes get the source once, through the pool initializer, not with every item.
_worker_source: Source | None = None


def _init_worker(source: Source) -> None:
    global _worker_source
    _worker_source = source
    import cv2

    cv2.setNumThreads(1)  # parallelism comes from the processes; threads inside them only contend


def _process(task: tuple[int, Any]) -> tuple[int, ItemResult]:
    shard_no, item = task
    assert _worker_source is not None
    return shard_no, _worker_source.process(item)


def _results(source: Source, tasks: list[tuple[int, Any]], workers: int) -> Iterator[tuple[int, ItemResult]]:
    if workers <= 1:
        _init_worker(source)
        yield from map(_process, tasks)
        return
    # spawn, not fork: forked children inherit OpenCV's and dlib's thread pools in unknown states. An executor, not a
    # multiprocessing.Pool: when a worker dies (the out-of-memory killer, a decoder's crash) the executor breaks, where
    # a Pool starts another worker and waits for the lost task's result forever.
    executor = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=(source,))
    chunk = max(1, min(64, len(tasks) // (workers * 8)))
    results = executor.map(_process, tasks, chunksize=chunk)
    processes = list((executor._processes or {}).values())  # started by map (shutdown forgets them; 3.14 has terminate_workers)
    try:
        yield from results
    except BrokenProcessPool:
        executor.shutdown()  # its thread reaps the workers: their exit codes are set only once it has
        raise WorkerDied(f"a worker process died while sharding {source.root} ({_how_workers_ended(processes)}; SIGKILL is most "
                         "often the system's out-of-memory killer): run the same command again with fewer --workers; the "
                         "shards already written are kept.") from None
    except BaseException:  # an interrupt, or a failure here: the workers' chunks in progress are not waited for
        executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
        raise
    executor.shutdown()


def _how_workers_ended(processes: list) -> str:
    """'killed by SIGKILL', 'exit code 1', ...: what the workers that died of themselves died of (the executor ends the
    others with SIGTERM)."""
    codes = sorted({p.exitcode for p in processes if p.exitcode not in (None, 0, -signal.SIGTERM)})
    return ", ".join(f"killed by {signal.Signals(-c).name}" if c < 0 else f"exit code {c}" for c in codes) or "no exit code"


@contextlib.contextmanager
def _sole_writer(out: Path) -> Iterator[None]:
    """Hold OUT/<dataset>/.shards.lock for the run: a second run into the same folder would delete this one's
    temporary files and replace its shards under it. Where the folder cannot hold the lock (a file system without
    flock, as Lustre mounted without it; a lock file of another user's), the run goes on unguarded, with a warning."""
    path = out / LOCK_FILE
    with contextlib.ExitStack() as held:  # the lock goes with the file's closing, however the run ends
        try:
            fcntl.flock(held.enter_context(open(path, "a+")), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another run of `python -m shards` is writing {out} (it holds {path}): wait for it to end, "
                            "or stop it, then run this command again.") from None
        except OSError as e:
            if e.errno in WRITE_ERRNOS:  # not a file system without locks: one that takes no writes at all
                raise
            log.warning("cannot lock %s (%s): a second run into %s at the same time would not be refused", path,
                        e.strerror or e, out)
        yield


def _summary(shard_entries: list[dict[str, Any]], plan_skips: list[dict[str, Any]]) -> tuple[dict, dict]:
    splits: dict[str, dict[str, Any]] = {}
    for e in shard_entries:
        s = splits.setdefault(e["split"], {"shards": 0, "samples": 0, "bytes": 0, "labels": Counter()})
        s["shards"] += e["samples"] > 0
        s["samples"] += e["samples"]
        s["bytes"] += e["bytes"]
        s["labels"].update(e["labels"])
    for s in splits.values():
        s["labels"] = dict(sorted(s["labels"].items()))
    items = plan_skips + [k for e in shard_entries for k in e["skipped"]]
    by_reason = dict(sorted(Counter(k["reason"] for k in items).items()))
    notes = [k for e in shard_entries for k in e.get("notes", [])]
    by_note = dict(sorted(Counter(k["note"] for k in notes).items()))
    return splits, {"total": len(items), "by_reason": by_reason, "items": items}, {"total": len(notes), "by_note": by_note, "items": notes}


def build(
    source: Source,
    out_root: Path,
    *,
    workers: int = 1,
    arguments: dict[str, Any] | None = None,
    progress: bool = True,
) -> BuildReport:
    """Write `out_root/<dataset>/`, reusing the shards a previous run finished."""
    t0 = time.perf_counter()
    items_by_split, plan_skips = source.plan()  # raises UserError before anything is written
    plans = make_plans(source, items_by_split)
    out = Path(out_root) / source.dataset
    try:
        out.mkdir(parents=True, exist_ok=True)
        with _sole_writer(out):
            return _build_in(source, out, plans, plan_skips, workers, arguments, progress, t0)
    except OSError as e:
        if sentence := _write_failure(e, out):
            raise UserError(sentence) from e
        raise


def _write_failure(e: OSError, out: Path) -> str | None:
    """One sentence for a write that failed in `out` (or creating it): a full disk, a read-only mount, a path through a
    file. Shards are written under temporary names and renamed, and the manifest after each, so what it lists stays
    whole. None for any other error (reading the dataset, starting the workers)."""
    if e.filename:
        where = Path(e.filename)
        if where.name.startswith(".") and TMP_MARKER in where.name:  # atomic_path's temporary file: name the file it makes
            where = where.with_name(where.name[1:where.name.index(TMP_MARKER)])
        if where != out and out not in where.parents and where not in out.parents:
            return None
    elif e.errno in WRITE_ERRNOS:  # a write() to an open file names none
        where = out
    else:
        return None
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left to write {where} ({e.strerror}): free some and run the same command again (it reuses the "
                "shards written so far), or pass another --out.")
    return f"cannot write {where} ({e.strerror or e}): pass an --out folder you can write to."


def _build_in(source: Source, out: Path, plans: list[ShardPlan], plan_skips: list[dict[str, Any]], workers: int,
              arguments: dict[str, Any] | None, progress: bool, t0: float) -> BuildReport:
    for stale in remove_stale_tmp(out):
        log.info("removed %s, left by an interrupted run", stale.name)

    previous = read_previous(out) or {}
    old_entries = {e["file"]: e for e in previous.get("shards", [])}
    entries: dict[int, dict[str, Any]] = {}
    for n, plan in enumerate(plans):
        old = old_entries.get(f"{plan.name}.tar")
        if old and old.get("plan_sha256") == plan.plan_sha256 and shard_is_intact(out, old):
            entries[n] = old
    reused = len(entries)

    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "dataset": source.dataset,
        "tool": {"name": "deepfake-shards", "version": shards.__version__},
        "source": {**source.describe(), "synthetic": (Path(source.root) / SYNTHETIC_MARK).is_file()},
        "geometry": GEOMETRY,
        "faces": {k: source.content_args()[k] for k in DEFAULT_GEOMETRY},  # what detection must repeat (detection_geometry)
        "arguments": arguments or {},
        "complete": False,
    }

    def save(complete: bool) -> None:
        done = [entries[n] for n in sorted(entries)]
        manifest["complete"] = complete
        manifest["splits"], manifest["skipped"], manifest["notes"] = _summary(done, plan_skips)
        manifest["shards"] = done
        write_json_atomic(manifest_path(out), manifest)

    # The old manifest goes before any of its shards does: one killed in between must not leave a complete manifest
    # that lists deleted files.
    save(complete=False)
    planned_files = {f"{p.name}.{ext}" for p in plans for ext in ("tar", "idx")}
    for f in sorted(out.iterdir()):
        if SHARD_FILE.match(f.name) and f.name not in planned_files:
            log.info("removed %s: no longer part of this dataset's plan", f.name)
            f.unlink()

    tasks = [(n, item) for n, p in enumerate(plans) if n not in entries for item in p.items]
    pending = {n: len(p.items) for n, p in enumerate(plans) if n not in entries}
    collected: dict[int, ItemResult] = {n: ItemResult() for n in pending}
    bar = tqdm(total=len(tasks), unit=source.item_unit, desc=source.dataset, disable=not progress, mininterval=1.0)
    with bar:
        for n, result in _results(source, tasks, workers):
            collected[n].samples += result.samples
            collected[n].skipped += result.skipped
            collected[n].notes += result.notes
            pending[n] -= 1
            bar.update()
            if pending[n] == 0:
                entries[n] = _write(out, plans[n], collected.pop(n))
                save(complete=False)
    save(complete=True)
    return BuildReport(out, manifest, len(plans) - reused, reused, len(tasks), time.perf_counter() - t0)


def _write(out: Path, plan: ShardPlan, result: ItemResult) -> dict[str, Any]:
    if result.samples:
        info = asdict(write_shard(out / f"{plan.name}.tar", result.samples))
    else:  # a shard whose every item was skipped this time: an older run's files must not outlive it
        for ext in ("tar", "idx"):
            (out / f"{plan.name}.{ext}").unlink(missing_ok=True)
        info = {"file": f"{plan.name}.tar", "index": f"{plan.name}.idx", "samples": 0, "bytes": 0, "sha256": "", "labels": {}}
    return {"split": plan.split, **info, "plan_sha256": plan.plan_sha256, "skipped": result.skipped, "notes": result.notes}


def format_report(report: BuildReport, unit: str) -> str:
    """The end-of-run summary a person reads."""
    m = report.manifest
    lines = [f"{m['dataset']}: {report.out_dir} (layout: {m['source']['layout']})"]
    for split in SPLITS:
        s = m["splits"].get(split)
        if s:
            labels = ", ".join(f"label {k}: {v}" for k, v in s["labels"].items())
            lines.append(f"  {split:5s} {s['samples']:7d} samples in {s['shards']} shards ({labels}), {s['bytes'] / 1e6:.1f} MB")
    skipped = m["skipped"]
    if skipped["total"]:
        reasons = ", ".join(f"{v} {k}" for k, v in skipped["by_reason"].items())
        lines.append(f"  skipped {skipped['total']}: {reasons} (each listed in manifest.json)")
    notes = m.get("notes", {"total": 0})
    if notes["total"]:
        lines.append("  notes: " + ", ".join(f"{v} {k}" for k, v in notes["by_note"].items()) + " (each listed in manifest.json)")
    lines.append(
        f"  {report.shards_written} shards written, {report.shards_reused} reused; "
        f"{report.items_processed} {unit} in {report.seconds:.1f} s ({report.items_per_s:.1f} {unit}/s)"
    )
    lines.append(f"  manifest: {manifest_path(report.out_dir)}")
    return "\n".join(lines)
