"""Run under torchrun with 2 processes: each rank resumes a DALI loader mid-way through its second epoch, where
rank 1's saved DALI state is cut short (as another DALI version's might not parse) and rank 0's restores. Prints
"KEYS rank R: <JSON list>", the keys each rank read in the rest of that epoch.

    torchrun --standalone --nproc_per_node=2 tests/dali_two_ranks.py SHARDS
"""

import json
import os
import sys

from pipeline import dist
from pipeline.config import DataConfig
from pipeline.data import build_loader

info = dist.init_distributed()
cfg = DataConfig(shards=sys.argv[1], loader="dali", batch_size=2, threads=1, with_meta=True, shuffle_buffer=8)
with build_loader(cfg, info.rank, info.world_size) as data:
    for _ in data:  # epoch 0: DALI's reader then deals the parts out afresh for epoch 1
        pass
    next(iter(data))
    state = data.state_dict()
if info.rank == 1:
    state["dali"] = state["dali"][: len(state["dali"]) // 2]
with build_loader(cfg, info.rank, info.world_size) as resumed:
    resumed.load_state_dict(state)
    keys = [k for b in resumed for k in b.keys]
    assert resumed.epoch == 2
sys.stdout.flush()
os.write(sys.stdout.fileno(), f"KEYS rank {info.rank}: {json.dumps(keys)}\n".encode())
dist.destroy()
