"""Find, on the CPU, every place where the host reads a value that on a GPU would live on the device.

Each such read (`.item()`, `bool()`, `.tolist()`, `nonzero`, a boolean mask index...) makes the host wait
for the GPU. `torch.cuda.set_sync_debug_mode("error")` catches them only on a GPU; this dispatch mode
catches them on the CPU, so CI guards the step too. A tensor counts as host-made when it was built from
Python values alone (`torch.tensor([...])`, `arange`, `zeros`...) or only from host-made tensors: such a
value is known to the host, as kornia's checks of Python-number arguments are. Every other tensor (the
inputs, the parameters, anything random or computed from them) counts as a device tensor, and reading it
is recorded with its caller. The blind spot: a constant built on the GPU and read back would sync too,
and is not recorded; the `gpu` tests cover that case.
"""

from __future__ import annotations

import traceback
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

READS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
         "equal", "is_nonzero"}


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.host_made: dict[int, weakref.ref] = {}  # by id: a WeakSet would compare tensors with ==
        self.reads: list[str] = []  # "op at file:line" of each read of a device tensor

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        name = func._schema.name.split("::")[1]
        random = isinstance(kwargs.get("generator"), torch.Generator) or "rand" in name or \
            name in ("normal", "uniform_", "bernoulli", "exponential_")
        from_host = not random and all(self._host_made(t) for t in tensors)
        bool_index = name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        if not from_host and (name in READS or bool_index):
            caller = next(f for f in reversed(traceback.extract_stack()[:-1]) if "/torch/" not in f.filename
                          or "site-packages/kornia" in f.filename)
            self.reads.append(f"{name} at {caller.filename.rsplit('/', 2)[-1]}:{caller.lineno}")
        out = func(*args, **kwargs)
        if from_host:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.host_made[id(t)] = weakref.ref(t)
        return out

    def _host_made(self, t: torch.Tensor) -> bool:
        ref = self.host_made.get(id(t))
        return ref is not None and ref() is t
