"""Whole training micro-batches as CUDA graphs: the packed path with ``finetune.cuda_graphs=on``.

At four GPUs a rank trains one micro-batch of about 2,600 tokens per optimizer step, and launching its
~4,800 kernels takes the CPU about twice as long as the GPU takes to run them (benchmarks/RESULTS.md). A CUDA
graph of the whole micro-batch (forward, loss and backward) launches them all at once. Inductor's own graphs
(``torch.compile(mode="reduce-overhead")``) crashed the worker; this is plain ``torch.cuda.graph`` capture
around the (compiled) layers. What that needs:

- **Shapes that depend on the token count only.** The collator pads each micro-batch to a multiple of the
  cutoff with a filler segment that has no targets, and its sequence boundaries to a fixed count with empty
  segments; the loss runs over every position with the -100 targets weighted zero
  (``linear_cross_entropy(all_positions=True)``). One graph per padded length, captured the first time that
  length comes; before the first capture, warm-up runs outside it compile and let cuBLAS and autograd set up.
- **Fixed memory for what outlives a replay.** Inputs are copied into the graph's own buffers; the LoRA
  gradients are views of one flat buffer (``FlatGradients``) that each backward adds into and ``zero_grad``
  zeroes in place; the loss is copied out inside the graph. All graphs share one memory pool: only one runs
  at a time, and nothing of one is read after another has run.
- **No hooks that would have to run at replay.** With several ranks the model is called past DDP's wrapper,
  whose hooks then stay idle, and the flat buffer is averaged over the ranks once per optimizer step, as DDP
  would average it. DeepSpeed's hooks cannot be replayed, so this runs without DeepSpeed.

The arithmetic is the packed path's: the same examples, micro-batches and loss normalisation. Padding adds
filler tokens that attend only to themselves and have no targets. On the CPU (the tests) nothing is captured:
the same fixed-shape step runs eagerly.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

log = logging.getLogger(__name__)

# Eager runs before the first capture (they compile, and let cuBLAS and autograd set up). Later lengths capture
# without one: an eager run's activations would sit beside the graphs' pool (an 8,192-token micro-batch of the
# 6.7B shape then ran out of memory on an 80 GB card).
WARMUP_RUNS = 2


class FlatGradients:
    """The trainable parameters' gradients as views of one buffer: fixed addresses for the graphs, one kernel
    to zero, one all-reduce per step."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        dtypes = {param.dtype for param in params}
        if len(dtypes) != 1:
            raise ValueError("finetune.cuda_graphs needs trainable parameters of one dtype, found "
                             f"{sorted(map(str, dtypes))}")
        self.params = params
        self.buffer = torch.zeros(sum(param.numel() for param in params), dtype=params[0].dtype,
                                  device=params[0].device)
        self.attach()

    def attach(self) -> None:
        offset = 0
        for param in self.params:
            param.grad = self.buffer[offset:offset + param.numel()].view_as(param)
            offset += param.numel()

    def check(self) -> None:
        """Put the views back where something set a gradient to None (a zero_grad that sets to None)."""
        if any(param.grad is None for param in self.params):
            self.buffer.zero_()
            self.attach()

    def zero(self, set_to_none: bool = True) -> None:  # replaces the model's zero_grad: never None
        self.buffer.zero_()

    def average_over_ranks(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if world > 1:
                torch.distributed.all_reduce(self.buffer)
                self.buffer.div_(world)


class CapturedMicroBatches:
    """Run micro-batches (a dict of tensors) through ``loss_fn`` and backward, each padded length as one graph.

    ``loss_fn(inputs)`` returns the micro-batch's loss, scaled as the Trainer would back-propagate it.
    ``loss_settings`` is the causal LM's loss settings (``_prunetune_loss``), whose ``all_positions`` this turns
    on while it runs.
    """

    def __init__(self, loss_fn: Callable[[dict[str, Any]], torch.Tensor], grads: FlatGradients,
                 loss_settings: dict[str, Any], capture: bool) -> None:
        self.loss_fn, self.grads, self.loss_settings, self.capture = loss_fn, grads, loss_settings, capture
        device = grads.buffer.device
        self.loss = torch.zeros((), dtype=torch.float32, device=device)
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph | None, dict[str, Any]]] = {}
        self.capture_s = 0.0
        if capture:
            # Compiling inside a capture fails. With duck shapes, a first token count equal to another input's
            # size (the joined q/k/v weight's rows, the hidden size) ties the two, and every other count
            # recompiles: seen on the CPU with the tests' tiny model. Without them one compile serves all counts.
            import torch.fx.experimental._config as shape_config
            shape_config.use_duck_shape = False

    @contextlib.contextmanager
    def _all_positions(self) -> Iterator[None]:
        before = self.loss_settings.get("all_positions", False)
        self.loss_settings["all_positions"] = True
        try:
            yield
        finally:
            self.loss_settings["all_positions"] = before

    def _forward_backward(self, buffers: dict[str, Any]) -> None:
        with self._all_positions():
            loss = self.loss_fn(buffers)
        loss.backward()
        self.loss.copy_(loss.detach())

    def _capture(self, inputs: dict[str, Any]) -> tuple[torch.cuda.CUDAGraph | None, dict[str, Any]]:
        buffers = {key: value.clone() if torch.is_tensor(value) else value for key, value in inputs.items()}
        if not self.capture:
            return None, buffers
        started = time.monotonic()
        kept = self.grads.buffer.clone()  # warm-up runs add into the gradients: put them back afterwards
        if not self.graphs:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    self._forward_backward(buffers)
            torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Should a length still need a compile, it runs eagerly inside the graph instead of failing the capture.
        with torch.compiler.set_stance("eager_on_recompile"), torch.cuda.graph(graph, pool=self.pool):
            self._forward_backward(buffers)
        self.grads.buffer.copy_(kept)
        self.capture_s += time.monotonic() - started
        log.debug("captured a CUDA graph for micro-batches of %d tokens (%d graphs, %.1f s capturing in all)",
                  inputs["input_ids"].shape[-1], len(self.graphs) + 1, self.capture_s)
        return graph, buffers

    def __call__(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Forward, loss and backward of one micro-batch (gradients added into the flat buffer); its loss."""
        self.grads.check()
        length = inputs["input_ids"].shape[-1]
        if length not in self.graphs:
            self.graphs[length] = self._capture(inputs)
        graph, buffers = self.graphs[length]
        for key, value in inputs.items():
            if torch.is_tensor(value):
                buffers[key].copy_(value, non_blocking=True)
        if graph is None:
            self._forward_backward(buffers)
        else:
            graph.replay()
        return self.loss.clone()
