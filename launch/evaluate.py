"""Score a trained discriminator as a deepfake detector on Celeb-DF shards.

    python launch/evaluate.py --checkpoint runs/dcgan-10ep/checkpoints/step-00012710.pt --shards /data/shards/celebdf
    torchrun --nproc_per_node=8 launch/evaluate.py --checkpoint CKPT --shards /data/shards/celebdf \\
        --celeba /data/shards/celeba --log-to-run

Writes metrics.json, videos.csv, roc.png and hist.png to --out (default: <run>/eval-step-N/ beside
the checkpoint's run, eval-step-N-<split>/ for a split other than test). --log-to-run also logs them to
the run's TensorBoard and wandb run (under celebdf/, or celebdf-<split>/).
"""

import argparse
import sys
from pathlib import Path

import torch

from pipeline import dist
from pipeline.errors import UserError
from pipeline.evaluate import (check_shards, listed_video_block, load_discriminator, log_to_run, missing_videos, per_video,
                               plots, report_folder, score_split, summarize, verdict_threshold, write_report)
from shards.manifest import synthetic


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--shards", required=True, help="Celeb-DF shards (a folder with manifest.json)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--celeba", help="CelebA shards: also report the false-positive rate on its test split")
    parser.add_argument("--out", type=Path, help="default: <run>/eval-step-N (-<split> for a split other than test)")
    parser.add_argument("--batch", type=int, default=64, help="per rank")
    parser.add_argument("--loader", choices=("dali", "baseline"), default="dali")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--log-to-run", action="store_true", help="also log to the checkpoint's TensorBoard and wandb run")
    args = parser.parse_args()
    try:
        info = dist.init_distributed()  # its refusals (a driver too old for torch's CUDA, a rank without a GPU) too
        D, meta = load_discriminator(args.checkpoint, info.device)
        # The run's folder, for the default --out and for --log-to-run, only where the checkpoint sits in one.
        run_dir = args.checkpoint.resolve().parent.parent if args.checkpoint.resolve().parent.name == "checkpoints" else None
        if run_dir is None and (args.out is None or args.log_to_run):
            raise UserError(f"checkpoint {args.checkpoint} is not in a run's checkpoints/ folder, so its run is unknown: "
                            "pass --out for the report" + (", without --log-to-run." if args.log_to_run else "."))
        manifest = check_shards(args.shards, args.celeba, meta["faces"] if info.is_main else None)  # the warning once
        threshold, note = verdict_threshold(meta, args.checkpoint)
        if note and info.is_main:
            print(f"warning: {note}", file=sys.stderr)
        size = meta["config"]["data"]["image_size"]
        common = dict(image_size=size, device=info.device, rank=info.rank, world_size=info.world_size,
                      batch_size=args.batch, loader=args.loader, threads=args.threads, progress=info.is_main)
        frames = score_split(D, args.shards, args.split, **common)
        celeba = score_split(D, args.celeba, "test", **common) if args.celeba else None
        if info.is_main:
            videos = per_video(frames, threshold)
            summary = {"checkpoint": str(args.checkpoint), "step": meta["step"], "shards": args.shards,
                       "split": args.split, "calibration": meta["calibration"],
                       "synthetic_data": synthetic(args.shards, *([args.celeba] if args.celeba else [])),
                       **summarize(frames, videos, celeba, threshold)}
            expected = manifest["source"].get("test_videos") if args.split == "test" else None
            if expected and (missing := missing_videos(videos, expected)):
                summary["counts"]["missing_videos"] = missing
                summary["video_all_listed"] = listed_video_block(videos, missing, threshold)
                print(f"warning: {sum(missing.values())} of {sum(expected.values())} test videos have no scored frame "
                      f"({', '.join(f'{n} of {f}' for f, n in missing.items())}; the manifest's `skipped` says why): "
                      "the video metrics are over the others; `video_all_listed` scores those at 0.5, as SBI does "
                      f"(video AUC {summary['video_all_listed']['auc']:.4f})", file=sys.stderr)
            out = args.out or report_folder(run_dir, meta["step"], args.split)
            images = plots(frames, videos)
            write_report(out, summary, videos, images)
            if args.log_to_run:
                log_to_run(run_dir, meta, summary, images)
            f, v = summary["frame"], summary["video"]
            print(f"{summary['counts']['frames']} frames of {summary['counts']['videos']} videos: "
                  f"frame AUC {f['auc']:.4f}, video AUC {v['auc']:.4f}, frame EER {f['eer']:.4f}, "
                  f"video accuracy {v['accuracy']:.4f} at the threshold {threshold:.3f}" + (f", CelebA false positives {summary['celeba']['false_positive_rate']:.4f}" if celeba else ""))
            print(f"wrote {out}/metrics.json, videos.csv, roc.png, hist.png")
            if summary["synthetic_data"]:
                print("these shards come from synthetic datasets (shards/synth): the figures are not results on Celeb-DF")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        dist.destroy()
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
