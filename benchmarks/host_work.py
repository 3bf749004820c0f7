#!/usr/bin/env python3
"""Host work of one packed micro-batch, forward and backward, on the CPU: how many operations, how long.

    .venv/bin/python benchmarks/host_work.py                       # peft, grouped, grouped + joined base; eager
    .venv/bin/python benchmarks/host_work.py --compiled            # the same with each layer compiled (Inductor)

At four GPUs a rank's step of about 2,600 tokens is bound by the CPU that launches its kernels, not by the GPU
(benchmarks/RESULTS.md): about 4,800 GPU operations a micro-batch. That CPU work hardly depends on the layers'
widths, so it can be measured here, with no GPU, on a model of the 6.72B pruned Llama-3's structure (32 layers,
LoRA r 8 on its 7 targets, grouped-query attention 4:1) at a small width, under bf16 autocast as the Trainer runs
it. For each set-up of the packed path it prints:

- ``operations``: the ATen operations one forward and backward dispatch (eager only; each is a kernel launch in
  eager CUDA);
- ``ms``: the median (and quartiles) of a micro-batch's wall time, at a token count small enough that the
  arithmetic is a small part of it. The set-ups take turns, one micro-batch each, so that a machine getting
  slower or faster during the run touches all of them alike.
- ``first_micro_batch_s``: the first micro-batch, which compiles the layers with ``--compiled``. Set-ups after
  the first may reuse its compiled code; run one set-up per process with ``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1``
  for a cold compile.

These are CPU numbers: a proxy for the launch side of a GPU step, not a GPU measurement.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SETUPS = {  # name: (group_lora, join_base)
    "peft": (False, False),
    "grouped": (True, False),
    "grouped+joined": (True, True),
}


class CountOperations(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def build(group_lora: bool, join_base: bool, compiled: bool, width: int, layers: int, heads: int = 8,
          dropout: float = 0.05, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """The 6.72B pruned Llama-3's structure (GQA 4:1, MLP 11008/4096 of the width) at ``width``, with LoRA r 8 on
    the recipe's targets, set up by ``prepare_model_for_packing``; ``dtype`` for the base weights (LoRA stays fp32)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from jobs.config import LORA_TARGETS
    from workers.packed_model import prepare_model_for_packing

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=width, intermediate_size=round(width * 11008 / 4096), num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), vocab_size=1024,
                         max_position_embeddings=2048)
    with torch.device(device):
        base = LlamaForCausalLM(config)
    model = get_peft_model(base.to(dtype) if dtype else base, LoraConfig(
        r=8, lora_alpha=16, lora_dropout=dropout, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"))
    setup = prepare_model_for_packing(model, compile_layers=compiled, group_lora=group_lora, join_base=join_base)
    model.train()
    return model, setup


def micro_batch(tokens: int, seed: int) -> dict:
    """Alpaca-like sequences (about 160 tokens, prompt masked) packed into one row of about ``tokens``."""
    from workers.packing import PackingCollator

    rng = random.Random(seed)
    items, total = [], 0
    while total < tokens:
        length = min(256, max(16, int(rng.lognormvariate(math.log(150), 0.5))), tokens - total + 16)
        prompt = rng.randint(4, length - 4)
        ids = [rng.randint(1, 1023) for _ in range(length)]
        items.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
        total += length
    return PackingCollator(max_length=256, pad_token_id=0)(items)


def step(model: torch.nn.Module, batch: dict) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def measure(names: list[str], compiled: bool, width: int, layers: int, tokens: int, repeats: int) -> list[dict]:
    batches = [micro_batch(tokens, seed) for seed in range(3)]
    models, results = {}, {}
    for name in names:
        group_lora, join_base = SETUPS[name]
        model, setup = build(group_lora, join_base, compiled, width, layers)
        results[name] = {"setup": name, "compiled": compiled, "grouped_modules": setup.grouped_lora_modules,
                         "joined_modules": setup.joined_base_modules, "tokens": batches[0]["input_ids"].numel()}
        if not compiled:
            with CountOperations() as counted:
                step(model, batches[0])
            results[name]["operations"] = counted.count
        started = time.perf_counter()
        step(model, batches[0])  # compiles here (--compiled)
        results[name]["first_micro_batch_s"] = round(time.perf_counter() - started, 1)
        for batch in batches[1:]:  # warm-up
            step(model, batch)
        models[name] = model
    times = {name: [] for name in names}
    for i in range(repeats):
        for name in names:
            started = time.perf_counter()
            step(models[name], batches[i % len(batches)])
            times[name].append(time.perf_counter() - started)
    for name in names:
        quartiles = statistics.quantiles(times[name], n=4)
        results[name]["ms"] = round(1e3 * statistics.median(times[name]), 1)
        results[name]["ms_quartiles"] = [round(1e3 * quartiles[0], 1), round(1e3 * quartiles[2], 1)]
    return [results[name] for name in names]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, of: {', '.join(SETUPS)}")
    parser.add_argument("--compiled", action="store_true",
                        help="compile each decoder layer, as the worker does on GPUs")
    parser.add_argument("--width", type=int, default=32, help="hidden size (the MLP keeps the 6.72B shape's ratio)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per micro-batch (a few sequences)")
    parser.add_argument("--repeats", type=int, default=30, help="timed micro-batches per set-up")
    args = parser.parse_args()
    unknown = set(args.setups.split(",")) - set(SETUPS)
    if unknown:
        parser.error(f"unknown --setups {sorted(unknown)}; choose from {', '.join(SETUPS)}")
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "width": args.width,
                      "layers": args.layers, "tokens": args.tokens}), flush=True)
    for result in measure(args.setups.split(","), args.compiled, args.width, args.layers, args.tokens, args.repeats):
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
