#!/usr/bin/env python3
"""CUDA graphs for the packed LoRA layers: ``torch.compile(mode="reduce-overhead")`` against the worker's compile.

    python3 benchmarks/cuda_graph_probe.py eager 0.0       # the reference gradients (dropout 0)
    python3 benchmarks/cuda_graph_probe.py graphs 0.0      # CUDA graphs; then compare with the reference:
    python3 benchmarks/cuda_graph_probe.py compare
    python3 benchmarks/cuda_graph_probe.py compiled 0.05   # timing at the recipe's dropout
    python3 benchmarks/cuda_graph_probe.py static 0.05 --multiple 512   # CUDA graphs, one graph per padded length
    python3 benchmarks/cuda_graph_probe.py graphs 0.05 --ddp            # under DDP (one rank), as at four GPUs
    python3 benchmarks/cuda_graph_probe.py graphs 0.0 --layers 2 --micro-batches 16   # shorter (fewer graphs)
    .venv/bin/python benchmarks/cuda_graph_probe.py compiled 0.0 --tiny   # CPU smoke check

At four GPUs the worker's step is CPU-bound (benchmarks/RESULTS.md): each rank launches about 4,800 GPU
operations for 2,600 tokens. CUDA graphs would replay a layer's launches at once. This builds ``--layers`` (8)
layers of the 6.72B pruned Llama-3 shape (``--tiny``: 2 small layers) under peft LoRA (r 8, alpha 16, 7 targets;
B drawn non-zero so A gets gradients), ``--micro-batches`` (28) packed micro-batches of 16 alpaca-like sequences
(padded to a multiple of ``--multiple`` (256) tokens with a filler segment, ``cu_seqlens`` padded to 66 entries
with zero-length segments, so that only the token count varies), bf16 autocast, and runs forward and backward on
each, two micro-batches a step. ``--ddp`` wraps the model as the worker does at several GPUs (one rank here).

MODE: ``eager`` (no compile), ``compiled`` (``layer.compile(dynamic=True)``, as the worker does), ``graphs``
(the same with ``mode="reduce-overhead"``), ``static`` (``mode="reduce-overhead"`` with ``dynamic=False``: a
compile and a CUDA graph per padded length; flash attention's bound stays 256) or ``captured`` (the compiled
layers, and each micro-batch's forward, loss and backward captured whole as one CUDA graph per padded length:
``workers/captured_steps.py``, the worker's ``finetune.cuda_graphs=on``; micro-batches that capture are left
out of the means). The worker ran that class on an H100 (RESULTS.md); this probe's ``captured`` mode has not run.

It prints the CPU time to launch a micro-batch and its wall time (means over the micro-batches after the first
12, or after the first half when there are fewer than 24), and saves the first step's LoRA gradients to
/tmp/cg_MODE_DROPOUT.pt for ``compare``.

On an H200 with torch 2.11, ``graphs`` died with a segmentation fault; on an H100, ``static`` stopped at the
second micro-batch because the gradients were graph memory, which the next replay overwrites (RESULTS.md). The
gradients now have memory of their own (DDP's buckets under ``--ddp``). With them, ``graphs 0.0 --ddp --layers 2
--micro-batches 16`` ran on an H100 and took 1.8 times as long a micro-batch as ``compiled`` (RESULTS.md).
"""
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def batches(count, per_batch, seed, cu_len, multiple=256):
    from workers.packing import PackingCollator
    rng = random.Random(seed)
    collate = PackingCollator(max_length=256, pad_token_id=0, pad_to_multiple_of=multiple)
    out = []
    for _ in range(count):
        items = []
        for _ in range(per_batch):
            n = min(256, max(8, int(rng.lognormvariate(math.log(150), 0.5))))
            prompt = rng.randint(3, n - 2)
            ids = [rng.randint(1, 1000) for _ in range(n)]
            items.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
        b = collate(items)
        cu = b["cu_seq_lens_q"]
        fixed = torch.cat([cu, cu[-1:].repeat(cu_len - cu.numel())]) if cu_len else cu  # zero-length segments
        b["cu_seq_lens_q"] = b["cu_seq_lens_k"] = fixed
        out.append(b)
    return out


def build(tiny, dropout, layers=8):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from workers.packed_model import prepare_model_for_packing
    torch.manual_seed(0)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2) if tiny else dict(hidden_size=4096, intermediate_size=11008,
                                                          num_hidden_layers=layers, num_attention_heads=32,
                                                          num_key_value_heads=8)
    cfg = LlamaConfig(vocab_size=1024, max_position_embeddings=2048, **shape)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16 if device == "cuda" else torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # B = 0 at init would give A no gradient to compare
    prepare_model_for_packing(model, compile_layers=False)
    return model, device


