"""The one reader of torchrun's and SLURM's environment, and the few collectives the trainer needs.

    ddp = "RANK" in os.environ    # torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT
NCCL on CUDA, gloo on CPUs. A plain `python launch/train.py` runs as rank 0 of 1 without a group.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from pipeline.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def cuda_available() -> bool:
    """Whether to run on CUDA. Where the NVIDIA driver is older than torch's CUDA, torch.cuda.is_available() is
    False after one warning line, and a run trained on the CPU at a hundredth of the speed: that is an error here.
    A machine with no GPU or no driver (a CPU container on a GPU host too), or CUDA_VISIBLE_DEVICES empty or -1,
    runs on the CPU."""
    if torch.cuda.is_available():
        return True
    if torch.version.cuda is None or os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1"):
        return False
    try:
        torch.cuda.init()  # raises torch's own sentence for why CUDA cannot start
    except Exception as e:
        why = str(e).split(". ")[0].strip()
        if "too old" in why or "insufficient" in why:
            raise UserError(f"torch {torch.__version__} cannot use this machine's GPUs ({why}), so this would run "
                            "on the CPU, many times slower: update the NVIDIA driver or install a torch built for it, or set "
                            "CUDA_VISIBLE_DEVICES= (empty) to run on the CPU on purpose.") from None
    return False


def init_distributed(timeout_s: int = 600) -> DistInfo:
    """`timeout_s` bounds every collective (close_together() sets its own)."""
    if "RANK" not in os.environ:
        device = torch.device("cuda", 0) if cuda_available() else torch.device("cpu")
        return DistInfo(0, 0, 1, device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda_available():
        if local_rank >= torch.cuda.device_count():  # else set_device's "invalid device ordinal", on ranks 1..n-1
            raise UserError(f"local rank {local_rank} has no GPU: this process sees {torch.cuda.device_count()}, and "
                            f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', '?')} processes a node; start one a "
                            "GPU (--nproc_per_node; with SLURM, --gpus-per-node rather than --gpus-per-task).")
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, local_rank, world_size, device)


def restarted() -> str | None:
    """Who started this job again, if anyone: torchrun (--max-restarts) or SLURM (a requeue), as a phrase."""
    for who, var in (("torchrun", "TORCHELASTIC_RESTART_COUNT"), ("SLURM", "SLURM_RESTART_COUNT")):
        if int(os.environ.get(var) or 0) > 0:
            return f"{who}'s restart {os.environ[var]}"
    return None


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In place on every rank; a no-op in a single process."""
    if _active():
        dist.all_reduce(tensor, op=op)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn: Callable[[], Any], is_main: bool) -> Any:
    """fn() on rank 0 and its result on every rank. If it raises, every rank raises (rank 0 the error itself, the
    others a UserError with its sentence) instead of waiting at the next collective for a rank that has gone."""
    result, error = None, None
    if is_main:
        try:
            result = fn()
        except Exception as e:
            error = e
    message = None if error is None else (str(error) if isinstance(error, UserError) else
                                          f"rank 0 stopped with {type(error).__name__}: {error}")
    result, message = broadcast_object((result, message))
    if error is not None:
        raise error
    if message is not None:
        raise UserError(message)
    return result


def close_together(timeout_s: int) -> None:
    """The run's last barrier, which ranks 1..n-1 reach at once while rank 0 first closes its logs: an online wandb
    run uploads what is left then, which may take longer than any other collective may wait. So this one waits up to
    `timeout_s`: the process group's timeout is set to that first (as torchtitan sets it after its first step;
    `dist.barrier` takes a timeout of its own only from torch 2.11)."""
    if not _active():
        return
    dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=timeout_s))
    try:
        dist.barrier()
    except RuntimeError as e:  # gloo's: a timeout, or a rank that left (NCCL's watchdog ends the process itself)
        why = str(e).split("] ", 1)[-1].split(". ")[0]
        if dist.get_rank() == 0:
            raise UserError(f"the other ranks had stopped waiting for rank 0 at the run's last barrier ({why}) while it "
                            f"closed its logs: the run itself is saved; if closing took longer than log.close_timeout_s "
                            f"({timeout_s} s), raise it.") from e
        raise UserError(f"rank {dist.get_rank()} stopped waiting for rank 0 at the run's last barrier ({why}), which waits "
                        f"up to log.close_timeout_s ({timeout_s} s) for rank 0 to close its logs: the run itself is saved; "
                        "if rank 0 was still closing (an online wandb run uploads what is left then), raise "
                        "log.close_timeout_s and `wandb sync` the run folder's wandb/, else rank 0's log says why.") from e
