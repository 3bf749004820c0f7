#!/usr/bin/env python3
"""Where the CPU time of one compiled, packed micro-batch goes on a GPU: the launch side of a four-GPU rank's step.

    python3 benchmarks/launch_profile.py --layers 4 --micro-batches 16
    .venv/bin/python benchmarks/launch_profile.py --tiny --layers 2 --micro-batches 4   # CPU smoke check

At four GPUs a rank's micro-batch of about 2,600 tokens waits for the CPU that launches its kernels
(benchmarks/RESULTS.md). This builds ``benchmarks/cuda_graph_probe.py``'s model (``--layers`` layers of the 6.72B
pruned Llama-3 shape, LoRA r 8 on the 7 targets, grouped and joined as the worker runs them, each layer compiled
with ``dynamic=True``), warms it on ``--micro-batches`` packed micro-batches of 16 alpaca-like sequences, then
profiles 3 more, forward and backward under bf16 autocast:

- ``torch.profiler`` (CPU and CUDA): the operations and runtime calls with the most self CPU time, and how many
  kernels were launched and at what CPU cost (``cudaLaunchKernel``, ``cuLaunchKernel`` and their kin);
- ``cProfile``: the Python functions with the most own time (Dynamo's guards and Inductor's launchers show here).

Its figures are per micro-batch (totals over the 3 divided by 3). CPU time only says where the host spends; the
GPU's own time is in ``benchmarks/layer_gpu_time.py``.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PROFILED = 3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=16, help="warm-up micro-batches before the profile")
    parser.add_argument("--tiny", action="store_true", help="2 small layers (CPU smoke check)")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    from cuda_graph_probe import batches, build

    model, device = build(args.tiny, 0.05, args.layers)
    import torch._dynamo as dynamo
    dynamo.config.cache_size_limit = 64
    for layer in model.get_base_model().get_decoder().layers:
        layer.compile(dynamic=True)
    model.train()
    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.zeros_like(param)
    data = [{key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
            for batch in batches(args.micro_batches + PROFILED, 4 if args.tiny else 16, 0, 66)]

    def micro_batch(batch: dict) -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(**batch).loss
        loss.backward()

    started = time.perf_counter()
    for batch in data[:args.micro_batches]:
        micro_batch(batch)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    print(json.dumps({"warm_up_s": round(time.perf_counter() - started, 1), "layers": args.layers,
                      "tokens": [batch["input_ids"].numel() for batch in data[-PROFILED:]]}), flush=True)

    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as profiler:
        started = time.perf_counter()
        for batch in data[-PROFILED:]:
            micro_batch(batch)
        launched = time.perf_counter() - started
        sync()
        wall = time.perf_counter() - started
    events = profiler.key_averages()
    runtime = [event for event in events if "launch" in event.key.lower() or event.key.startswith("cu")]
    by_self_cpu = sorted(events, key=lambda event: event.self_cpu_time_total, reverse=True)[:args.top]
    # kernels only: the operations that launched them carry the same device time again
    gpu_ms = sum(event.self_device_time_total for event in events
                 if event.device_type == torch.autograd.DeviceType.CUDA) / 1e3 / PROFILED
    print(json.dumps({"launch_ms": round(1e3 * launched / PROFILED, 2), "wall_ms": round(1e3 * wall / PROFILED, 2),
                      "gpu_busy_ms": round(gpu_ms, 2)}))
    print("runtime calls [name, calls, self CPU ms] a micro-batch:")
    for event in sorted(runtime, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]:
        print(json.dumps([event.key, event.count // PROFILED, round(event.self_cpu_time_total / 1e3 / PROFILED, 2)]))
    print("most self CPU time [name, calls, ms] a micro-batch:")
    for event in by_self_cpu:
        print(json.dumps([event.key[:70], event.count // PROFILED, round(event.self_cpu_time_total / 1e3 / PROFILED, 2)]))
    sys.stdout.flush()

    sync()
    python_profile = cProfile.Profile()
    started = time.perf_counter()
    python_profile.enable()
    for batch in data[-PROFILED:]:
        micro_batch(batch)
    python_profile.disable()
    launched = time.perf_counter() - started
    sync()
    text = io.StringIO()
    pstats.Stats(python_profile, stream=text).sort_stats("tottime").print_stats(args.top)
    print(f"cProfile: {1e3 * launched / PROFILED:.1f} ms of CPU a micro-batch under the profiler")
    print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
