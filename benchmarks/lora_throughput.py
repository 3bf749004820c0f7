#!/usr/bin/env python3
"""LoRA recovery throughput: LLM-Pruner's padded recipe against our packed path, same run, same card.

    # one GPU: the recipe, packed eager, packed + compiled layers (micro-batch token budget after '@')
    python3 benchmarks/lora_throughput.py --variants recipe,packed@4096,compiled@8192
    # two GPUs (data parallel: one NCCL all-reduce of the flat LoRA gradients per optimizer step)
    torchrun --nproc_per_node 2 benchmarks/lora_throughput.py --variants compiled@8192
    # CPU smoke check of the whole script
    .venv/bin/python benchmarks/lora_throughput.py --model-shape tiny --variants recipe,packed --steps 2 --warmup 1

Model: random-init Llama of a real pruned shape (``llama3-8b-pruned``: Llama-3-8B with MLP width 11008,
6.72B parameters, vocab 128,256, 32 layers, GQA 32/8 heads, hidden 4096), bf16 weights, LoRA r8 (alpha 16,
dropout 0.05) on q/k/v/o/gate/up/down with fp32 adapter weights (peft's default), bf16 autocast, fused
AdamW on the LoRA parameters. Data: synthetic Alpaca-like examples, cutoff 256, mean about 160 tokens
(18% reach the cutoff), prompt part (about 60 tokens) labelled -100. Every optimizer step takes 64 sequences.

Variants:
- ``recipe``: the LLM-Pruner recipe as our worker runs it: 16 micro-batches of 4 sequences padded to the
  longest (multiple of 8), SDPA attention with the padding mask, the model's own loss (fp32 logits of every
  position), normalised by the step's target count as the transformers 5 Trainer does.
- ``packed``: ``workers.packing``: token-balanced padding-free micro-batches of at most N tokens (``@N``),
  flash varlen attention, chunked linear cross-entropy on target positions only; eager.
- ``compiled``: ``packed`` plus ``torch.compile`` of each decoder layer (regional, dynamic shapes) and of
  the loss chunk.

Throughput counts real (non-pad) tokens. MFU = model FLOPs / time / 989 TFLOP/s (H100 SXM dense bf16), with
model FLOPs per step = 4 * N_linear * tokens + sum over sequences of 6 * layers * d_attn * L * (L + 1):
N_linear counts every linear weight (q/k/v/o/gate/up/down in all layers, and the LM head; not the embedding
table, which is a lookup); 4 = 2 (forward) + 2 (input gradient; frozen weights get no weight gradient); the
attention term is causal QK^T and PV (2 * d_attn * L * (L + 1) per layer forward) times 3 for forward plus
backward. LoRA's own FLOPs (r = 8) are left out. The recipe gets the same count: its padding is waste.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from workers.packed_model import prepare_model_for_packing  # noqa: E402
from workers.packing import IGNORE_INDEX, PackingCollator, micro_batches_for_budget, plan_steps  # noqa: E402

PEAK_BF16_FLOPS = 989e12  # H100 SXM dense bf16, the MFU denominator
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQUENCES_PER_STEP = 64
RECIPE_MICRO_BATCH = 4
CUTOFF = 256
MODEL_SHAPES = {
    # Llama-3-8B with the MLP pruned from 14336 to 11008: 6.72B parameters
    "llama3-8b-pruned": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=8, vocab_size=128256),
    # the same with 4 layers: quick checks of memory and compile on a GPU
    "llama3-8b-pruned-4l": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=4,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),  # CPU smoke check
}
DEFAULT_BUDGET = {"packed": 4096, "compiled": 8192}


@dataclass
class Result:
    variant: str
    world_size: int
    micro_batches: str
    tokens_per_s: float = float("nan")
    tokens_per_s_per_gpu: float = float("nan")
    mfu: float = float("nan")
    step_s: float = float("nan")
    peak_alloc_gib: float = float("nan")
    peak_reserved_gib: float = float("nan")
    warmup_s: float = float("nan")
    loss: float = float("nan")
    padding_pct: float = 0.0
    error: str = ""


def synthetic_examples(count: int, vocab: int, seed: int) -> list[dict[str, list[int]]]:
    """Alpaca-like token sequences: template + instruction (+ input in 40%) + response, cut at 256."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        has_input = rng.random() < 0.4
        prompt = (41 if has_input else 31) + round(rng.lognormvariate(math.log(14), 0.5))
        if has_input:
            prompt += round(rng.lognormvariate(math.log(16), 0.9))
        response = round(rng.lognormvariate(math.log(84), 0.9)) + 1
        length = min(prompt + response, CUTOFF)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        masked = min(prompt, length)
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * masked + ids[masked:]})
    return examples