def run(mode, dropout, tiny, multiple, ddp=False, layer_count=8, micro_batches=28):
    model, device = build(tiny, dropout, layer_count)
    layers = model.get_base_model().get_decoder().layers
    if mode == "captured" and (device != "cuda" or ddp):
        raise SystemExit("captured needs a CUDA device and no --ddp")
    if mode != "eager":
        import torch._dynamo as dynamo
        dynamo.config.cache_size_limit = 64
        if mode in ("graphs", "static"):
            import torch._inductor.config as ic
            ic.triton.cudagraph_unexpected_rerecord_limit = 4096
        for layer in layers:
            layer.compile(dynamic=mode != "static", mode="reduce-overhead" if mode in ("graphs", "static") else None)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if ddp:  # the worker's wrapping at several GPUs, here with one rank: gradients live in DDP's buckets
        import os

        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
        model = DistributedDataParallel(model, device_ids=[0] if device == "cuda" else None,
                                        gradient_as_bucket_view=True, find_unused_parameters=False)
    else:
        for p in trainable:
            # Gradients in memory of their own, zeroed in place, as in DDP's buckets: a backward adds into them.
            # With ``grad = None`` autograd keeps the first micro-batch's gradient tensor itself, which under CUDA
            # graphs is graph memory that the next micro-batch's replay overwrites (an error on an H100).
            p.grad = torch.zeros_like(p)
    data = batches(micro_batches, 4 if tiny else 16, 0, 66, multiple)
    skip = min(12, micro_batches // 2)
    losses, launch, wall, saved = [], [], [], None
    captures = 0
    micro_batch = None
    if mode == "captured":  # the worker's finetune.cuda_graphs=on, without the Trainer
        from workers.captured_steps import CapturedMicroBatches, FlatGradients

        def loss_fn(inputs):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model(**inputs).loss

        micro_batch = CapturedMicroBatches(loss_fn, FlatGradients(trainable), model.get_base_model()._prunetune_loss,
                                           capture=True)
    started_all = time.monotonic()
    for i, b in enumerate(data):
        inputs = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in b.items()}
        if micro_batch is not None:  # a fixed-shape loss: scaled by a device tensor, over every position
            inputs["num_items_in_batch"] = torch.tensor(b["target_positions"].numel(), device=device)
            inputs.pop("target_positions")
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if micro_batch is not None:
            captured = inputs["input_ids"].shape[1] not in micro_batch.graphs
            captures += captured
            loss = micro_batch(inputs)
        else:
            captured = False
            if mode in ("graphs", "static"):
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                out = model(**inputs)
            out.loss.backward()
            loss = out.loss
        t1 = time.perf_counter()
        if device == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        losses.append(loss.item())
        if i >= skip and not captured:
            launch.append(t1 - t0)
            wall.append(t2 - t0)
        if i % 2 == 1:  # two micro-batches per step: grads accumulate, then are read and zeroed
            if i == 1:
                saved = [p.grad.detach().float().cpu().clone() for p in trainable]
            for p in trainable:
                if p.grad is not None:
                    p.grad.zero_()
    tokens = sum(b["input_ids"].numel() for b in data[skip:]) / len(data[skip:])
    lengths = sorted({b["input_ids"].numel() for b in data})
    result = {"mode": mode, "dropout": dropout, "ddp": ddp, "tokens_per_micro": tokens, "padded_lengths": lengths,
              "launch_ms": round(1e3 * sum(launch) / len(launch), 2), "wall_ms": round(1e3 * sum(wall) / len(wall), 2),
              "first_losses": [round(x, 5) for x in losses[:4]], "all_s": round(time.monotonic() - started_all, 1),
              "timed_micro_batches": len(wall), "captures": captures,
              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None}
    print(json.dumps(result), flush=True)
    torch.save({"grads": saved, "losses": losses}, f"/tmp/cg_{mode}_{dropout}.pt")


def compare():
    ref = torch.load("/tmp/cg_eager_0.0.pt", weights_only=True)
    for mode in ("compiled", "graphs", "static", "captured"):
        try:
            got = torch.load(f"/tmp/cg_{mode}_0.0.pt", weights_only=True)
        except FileNotFoundError:
            print(mode, "missing")
            continue
        worst = max(float((a - b).abs().max() / (b.abs().max() + 1e-12)) for a, b in zip(got["grads"], ref["grads"]))
        dl = max(abs(a - b) for a, b in zip(got["losses"], ref["losses"]))
        print(json.dumps({"mode": mode, "worst_rel_grad_diff_step1": worst, "max_loss_diff": dl}))


if __name__ == "__main__":
    if sys.argv[1] == "compare":
        compare()
    else:
        def option(name, default):
            return int(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default

        run(sys.argv[1], float(sys.argv[2]), "--tiny" in sys.argv, option("--multiple", 256), "--ddp" in sys.argv,
            option("--layers", 8), option("--micro-batches", 28))
