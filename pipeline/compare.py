"""Compare training runs: what differs in their configs, how they did, and overlay plots.

    python -m pipeline.compare runs/dcgan-*                 # run folders; globs welcome
    python -m pipeline.compare runs/my-sweep --out compare/  # a folder of runs (a sweep) works too

Reads each run's TensorBoard events with TensorBoard's own reader and its resolved `config.yaml`.
Prints a table and writes `losses.png`, `d_outputs.png` and `samples.png` (the latest sample grid of
each run, side by side) to --out.
"""

from __future__ import annotations

import argparse
import glob
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.config import flat_dict
from pipeline.errors import UserError

# Written by the Celeb-DF evaluation, where it ran: the test split's (launch/evaluate.py), else the val split's
# (the trainer's periodic evaluation, train.eval_split), which the table marks.
AUC_TAGS = {"test": ("celebdf/video_auc", "celebdf/frame_auc"), "val": ("celebdf-val/video_auc", "celebdf-val/frame_auc")}


def celebdf_auc(run: Run) -> str | None:
    """The run's last Celeb-DF AUC (video, else frame), test split first; other splits are named."""
    for split, tags in AUC_TAGS.items():
        for tag in tags:
            if (value := run.last(tag)) is not None:
                return f"{value:.4g}" + ("" if split == "test" else f" ({split})")
    return None


@dataclass
class Run:
    path: Path
    config: dict
    scalars: dict[str, list[tuple[int, float, float]]]  # tag -> [(step, value, wall time)]
    sample: Path | None  # the newest sample grid

    label: str = ""  # how the table and plots name it: train.name, or the folder where names repeat

    @property
    def name(self) -> str:
        return self.label or self.config.get("train", {}).get("name", self.path.name)

    def last(self, tag: str) -> float | None:
        return self.scalars[tag][-1][1] if self.scalars.get(tag) else None

    def best(self, tag: str) -> float | None:
        return min(v for _, v, _ in self.scalars[tag]) if self.scalars.get(tag) else None

    def mean(self, tag: str) -> float | None:
        values = [v for _, v, _ in self.scalars.get(tag, [])]
        return sum(values) / len(values) if values else None

    @property
    def wall_s(self) -> float | None:
        """Training time: the intervals between logged losses (a later evaluation does not count), less those over
        ten times the median (a preempted job's time in the queue, or a stopped run started again days later)."""
        times = sorted(t for _, _, t in self.scalars.get("loss/D", []))
        if not times:
            return None
        gaps = [b - a for a, b in zip(times, times[1:])]
        usual = sorted(gaps)[len(gaps) // 2] if gaps else 0.0
        return sum(g for g in gaps if g <= 10 * usual)


def find_runs(patterns: list[str]) -> list[Path]:
    """Run folders (those with a config.yaml) named by the patterns, or found one level below them."""
    found: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) or [pattern]
        for m in map(Path, matches):
            if (m / "config.yaml").is_file():
                found.append(m)
            elif m.is_dir() and (below := sorted(p.parent for p in m.glob("*/config.yaml"))):
                found.extend(below)
            elif len(matches) > 1:  # runs/* also matches what is not a run: a notes file, an empty folder
                print(f"skipping {m}: not a run folder (no config.yaml)", file=sys.stderr)
            else:
                raise UserError(f"{m} is not a run folder (it has no config.yaml): pass folders that launch/train.py wrote.")
    return list(dict.fromkeys(found))


def load_run(path: Path) -> Run:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(path), size_guidance={"scalars": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value, e.wall_time) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    samples = sorted((path / "samples").glob("step-*.png"))
    return Run(path, yaml.safe_load((path / "config.yaml").read_text()), scalars, samples[-1] if samples else None)


def differing_keys(runs: list[Run]) -> list[str]:
    flat = [flat_dict(r.config) for r in runs]
    keys = sorted(set().union(*flat))
    # The markers hold the SLURM job's id: they differ from job to job and say nothing of the run.
    return [k for k in keys if len({repr(f.get(k)) for f in flat}) > 1
            and k not in ("train.name", "train.stop_marker", "train.start_marker", "train.stop_request")]


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(runs: list[Run]) -> str:
    differ = differing_keys(runs)
    columns = ["run", *differ, "steps", "loss/D last", "loss/D best", "loss/G last", "loss/G best",
               "val acc real", "val acc fake", "Celeb-DF AUC", "img/s", "wall s"]
    rows = []
    for r in runs:
        flat = flat_dict(r.config)
        steps = max((s for events in r.scalars.values() for s, _, _ in events), default=None)
        auc = celebdf_auc(r)
        rows.append([r.name, *(flat.get(k) for k in differ), steps, r.last("loss/D"), r.best("loss/D"), r.last("loss/G"),
                     r.best("loss/G"), r.last("val/D_acc_real"), r.last("val/D_acc_fake"), auc,
                     r.mean("perf/img_per_s"), r.wall_s])
    cells = [columns] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    note = f"configs differ in: {', '.join(differ)}" if differ else "configs are the same (but for train.name)"
    return "\n".join(lines + ["", note])


def plot_curves(runs: list[Run], tags: list[str], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tags), figsize=(6 * len(tags), 4), squeeze=False)
    for ax, tag in zip(axes[0], tags):
        for r in runs:
            if r.scalars.get(tag):
                steps, values, _ = zip(*r.scalars[tag])
                ax.plot(steps, values, label=r.name)
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def sample_strip(runs: list[Run], out: Path) -> bool:
    """The newest sample grid of each run, side by side, each under its run's name."""
    from PIL import Image, ImageDraw

    grids = [(r.name, Image.open(r.sample).convert("RGB")) for r in runs if r.sample is not None]
    if not grids:
        return False
    height = max(g.height for _, g in grids)
    label = 20
    strip = Image.new("RGB", (sum(g.width for _, g in grids) + 10 * (len(grids) - 1), height + label), "white")
    x = 0
    for name, grid in grids:
        strip.paste(grid, (x, label))
        ImageDraw.Draw(strip).text((x + 4, 4), name, fill="black")
        x += grid.width + 10
    strip.save(out)
    return True


def compare(patterns: list[str], out: Path) -> str:
    runs = [load_run(p) for p in find_runs(patterns)]
    if not runs:
        raise UserError("no runs to compare: pass run folders, for example runs/*.")
    if len({r.name for r in runs}) < len(runs):
        for r in runs:
            r.label = str(r.path)
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(runs, ["loss/D", "loss/G"], "losses", out / "losses.png")
    plot_curves(runs, ["D/real", "D/fake"], "D(x) and D(G(z))", out / "d_outputs.png")
    written = ["losses.png", "d_outputs.png"] + (["samples.png"] if sample_strip(runs, out / "samples.png") else [])
    return table(runs) + f"\nwrote {', '.join(str(out / w) for w in written)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders or folders of runs; globs welcome")
    parser.add_argument("--out", type=Path, default=Path("compare"), help="where the plots go (default: compare/)")
    args = parser.parse_args(argv)
    try:
        print(compare(args.runs, args.out))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