def model_flops(config, lengths: list[int]) -> float:
    """Model FLOPs of one forward + input-gradient backward over sequences of ``lengths`` (module docstring)."""
    d, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = d * q_out + 2 * d * kv_out + q_out * d + 3 * d * config.intermediate_size
    linear = layers * per_layer + d * config.vocab_size
    attention = sum(6 * layers * q_out * length * (length + 1) for length in lengths)
    return 4 * linear * sum(lengths) + attention


def build_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**MODEL_SHAPES[shape], max_position_embeddings=8192, attn_implementation="sdpa",
                         use_cache=False, pad_token_id=0)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build straight in the training dtype: no fp32 copy of 6.7B weights
    try:
        with torch.device(device):
            base = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    base.requires_grad_(False)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=LORA_TARGETS, bias="none",
                      task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(base, lora)
    return model, config


def pad_batch(items: list[dict[str, list[int]]], device: torch.device) -> dict[str, torch.Tensor]:
    """What DataCollatorForSeq2Seq(pad_to_multiple_of=8) gives: right padding, labels -100 on padding."""
    width = max(len(item["input_ids"]) for item in items)
    width = -(-width // 8) * 8
    ids = torch.zeros((len(items), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        ids[row, :n] = torch.tensor(item["input_ids"])
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(item["labels"])
    return {name: tensor.to(device) for name, tensor in
            {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


def to_device(batch: dict, device: torch.device) -> dict:
    """Pinned and non-blocking: a copy from pageable memory would make the CPU wait for the GPU's queue."""
    pin = device.type == "cuda"
    return {key: (value.pin_memory() if pin else value).to(device, non_blocking=True) if torch.is_tensor(value)
            else value for key, value in batch.items()}


def all_reduce_grads(params: list[torch.Tensor]) -> None:
    """What DDP does once per optimizer step (no_sync during accumulation): sum the flat gradients."""
    import torch.distributed as dist
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def targets(labels: list[int]) -> int:
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


def run_variant(name: str, budget: int | None, model, config, examples, steps: int, warmup: int, rank: int,
                world: int, device: torch.device, dtype: torch.dtype, seed: int, profile: str | None = None) -> Result:
    from workers.packed_model import causal_lm

    on_gpu = device.type == "cuda"
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=on_gpu)
    autocast = torch.autocast("cuda", dtype=dtype) if on_gpu else contextlib.nullcontext()
    total_steps = warmup + steps
    pool = examples[: total_steps * SEQUENCES_PER_STEP]
    lengths = [len(item["input_ids"]) for item in pool]
    lm = causal_lm(model)

    if name == "recipe":
        if world > 1:
            raise ValueError("the recipe variant runs on one GPU (it is the baseline)")
        lm.config._attn_implementation = "sdpa"  # padded batches: the recipe's attention with its padding mask
        order = list(range(len(pool)))
        random.Random(seed).shuffle(order)
        full_plan = [[order[s * 64 + m * 4: s * 64 + (m + 1) * 4]
                      for m in range(SEQUENCES_PER_STEP // RECIPE_MICRO_BATCH)] for s in range(total_steps)]
        plan = full_plan
        micro_desc = f"{SEQUENCES_PER_STEP // RECIPE_MICRO_BATCH} x 4 seqs"
    else:
        micro = micro_batches_for_budget(lengths, SEQUENCES_PER_STEP, world, budget, seed)
        full_plan = plan_steps(lengths, SEQUENCES_PER_STEP, world, micro, seed)
        plan = [step[rank::world] for step in full_plan]
        micro_desc = f"{micro} x <= {budget} tok"
        prepare_model_for_packing(model, compile_layers=name == "compiled", chunk_size=4096)
    collate = PackingCollator(max_length=CUTOFF)
    result = Result(name if budget is None else f"{name}@{budget}", world, micro_desc)

    def prepare(step_plan: list[list[int]]) -> tuple[int, int, list[dict]]:
        """This rank's micro-batches of one step on the device, with real and laid-out token counts."""
        real = laid_out = 0
        batches = []
        for group in step_plan:
            items = [pool[i] for i in group]
            batches.append(pad_batch(items, device) if name == "recipe" else to_device(collate(items), device))
            laid_out += batches[-1]["input_ids"].numel()
            real += sum(len(item["input_ids"]) for item in items)
        return real, laid_out, batches

    def step_target_count(step_index: int) -> int:
        """The step's target tokens over all ranks (the Trainer's num_items_in_batch), from the plan: no sync."""
        return sum(targets(pool[i]["labels"]) for group in full_plan[step_index] for i in group)

    def train_step(step_index: int) -> tuple[int, int, torch.Tensor]:
        real, laid_out, batches = prepare(plan[step_index])
        count = step_target_count(step_index)
        loss_sum = torch.zeros((), device=device)
        for batch in batches:
            with autocast:
                loss = model(**batch, num_items_in_batch=count).loss
            loss.backward()
            loss_sum += loss.detach()
        if world > 1:
            all_reduce_grads(params)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return real, laid_out, loss_sum

    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for index in range(warmup):
        train_step(index)
    sync()
    result.warmup_s = time.perf_counter() - started
    real_total = padded_total = 0
    lengths_timed: list[int] = []
    started = time.perf_counter()
    losses = []
    for index in range(warmup, total_steps):
        real, padded, loss_sum = train_step(index)
        real_total += real
        padded_total += padded
        losses.append(loss_sum)
        lengths_timed += [lengths[i] for group in plan[index] for i in group]
    sync()
    elapsed = time.perf_counter() - started
    flops = model_flops(config, lengths_timed)
    mean_loss = float(torch.stack(losses).mean()) if losses else float("nan")
    if world > 1:  # sum over ranks: tokens, FLOPs and each rank's share of the loss; mean time
        import torch.distributed as dist
        totals = torch.tensor([real_total, flops, elapsed, mean_loss], device=device, dtype=torch.float64)
        dist.all_reduce(totals)
        real_total, flops, elapsed, mean_loss = int(totals[0]), float(totals[1]), float(totals[2]) / world, float(
            totals[3])
    result.tokens_per_s = real_total / elapsed
    result.tokens_per_s_per_gpu = result.tokens_per_s / world
    result.mfu = flops / elapsed / PEAK_BF16_FLOPS / world
    result.step_s = elapsed / steps
    result.loss = mean_loss
    result.padding_pct = 100.0 * (1 - real_total / max(padded_total * world, 1))
    if on_gpu:
        result.peak_alloc_gib = torch.cuda.max_memory_allocated() / 2**30
        result.peak_reserved_gib = torch.cuda.max_memory_reserved() / 2**30
    if profile and name != "recipe":  # every rank runs the step (it all-reduces); rank 0 writes the table
        from torch.profiler import ProfilerActivity
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        with torch.profiler.profile(activities=activities) as prof:
            train_step(total_steps - 1)
            sync()
        if rank == 0:
            table = prof.key_averages().table(sort_by="cuda_time_total" if on_gpu else "cpu_time_total",
                                              row_limit=40, max_name_column_width=70)
            with open(profile, "a") as handle:
                handle.write(f"==== {result.variant} ====\n{table}\n")
    del optimizer
    return result


def matmul_ceiling(device: torch.device) -> float:
    """Measured bf16 TFLOP/s of an 8192^3 product (median of 20)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / sorted(times)[len(times) // 2] / 1e12


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-shape", default="llama3-8b-pruned", choices=sorted(MODEL_SHAPES))
    parser.add_argument("--variants", default="recipe,packed,compiled",
                        help="comma list of recipe | packed[@tokens] | compiled[@tokens]")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps (64 sequences each)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first (compile happens here)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--profile", help="profile one extra step of each packed variant; top kernels to this file")
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    on_gpu = torch.cuda.is_available()
    if world > 1:
        import torch.distributed as dist
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if on_gpu else "gloo")
    device = torch.device("cuda") if on_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32

    variants = []
    for spec in args.variants.split(","):
        name, _, budget = spec.strip().partition("@")
        if name not in ("recipe", "packed", "compiled"):
            parser.error(f"unknown variant {name!r}; choose recipe, packed or compiled")
        variants.append((name, None if name == "recipe" else int(budget or DEFAULT_BUDGET[name])))
    # eager variants first: compiling wraps the layers for the rest of the process
    variants.sort(key=lambda v: ("recipe", "packed", "compiled").index(v[0]))

    header = {"model_shape": args.model_shape, "world_size": world, "device": torch.cuda.get_device_name() if on_gpu
              else "cpu", "torch": torch.__version__}
    import peft
    import transformers
    header.update(transformers=transformers.__version__, peft=peft.__version__)
    if on_gpu and rank == 0:
        header["matmul_tflops"] = round(matmul_ceiling(device), 1)
    started = time.perf_counter()
    model, config = build_model(args.model_shape, device, dtype, args.seed)
    header["build_s"] = round(time.perf_counter() - started, 1)
    header["parameters"] = sum(p.numel() for p in model.parameters())
    header["lora_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    examples = synthetic_examples((args.warmup + args.steps) * SEQUENCES_PER_STEP, config.vocab_size, args.seed)
    header["mean_tokens"] = round(sum(len(e["input_ids"]) for e in examples) / len(examples), 1)
    if rank == 0:
        print(json.dumps(header), flush=True)

    results = []
    for name, budget in variants:
        try:
            result = run_variant(name, budget, model, config, examples, args.steps, args.warmup, rank, world, device,
                                 dtype, args.seed, args.profile)
        except torch.cuda.OutOfMemoryError as error:
            result = Result(name if budget is None else f"{name}@{budget}", world, "", error="OOM")
            print(f"{name}: {str(error).splitlines()[0]}", flush=True)
        except Exception as error:  # keep measuring the other variants; the table says what failed
            result = Result(name if budget is None else f"{name}@{budget}", world, "",
                            error=f"{type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}")
            import traceback
            traceback.print_exc()
        for p in model.parameters():
            p.grad = None
        if on_gpu:
            torch.cuda.empty_cache()
        results.append(result)
        if rank == 0:
            print(json.dumps(asdict(result)), flush=True)

    if rank == 0:
        base = next((r.tokens_per_s for r in results if r.variant == "recipe" and not r.error), None)
        print(f"\n{args.model_shape}, {world} x {header['device']}, {args.steps} timed steps of 64 sequences "
              f"(mean {header['mean_tokens']} tokens)")
        print(f"{'variant':<16} {'micro-batches/rank':<20} {'tok/s':>9} {'tok/s/GPU':>9} {'MFU':>6} {'x recipe':>8} "
              f"{'step s':>7} {'peak GiB':>8} {'pad %':>6} {'warmup s':>8} {'loss':>7}  error")
        for r in results:
            speedup = f"{r.tokens_per_s / base:.2f}" if base and not r.error else "-"
            print(f"{r.variant:<16} {r.micro_batches:<20} {r.tokens_per_s:>9.0f} {r.tokens_per_s_per_gpu:>9.0f} "
                  f"{100 * r.mfu:>5.1f}% {speedup:>8} {r.step_s:>7.2f} {r.peak_alloc_gib:>8.1f} {r.padding_pct:>6.1f} "
                  f"{r.warmup_s:>8.1f} {r.loss:>7.3f}  {r.error}")
        if args.json:
            Path(args.json).write_text(json.dumps({"header": header, "results": [asdict(r) for r in results]},
                                                  indent=1))
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
