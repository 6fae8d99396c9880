"""The GPU fast paths and their switches: precision, channels-last, fused Adam, torch.compile, TF32,
and the self-blends compiled and replayed from a CUDA graph.

`auto` turns a fast path on where it pays (on CUDA) and off on CPUs, where the tests and the demo run.
A switch that cannot work here falls back at set-up with one warning line saying what it fell back
to, so that a run never dies on it at its first step or an hour in.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from pipeline.errors import UserError

log = logging.getLogger(__name__)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
FUSED_ADAM_DEVICES = ("cuda", "cpu", "mps", "xpu", "hpu")  # where torch has fused Adam kernels, for float dtypes
TENSOR_CORE_CHANNELS = 8  # channels-last convolutions need channel counts in multiples of this to pay


@dataclass(frozen=True)
class FastPaths:
    precision: str  # fp32 | bf16 | fp16: the autocast dtype (fp16 also scales the loss)
    channels_last: bool
    fused_adam: bool  # asked for; `adam()` falls back per parameter set
    compile: bool
    compile_mode: str
    tf32: bool
    graph_inputs: bool = False  # the self-blends and degradations from one CUDA graph (pipeline/graphs.py)
    compile_inputs: bool = False  # the self-blends and degradations compiled by torch.compile (pipeline/step.py)

    @property
    def cuda_graphs(self) -> bool:
        """Whether torch.compile's mode replays G's and D's passes as CUDA graphs (reduce-overhead, max-autotune)."""
        from torch._inductor import list_mode_options

        return self.compile and bool(list_mode_options(self.compile_mode).get("triton.cudagraphs"))

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return PRECISIONS[self.precision]

    @property
    def layout(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def _switch(value: str | bool, key: str, device: torch.device) -> bool:
    if value == "auto":
        return device.type == "cuda"
    if isinstance(value, bool):
        return value
    raise UserError(f"train.{key} is {value!r}: write auto, true or false.")


def compile_mode(train, device: torch.device, distributed: bool, precision: str) -> str:
    """torch.compile's mode: train.compile_mode, or for auto, reduce-overhead (G's and D's passes replayed as CUDA
    graphs: 1.7x end to end on an H200, BENCHMARKS.md) on one GPU in bf16 or fp32, where it has run, and the default
    mode elsewhere: the graphs have never run under DDP, with fp16's loss scaling, nor with SAM's second pass of D
    (train.d_sam_rho)."""
    if train.compile_mode != "auto":
        return train.compile_mode
    tried = device.type == "cuda" and not distributed and precision != "fp16" and not train.d_sam_rho > 0
    return "reduce-overhead" if tried else "default"


def resolve(train, model, device: torch.device, distributed: bool = False) -> FastPaths:
    """The fast paths for this device, from the config's switches, with fallbacks where one cannot work.
    `distributed`: whether this process is one of several ranks (DDP)."""
    precision = train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
        if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):  # T4: emulated only
            log.warning("train.precision auto: this GPU has no bfloat16, falling back to fp16 with a loss scaler")
            precision = "fp16"
    if precision not in PRECISIONS:
        raise UserError(f"train.precision {precision!r} is not one of {['auto', *PRECISIONS]}: choose one of those.")
    if precision == "fp16" and device.type != "cuda":
        log.warning("train.precision fp16 on a CPU is slow and gains nothing; bf16 is the CPU's half precision")
    channels_last = _switch(train.channels_last, "channels_last", device)
    odd = [f"model.{k} {getattr(model, k)}" for k in ("ngf", "ndf") if getattr(model, k) % TENSOR_CORE_CHANNELS]
    if channels_last and odd:
        log.warning("train.channels_last: %s is not a multiple of %d, which channels-last convolutions need to pay; "
                    "falling back to the contiguous layout", " and ".join(odd), TENSOR_CORE_CHANNELS)
        channels_last = False
    compile_ = _switch(train.compile, "compile", device)
    from torch._inductor import list_mode_options

    modes = list_mode_options()
    if train.compile_mode != "auto" and train.compile_mode not in modes:
        raise UserError(f"train.compile_mode is {train.compile_mode!r}: write auto or one of torch.compile's modes, "
                        f"{', '.join(modes)}.")
    compile_inputs = _switch(train.compile_inputs, "compile_inputs", device)
    asked = " and ".join(f"train.{k}" for k, on in (("compile", compile_), ("compile_inputs", compile_inputs)) if on)
    if asked:
        problem = compiler_problem(device)
        if problem:
            log.warning("%s: torch.compile does not work here (%s); falling back to eager mode", asked, problem)
            compile_ = compile_inputs = False
    graph_inputs = _switch(train.graph_inputs, "graph_inputs", device)
    if graph_inputs and device.type != "cuda":
        log.warning("train.graph_inputs: CUDA graphs need a CUDA device, not %s; falling back to eager self-blends",
                    device.type)
        graph_inputs = False
    tf32 = bool(train.tf32)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32  # DCGAN's convolutions lose nothing at TF32's 10-bit mantissa
        torch.backends.cudnn.allow_tf32 = tf32
    return FastPaths(precision, channels_last, bool(train.fused_adam), compile_,
                     compile_mode(train, device, distributed, precision), tf32, graph_inputs, compile_inputs)


@contextlib.contextmanager
def float32_products():
    """Matrix products in full float32 inside, whatever train.tf32 says (torch's switch is global; it is put back
    after). For the self-blends: TF32 rounds a product's inputs to 10 bits of mantissa, which the blend mask's
    erosion threshold, the hull's extreme points and the JPEG quantizer turn into flipped pixels. Rounded so on
    the CPU, the blurs alone moved a batch's pixels by 3-6e-4 on average and up to 0.16 (BENCHMARKS.md)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def compiler_problem(device: torch.device) -> str | None:
    """None if torch.compile compiles and runs a small function on `device`, else the first line of why not."""
    try:
        out = torch.compile(lambda x: x * 2 + 1)(torch.ones(4, device=device))
        if not torch.equal(out.cpu(), torch.full((4,), 3.0)):
            return "a compiled test function gave a wrong result"
    except Exception as e:  # a missing C++ compiler or Triton shows up only when a graph is compiled
        first = str(e).strip().splitlines()
        return f"{type(e).__name__}: {first[0] if first else ''}"[:200]
    return None


def adam(params, lr: float, betas: tuple[float, float], fused: bool, name: str) -> torch.optim.Adam:
    """Adam, fused where asked and supported: one kernel for the whole update, and it reads the loss
    scaler's inf flag on the device, so a step with non-finite gradients is skipped without a host sync."""
    params = list(params)
    if fused:
        # Fused Adam checks its parameters only at its first step: check them here, and fall back now.
        refused = next((p for p in params if not (p.is_floating_point() and p.device.type in FUSED_ADAM_DEVICES)), None)
        if refused is None:
            return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
        log.warning("train.fused_adam: fused Adam has no kernel for %s's %s parameters on %s; falling back to foreach "
                    "Adam, which skips non-finite steps with a host sync", name, refused.dtype, refused.device.type)
    return torch.optim.Adam(params, lr=lr, betas=betas, foreach=True)
