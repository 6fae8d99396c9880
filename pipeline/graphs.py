"""One CUDA graph for a step's self-blends and degradations (train.graph_inputs, on by default on GPUs).

Made in eager PyTorch, the self-blends and degradations of a batch are about 800 small kernels. On an
H200 they took 16 ms a step at batch 128 and 64 px whatever the batch size (bench/gpu.sh, 2026-11-26):
the GPU waited on the host launching them, not on the work. Replaying them from one captured CUDA graph
costs one launch. The function is captured once its shapes are steady, after a few eager calls, and
replayed while the inputs keep those shapes; an input of another shape (a short last batch) runs eagerly.

The random numbers come from the step's own generator, registered with the graph, so that each replay
draws fresh numbers and advances the generator as an eager call does (torch.cuda.CUDAGraph's
register_generator_state): checkpoints keep saving and restoring its state.

The outputs of a replay live in the graph's own buffers and are overwritten by the next replay: the
step uses them within itself (D's backward included) and keeps none.

A capture that fails stops the run with a sentence naming the switch, rather than falling back: on the
H200 a failed capture left the default CUDA generator unusable ("Offset increment outside graph capture
encountered unexpectedly" at the next random draw), so eager self-blends after it would fail anyway.
Measured on an H200 (torch 2.11, 2026-11-26): replays equal eager calls from the same generator state,
and the step at batch 128 and 64 px took 14.8 ms instead of 35.6 (bench/step.py). Inside the trainer,
fed by DALI's mixed decoding, it ran 12,235 steps (bench/gpu-detector.sh), and the `gpu` tests pass
with it; not yet under DDP on several GPUs (only single-GPU machines were lent).
"""

from __future__ import annotations

from typing import Callable

import torch

Tensors = tuple[torch.Tensor, ...]


class GraphedFunction:
    """fn(*tensors) -> tuple of tensors: eager for the first `eager_calls` calls, then replayed from a graph
    captured at the first call whose shapes repeat the call before's."""

    def __init__(self, fn: Callable[..., Tensors], generator: torch.Generator, eager_calls: int = 3):
        self.fn, self.generator, self.eager_calls = fn, generator, eager_calls
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key = None
        self.static_in: Tensors = ()
        self.static_out: Tensors = ()

    @staticmethod
    def _key(args: Tensors):
        return tuple((t.shape, t.dtype, t.stride(), t.device) for t in args)

    def __call__(self, *args: torch.Tensor) -> Tensors:
        key = self._key(args)
        if self.graph is None:
            if self.calls < self.eager_calls or key != self.key:
                self.calls += 1
                self.key = key
                return self.fn(*args)
            try:
                self._capture(args, key)
            except RuntimeError as e:
                raise RuntimeError(f"train.graph_inputs: the self-blends could not be captured in a CUDA graph "
                                   f"({str(e).splitlines()[0]}); set train.graph_inputs=false to make them eagerly") from e
        if key != self.key:  # another shape than the graph's: eagerly
            return self.fn(*args)
        for buffer, arg in zip(self.static_in, args):
            buffer.copy_(arg, non_blocking=True)
        self.graph.replay()
        return self.static_out

    def _capture(self, args: Tensors, key) -> None:
        self.static_in = tuple(a.clone() for a in args)
        # A warm-up on a side stream first, as torch.cuda.graph asks (libraries initialise lazily); it must
        # not use up random numbers, so the generator is put back where it was.
        state = self.generator.get_state()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.fn(*self.static_in)
        torch.cuda.current_stream().wait_stream(side)
        self.generator.set_state(state)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.generator)
        # thread_local: DALI's threads keep allocating and synchronising while this thread captures.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.static_out = tuple(self.fn(*self.static_in))
        self.graph, self.key = graph, key
