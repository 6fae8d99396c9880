"""Train the DCGAN on CelebA shards with DistributedDataParallel.

    python launch/train.py --config configs/smoke.yaml                         # one process (CPU or GPU)
    torchrun --nproc_per_node=8 launch/train.py --config configs/dcgan-10ep.yaml data.shards=/data/shards/celeba
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=2 --nproc_per_node=8 --max-restarts=3 \\
        --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 --rdzv_id=$JOB \\
        launch/train.py --config configs/dcgan-10ep.yaml data.shards=/shared/shards/celeba
    python launch/train.py --config configs/smoke.yaml --dry-run               # print the resolved config

Overrides are dotted keys (`train.lr_G=5e-4`). The run folder is <train.runs_dir>/<train.name>/; by
default (`train.resume=auto`) the same command continues from its newest checkpoint.
Exit codes: 0 done or stopped on SIGTERM/SIGUSR1 with a checkpoint, 2 bad config or input, 3 diverged.
"""

from pipeline import signals

signals.install()  # before torch is imported: a preemption signal during start-up is recorded, not fatal

import argparse  # noqa: E402
import gc  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

import yaml  # noqa: E402

from pipeline.config import Config, load_config, to_dict  # noqa: E402
from pipeline.errors import UserError  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a YAML file in configs/")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    if args.dry_run:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    return train(cfg)


def train(cfg: Config) -> int:
    # torch and the trainer load here, for a run only (5 s): a dry run or a config error answers at once.
    from pipeline import dist
    from pipeline.fsutil import write_bytes_atomic
    from pipeline.trainer import Trainer

    trainer = None
    try:
        info = dist.init_distributed()
        # Every rank has joined by now (gloo connects them all at init, and so does NCCL given a device), so every
        # torchrun has started its ranks and handles signals: a stop from here on leaves train.stop_marker.
        if cfg.train.start_marker and info.is_main:
            write_bytes_atomic(cfg.train.start_marker, b"the ranks have started\n")
        logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                            format=f"[rank {info.rank}] %(message)s", stream=sys.stdout, force=True)
        trainer = Trainer(cfg, info)
        try:
            trainer.train()
        finally:
            trainer.close()
        # No rank leaves before rank 0 has written the stop marker and closed its logs: under `srun -K` a node whose
        # ranks left first has the others killed (after passing a signal on, torchrun always exits non-zero).
        dist.close_together(cfg.log.close_timeout_s)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    finally:
        # DDP's modules hold the process group: free them (here the handled error's traceback, which held
        # them too, is gone) so that destroy() joins gloo's threads now. Left to interpreter exit, those
        # threads sometimes ended the process in std::terminate.
        del trainer
        gc.collect()
        dist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
