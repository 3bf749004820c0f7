#!/usr/bin/env python3
"""GPU time of one packed micro-batch through the packed path's decoder layers, forward and backward.

    python3 benchmarks/layer_gpu_time.py --variants default,dropout0,fallback_random
    python3 benchmarks/layer_gpu_time.py --variants default --profile      # plus where the GPU time goes
    .venv/bin/python benchmarks/layer_gpu_time.py --width 64 --tokens 256 --variants default,dropout0  # CPU check

On one GPU the finetune worker's step waits for the GPU (benchmarks/RESULTS.md), so what moves its throughput is
the GPU time of the layers' kernels. Running the whole 6.72B model for that costs minutes of device time per
setting; this runs a few layers of the same shape (hidden 4096, MLP 11008, GQA 32/8 heads, LoRA r 8 on the 7
targets, bf16 weights, fp32 adapters under bf16 autocast) through ``prepare_model_for_packing`` as the worker
calls it on a GPU (grouped LoRA, joined base weights, each layer compiled), on one packed micro-batch of
alpaca-like sequences, and times forward plus backward with CUDA events.

Variants (each one builds its model again and compiles afresh):
- ``default``: as the worker trains (LoRA dropout 0.05, Inductor's own random numbers);
- ``dropout0``: LoRA dropout 0, a bound on what the dropout costs (not the recipe);
- ``fallback_random``: Inductor leaves dropout to ATen's kernel (``torch._inductor.config.fallback_random``);
- ``coordinate_descent``: Inductor tunes its Triton kernels' block sizes on the card (``coordinate_descent_tuning``);
- ``graphs``: the layers compiled with ``mode="reduce-overhead"``: their kernels replay as CUDA graphs, without
  the launch gaps (the GPU idled about 8% of the default's time on an H100, RESULTS.md); gradients zeroed in
  place, so that they are not graph memory;
- ``eager``: no compile.

It prints per variant the median milliseconds a micro-batch (and quartiles) and, with ``--profile``, the GPU
time by kind of kernel for one micro-batch.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config  # the Inductor options some variants set

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = {  # name: (compile layers: False, True or "graphs", LoRA dropout, Inductor config)
    "default": (True, 0.05, {}),
    "dropout0": (True, 0.0, {}),
    "fallback_random": (True, 0.05, {"fallback_random": True}),
    "coordinate_descent": (True, 0.05, {"coordinate_descent_tuning": True}),
    "graphs": ("graphs", 0.05, {}),
    "eager": (False, 0.05, {}),
}


def build(width: int, layers: int, dropout: float, compiled: bool | str, device: torch.device) -> torch.nn.Module:
    from host_work import build as packed_model

    from workers.packed_model import causal_lm, one_graph_for_all_layers

    model = packed_model(True, True, compiled is True, width, layers, heads=max(1, width // 128), dropout=dropout,
                         device=device, dtype=torch.bfloat16)[0]
    if compiled == "graphs":
        lm = causal_lm(model)
        one_graph_for_all_layers(lm)
        for layer in lm.get_decoder().layers:
            layer.compile(dynamic=True, mode="reduce-overhead")
        for param in model.parameters():
            if param.requires_grad:
                param.grad = torch.zeros_like(param)
        model._zero_in_place = True
    return model


def micro_batch(tokens: int, device: torch.device) -> dict:
    from host_work import micro_batch as packed_row

    return {key: value.to(device) if isinstance(value, torch.Tensor) else value
            for key, value in packed_row(tokens, seed=0).items()}


def forward_backward(model: torch.nn.Module, batch: dict, device: torch.device) -> None:
    in_place = getattr(model, "_zero_in_place", False)
    if in_place:
        torch.compiler.cudagraph_mark_step_begin()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=not in_place)


def timed(model: torch.nn.Module, batch: dict, device: torch.device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            forward_backward(model, batch, device)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            forward_backward(model, batch, device)
            times.append(1e3 * (time.perf_counter() - started))
    return times


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    if "flash" in lowered or "fmha" in lowered:
        return "attention"
    if any(word in lowered for word in ("gemm", "cutlass", "sm90_xmma", "nvjet", "splitk", "matmul")):
        return "matmul"
    if lowered.startswith("triton"):
        return "triton"
    if "dropout" in lowered or "philox" in lowered or "bernoulli" in lowered:
        return "aten dropout"
    return "other"


def gpu_time_by_kind(model: torch.nn.Module, batch: dict, device: torch.device) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        forward_backward(model, batch, device)
        torch.cuda.synchronize()
    ms_by_kind: dict[str, float] = {}
    kernels_by_kind: dict[str, int] = {}
    top = []
    for event in profiler.key_averages():
        total = getattr(event, "device_time_total", 0.0) / 1e3
        if total <= 0 or event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        kind = kernel_kind(event.key)
        ms_by_kind[kind] = ms_by_kind.get(kind, 0.0) + total
        kernels_by_kind[kind] = kernels_by_kind.get(kind, 0) + event.count
        top.append((round(total, 2), event.count, kind, event.key[:90]))
    ranked = sorted(top, reverse=True)
    return {"ms_by_kind": {kind: round(ms, 2) for kind, ms in sorted(ms_by_kind.items())},
            "kernels_by_kind": dict(sorted(kernels_by_kind.items())),
            "top": ranked[:12],
            # the small kinds' largest kernels too ("other" is 141 kernels on an H100, named nowhere above)
            "top_by_kind": {kind: [entry for entry in ranked if entry[2] == kind][:5] for kind in sorted(ms_by_kind)}}


def measure(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    compiled, dropout, inductor = VARIANTS[name]
    torch._dynamo.reset()
    patch = torch._inductor.config.patch(inductor) if inductor else contextlib.nullcontext()
    with patch:
        model = build(args.width, args.layers, dropout, compiled, device)
        batch = micro_batch(args.tokens, device)
        started = time.perf_counter()
        forward_backward(model, batch, device)  # compiles here
        if device.type == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - started
        timed(model, batch, device, 3)
        times = timed(model, batch, device, args.repeats)
        quartiles = statistics.quantiles(times, n=4)
        result = {"variant": name, "tokens": batch["input_ids"].numel(), "layers": args.layers,
                  "ms": round(statistics.median(times), 2),
                  "ms_quartiles": [round(quartiles[0], 2), round(quartiles[2], 2)],
                  "first_s": round(first, 1)}
        if args.profile and device.type == "cuda":
            result.update(gpu_time_by_kind(model, batch, device))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="default,dropout0,fallback_random",
                        help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--width", type=int, default=4096, help="hidden size (the MLP keeps the 6.72B shape's ratio)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=5200, help="tokens in the packed micro-batch (one GPU: ~5,200)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--profile", action="store_true", help="also GPU time by kind of kernel (CUDA only)")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown --variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda"
                      else "cpu", "width": args.width, "layers": args.layers}), flush=True)
    for name in names:
        print(json.dumps(measure(name, args, device)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
