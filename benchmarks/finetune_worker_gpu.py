#!/usr/bin/env python3
"""The real finetune worker (workers.finetune.run) on a GPU: padded recipe path vs packed path.

    python3 benchmarks/finetune_worker_gpu.py --shape 1b --steps 6
    python3 benchmarks/finetune_worker_gpu.py --shape llama3-8b-pruned --work /tmp/w --prepare-only
    torchrun --nproc_per_node 2 benchmarks/finetune_worker_gpu.py --shape llama3-8b-pruned --work /tmp/w \
        --variants on --deepspeed zero2 --steps 60

Builds a random-init Llama of the chosen shape, a tokenizer trained here and alpaca-like rows (about
160 tokens, prompt masked), then runs the worker twice on the same data: ``finetune.packing=off``
(LLM-Pruner's layout: micro batch 4, padded) and ``finetune.packing=on`` (the default on GPUs). It prints
the real-token throughput each run recorded in its finetuning_config.json, and the steady-state throughput
after ``--skip`` steps (the worker's own figure includes torch.compile and the first steps) with the time per
step of each ``--block`` of steps after them, how long each checkpoint save took (``--checkpoint-steps``), and
how long the first step took (``first_step_s``: on a GPU it compiles the packed path's layers).
``benchmarks/lora_throughput.py`` is the controlled kernel-level benchmark; this one shows the worker itself
takes the fast path. Under torchrun each process is one rank of the real worker (ranks come from the launcher's
environment, as from SLURM's); prepare the model first with ``--prepare-only``.

``llama3-8b-pruned`` is the issue's 6.7B shape with the real 128,256-entry vocabulary in the model (embedding
and LM head at full size); the tokenizer trained here uses only the first ~1,000 ids.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": (64, 128, 2, 4, 2, 1024),
    "1b": (2048, 5632, 16, 32, 8, 1024),
    "llama3-8b-pruned-8l": (4096, 11008, 8, 32, 8, 1024),
    "llama3-8b-pruned": (4096, 11008, 32, 32, 8, 128256),
}
WORDS = ("the model learns to follow short instructions about colours numbers animals places and simple "
         "facts while the pruned network recovers what it lost").split()


def rows(count: int, seed: int) -> list[dict[str, str]]:
    """Alpaca-like rows whose token counts follow benchmarks/lora_throughput.py's (one word is one token here):
    instruction ~14 tokens, an input in 40% of rows (~16), response ~84 (lognormal, long tail), so that with
    the template about 163 tokens a row on average and about 18% reach the 256-token cutoff."""
    rng = random.Random(seed)
    words = lambda mean, sigma: " ".join(rng.choice(WORDS) for _ in range(round(rng.lognormvariate(  # noqa: E731
        math.log(mean), sigma)) + 1))
    return [{"instruction": words(14, 0.5), "input": words(16, 0.9) if rng.random() < 0.4 else "",
             "output": words(84, 0.9)} for _ in range(count)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps of 64 sequences per run")
    parser.add_argument("--variants", default="off,on", help="finetune.packing values to run, in order")
    parser.add_argument("--deepspeed", default="none", help="finetune.deepspeed (none, zero2, ...)")
    parser.add_argument("--checkpoint-steps", type=int, default=0, help="finetune.checkpoint_steps (0: none)")
    parser.add_argument("--skip", type=int, default=10, help="steps left out of the steady-state figure")
    parser.add_argument("--block", type=int, default=10,
                        help="also time each block of this many steady steps (block_ms_per_step): a steady run?")
    parser.add_argument("--profile-step", type=int, default=0,
                        help="profile this optimizer step on rank 0: GPU busy time, waits for the GPU, top CPU ops, "
                             "CPU time by part of the step")
    parser.add_argument("--trace", help="with --profile-step: also write the step's chrome trace here (.json.gz)")
    parser.add_argument("--logging-steps", type=int, default=10,
                        help="finetune.logging_steps (the worker's default, 10; each log line waits for the GPU)")
    parser.add_argument("--no-bucket-view", action="store_true",
                        help="DDP copies gradients out of its all-reduce buckets (the packed path's gradient_as_bucket_view off)")
    parser.add_argument("--no-group-lora", action="store_true",
                        help="peft runs each LoRA target on its own (the packed path's grouped q/k/v and gate/up off)")
    parser.add_argument("--no-join-base", action="store_true",
                        help="grouped LoRA keeps each base projection's weight apart (one product per target)")
    parser.add_argument("--capture-pad", type=int,
                        help="with finetune.cuda_graphs=on: pad micro-batches to a multiple of this many tokens "
                             "(default: the cutoff); smaller means less filler and more graphs")
    parser.add_argument("--work", help="folder for the model and data (kept; reused when already prepared)")
    parser.add_argument("--prepare-only", action="store_true", help="build model and data in --work, then stop")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="one more setting for every run, a key=value override as launch.py takes it "
                             "(e.g. finetune.lora_dropout=0)")
    parser.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                        help="set torch._inductor.config.KEY (a Python literal) before the runs, for an A/B")
    parser.add_argument("--sync-debug", action="store_true",
                        help="count the operations that make the CPU wait for the GPU (CUDA only), by phase and call "
                             "site: a wait inside the steps leaves the GPU idle while the CPU launches the next work")
    parser.add_argument("--tag", default="run", help="results go to <work>/<packing>-<tag>: one tag per run to compare")
    args = parser.parse_args()

    import torch
    import torch._inductor.config as inductor_config

    from jobs.config import load_config
    from jobs.study import Pair, StudyPaths
    from workers import finetune

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="prunetune-worker-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    if not (work / "pruned" / "config.json").is_file():
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SystemExit(f"prepare {work} first: the same command with --prepare-only and no launcher")
        prepare(work, args.shape, args.steps)
    if args.prepare_only:
        return 0
    from workers import packed_model, packed_trainer
    packed_trainer.GRADIENT_AS_BUCKET_VIEW = not args.no_bucket_view
    packed_trainer.GROUP_LORA = not args.no_group_lora
    packed_model.JOIN_BASE_WEIGHTS = not args.no_join_base
    packed_trainer.CAPTURE_PAD_MULTIPLE = args.capture_pad
    for setting in args.inductor:
        key, _, value = setting.partition("=")
        setattr(inductor_config, key, ast.literal_eval(value))
    steady = StepClock(args.skip, args.block)
    finetune.LogLines.on_save = steady.on_save
    begin_hooks = [steady.on_step_begin]
    end_hooks = [steady.on_step_end]
    syncs = SyncSites() if args.sync_debug and torch.cuda.is_available() else None
    if args.sync_debug and not syncs:
        print("--sync-debug: no CUDA device, nothing to count", flush=True)
    if syncs:
        begin_hooks.append(syncs.on_step_begin)
        end_hooks.append(syncs.on_step_end)
    if args.profile_step and rank == 0:
        label_regions()
        begin_hooks.append(StepProfile(args.profile_step, args.trace).on_step_begin)

    def on_step_begin(args, state, control, **kwargs) -> None:
        for hook in begin_hooks:
            hook(args, state, control, **kwargs)

    def on_step_end(args, state, control, **kwargs) -> None:
        for hook in end_hooks:
            hook(args, state, control, **kwargs)

    # plain callback hooks the worker's LogLines leaves unused
    finetune.LogLines.on_step_begin = staticmethod(on_step_begin)
    finetune.LogLines.on_step_end = staticmethod(on_step_end)
    results = []
    for variant in args.variants.split(","):
        study = load_config(None, [
            f"study.results_root={work / f'{variant}-{args.tag}'}", f"study.pruned_model_path={work / 'pruned'}",
            f"data.train_path={work / 'alpaca.json'}", f"finetune.packing={variant}",
            f"finetune.deepspeed={args.deepspeed}", f"finetune.checkpoint_steps={args.checkpoint_steps}",
            f"finetune.max_steps={args.steps}", "finetune.val_set_size=16", "finetune.eval_steps=1000",
            f"finetune.logging_steps={args.logging_steps}",
            f"resources.finetune.gpus_per_node={os.environ.get('WORLD_SIZE', '1')}", *args.set])
        done = StudyPaths(study).finetuned_dir(Pair("Llama", "best_acc")) / "finetuning_config.json"
        if done.is_file():  # the worker would skip a finished run, and this would print its old figures
            raise SystemExit(f"{work / f'{variant}-{args.tag}'} holds a finished run; pass another --tag or delete it")
        steady.reset()
        if syncs:
            syncs.start()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # each variant's own peak, not the process's
        started = time.monotonic()
        finetune.run(study, Pair("Llama", "best_acc"))
        wall = time.monotonic() - started
        if syncs:
            syncs.report(variant)
        if rank:
            continue
        record = json.loads((StudyPaths(study).finetuned_dir(Pair("Llama", "best_acc")) /
                             "finetuning_config.json").read_text())
        metrics = record["metrics"]
        tokens_per_step = metrics["train_tokens"] / metrics["optimizer_steps"]
        frozen_parameters = record["derived"]["total_parameters"] - record["derived"]["trainable_parameters"]
        steady_tokens_per_s = steady.tokens_per_s(tokens_per_step)
        ranks = record["derived"]["world_size"]
        # the MFU numerator, per GPU: 4 FLOPs per frozen parameter and real token, attention left out
        tflop_s_4n_per_gpu = (round(4 * frozen_parameters * steady_tokens_per_s / ranks / 1e12, 1)
                              if steady_tokens_per_s else None)
        results.append({"packing": variant, "ranks": ranks,
                        "deepspeed": record["derived"]["deepspeed"], "tokens_per_s": round(metrics["train_tokens_per_s"]),
                        "steady_tokens_per_s": steady_tokens_per_s,
                        "tflop_s_4n_per_gpu": tflop_s_4n_per_gpu,
                        "block_ms_per_step": steady.block_ms_per_step(),
                        "first_step_s": steady.first_step_s,  # with compile=auto on a GPU: compiling included
                        "checkpoint_save_s": steady.saves,
                        "train_runtime_s": metrics["train_runtime_s"], "wall_s": round(wall, 1),
                        "steps": metrics["optimizer_steps"], "first_loss": metrics["first_train_loss"],
                        "last_loss": metrics["last_train_loss"],
                        "rows_per_step": record["derived"]["packed_rows_per_rank_and_step"],
                        "grouped_joined": [(record["derived"]["packed_model"] or {}).get(key) for key in
                                           ("grouped_lora_modules", "joined_base_modules")],
                        "cuda_graphs": metrics.get("cuda_graphs"),  # finetune.cuda_graphs=on: graphs, capture s
                        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)
                        if torch.cuda.is_available() else None})
        print(json.dumps(results[-1]), flush=True)
    steady_by_variant = {result["packing"]: result["steady_tokens_per_s"] for result in results}
    if steady_by_variant.get("on") and steady_by_variant.get("off"):
        print(f"packed / padded steady real-token throughput: "
              f"{steady_by_variant['on'] / steady_by_variant['off']:.2f}x")
        # On a fast host the recipe's figure rises while ours, bound by the GPU, does not: say what 8x would take here
        needed = 8 * steady_by_variant["off"]
        needed_tflop_s = 4 * frozen_parameters * needed / ranks / 1e12
        print(f"8x the recipe here would be {needed:,} real tok/s, {needed_tflop_s:.0f} TFLOP/s per GPU by the 4N "
              f"count (compare the card's bf16 matmul rate)")
    return 0


class SyncSites:
    """Synchronizing CUDA operations (``torch.cuda.set_sync_debug_mode``), counted by phase (before the first
    step, in the steps, after the last) and call site (the innermost Python frames). Explicit
    ``torch.cuda.synchronize`` calls, such as StepClock's, are not counted."""

    def __init__(self) -> None:
        import collections

        self.counts: collections.Counter = collections.Counter()
        self.phase = "setup"
        self.shown = None  # the showwarning this replaces while counting

    def start(self) -> None:
        import warnings

        import torch

        self.counts.clear()
        self.phase = "setup"
        torch.cuda.set_sync_debug_mode("warn")
        warnings.simplefilter("always")  # each occurrence, not once per call site
        self.shown = warnings.showwarning
        warnings.showwarning = self.show

    def show(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchronizing" not in str(message):
            return self.shown(message, category, filename, lineno, file, line)
        import traceback

        frames = [frame for frame in traceback.extract_stack()[:-1] if "warnings" not in frame.filename][-4:]
        self.counts[self.phase, " < ".join(f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno} "
                                           f"{frame.name}" for frame in reversed(frames))] += 1

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self.phase = "steps"

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if state.global_step >= state.max_steps:
            self.phase = "after"

    def report(self, variant: str) -> None:
        import warnings

        import torch

        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = self.shown
        by_phase = {phase: sum(n for (p, _), n in self.counts.items() if p == phase)
                    for phase in ("setup", "steps", "after")}
        top = [[phase, site, n] for (phase, site), n in self.counts.most_common()][:12]
        print(json.dumps({"packing": variant, "rank": int(os.environ.get("RANK", "0")), "syncs_by_phase": by_phase,
                          "top_sites": top}), flush=True)


class StepClock:
    """Wall time from the end of step ``skip`` to the end of the last step, for a throughput without compile.

    It waits for the GPU at those two step ends, and every ``block`` steps between them: a wait at every step
    would itself leave the GPU idle while the next step is launched, which the worker alone does not do. The
    blocks' times per step show whether a run was steady; runs on the same data compare block by block.
    """

    def __init__(self, skip: int, block: int = 10) -> None:
        self.skip, self.block, self.times, self.saves, self.save_started = skip, block, [], [], 0.0
        self.first_started: float | None = None
        self.first_step_s: float | None = None

    def reset(self) -> None:
        self.times, self.saves, self.first_started, self.first_step_s = [], [], None, None

    def on_step_begin(self, args, state, control, **kwargs) -> None:  # called from LogLines.on_step_begin
        if self.first_started is None:
            self.first_started = _synchronized_now()

    def on_step_end(self, args, state, control, **kwargs) -> None:  # called from LogLines.on_step_end
        if self.first_step_s is None and self.first_started is not None:
            self.first_step_s = round(_synchronized_now() - self.first_started, 1)
        ends_window = state.global_step in (self.skip, state.max_steps) or (
            self.block > 0 and state.global_step > self.skip and (state.global_step - self.skip) % self.block == 0)
        if not (ends_window or control.should_save):
            return
        now = _synchronized_now()
        if ends_window:
            self.times.append((state.global_step, now))
        if control.should_save:  # the Trainer saves right after the step-end callbacks
            self.save_started = now

    def on_save(self, args, state, control, **kwargs) -> None:  # bound as LogLines.on_save
        self.saves.append(round(_synchronized_now() - self.save_started, 2))

    def tokens_per_s(self, tokens_per_step: float) -> int | None:
        if len(self.times) < 2:
            return None
        steps, seconds = self.times[-1][0] - self.times[0][0], self.times[-1][1] - self.times[0][1]
        return round(tokens_per_step * steps / seconds)

    def block_ms_per_step(self) -> list[float]:
        return [round(1e3 * (end - start) / (end_step - start_step), 1)
                for (start_step, start), (end_step, end) in zip(self.times, self.times[1:])]


REGION = "region: "  # the prefix of label_regions' profiler labels


def label_regions() -> None:
    """Wrap the parts of a Trainer step in profiler labels, so that a profiled step splits into them.

    Each label's CPU time includes what it calls; ``backward`` includes the wait for autograd's device thread.
    Labels cost a few microseconds a call; they do not change the work. Only benchmarks call this.
    """
    import functools

    import torch
    from accelerate import Accelerator
    from transformers import Trainer
    from transformers.models.llama.modeling_llama import LlamaModel
    from transformers.trainer_callback import CallbackHandler

    from workers import packed_model

    def labelled(function, label):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            with torch.profiler.record_function(REGION + label):
                return function(*args, **kwargs)
        return wrapper

    for owner, name, label in [
            (Trainer, "get_batch_samples", "fetch a step's micro-batches"), (Trainer, "training_step", "micro-batch"),
            (Trainer, "_prepare_inputs", "inputs to the device"), (Trainer, "compute_loss", "forward and loss"),
            (LlamaModel, "forward", "decoder forward"), (packed_model, "linear_cross_entropy", "head and loss"),
            (Accelerator, "backward", "backward"), (Trainer, "floating_point_ops", "FLOP count"),
            (Trainer, "_track_num_input_tokens", "token count"), (Trainer, "_clip_grad_norm", "clip gradients"),
            (Trainer, "_maybe_log_save_evaluate", "log, save, evaluate"),
            (CallbackHandler, "call_event", "callbacks"), (torch.nn.Module, "zero_grad", "zero_grad")]:
        if hasattr(owner, name):
            setattr(owner, name, labelled(getattr(owner, name), label))


class StepProfile:
    """torch.profiler over one optimizer step (its micro-batches and the optimizer step), printed as one line."""

    def __init__(self, step: int, trace: str | None = None) -> None:
        self.step, self.trace, self.profiler, self.started = step, trace, None, 0.0

    def on_step_begin(self, args, state, control, **kwargs) -> None:  # bound as LogLines.on_step_begin
        import torch
        from torch.profiler import ProfilerActivity, profile

        if state.global_step + 1 == self.step and self.profiler is None:
            self.started = _synchronized_now()
            activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])]
            self.profiler = profile(activities=activities)
            self.profiler.__enter__()
        elif state.global_step == self.step and self.profiler is not None:  # the step after: report
            self._report()

    def _report(self) -> None:
        wall = _synchronized_now() - self.started
        self.profiler.__exit__(None, None, None)
        if self.trace:  # gzipped: one step of a 32-layer model is tens of MB of JSON
            import gzip
            import shutil

            plain = Path(self.trace).with_suffix("")
            self.profiler.export_chrome_trace(str(plain))
            with plain.open("rb") as source, gzip.open(self.trace, "wb") as target:
                shutil.copyfileobj(source, target)
            plain.unlink()
        events = self.profiler.key_averages()
        # label_regions' labels appear on the GPU timeline too, as annotations spanning the kernels: count kernels only
        kernels = sum(e.self_device_time_total for e in events
                      if e.device_type.name == "CUDA" and not getattr(e, "is_user_annotation", False)) / 1e6
        # Synchronize calls are waits for the GPU; item/copy counts say where to look for more
        waits = {e.key: e.count for e in events if "Synchronize" in e.key or "cudaMemcpy" in e.key
                 or e.key in ("aten::item", "aten::_local_scalar_dense")}
        top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
        # inclusive CPU time of label_regions' labels and of the compiled layers' wrappers: [calls, ms]
        parts = {e.key.removeprefix(REGION)[:60]: [e.count, round(e.cpu_time_total / 1e3, 1)] for e in events
                 if e.device_type.name == "CPU" and (e.key.startswith((REGION, "Torch-Compiled Region", "Optimizer."))
                                                     or "CompiledFunction" in e.key or "Cache Lookup" in e.key)}
        print(json.dumps({"profiled_step": self.step, "wall_s": round(wall, 3), "gpu_kernels_s": round(kernels, 3),
                          "waits": waits, "top_cpu_ms": {e.key[:60]: round(e.self_cpu_time_total / 1e3, 1)
                                                         for e in top}, "inclusive_cpu": parts}), flush=True)
        self.profiler = None


def _synchronized_now() -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.monotonic()


def prepare(work: Path, shape: str, steps: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from workers.demo_inputs import train_tokenizer
    from workers.prompts import build_prompt, tokenize_example

    data = rows(64 * steps + 16, seed=0)
    (work / "alpaca.json").write_text(json.dumps(data))
    corpus = work / "corpus.txt"  # whole prompts, so the template's words become single tokens too
    corpus.write_text("\n".join(build_prompt(row["instruction"], row["input"], row["output"]) for row in data))
    tokenizer = train_tokenizer([corpus], work / "tokenizer")
    lengths = [len(tokenize_example(row, tokenizer, 256, False, True)["input_ids"]) for row in data]
    print(json.dumps({"rows": len(lengths), "mean_tokens": round(sum(lengths) / len(lengths), 1),
                      "at_cutoff_pct": round(100 * sum(n >= 256 for n in lengths) / len(lengths), 1)}), flush=True)
    hidden, intermediate, layers, heads, kv_heads, vocab = SHAPES[shape]
    config = LlamaConfig(vocab_size=max(vocab, len(tokenizer)), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    started = time.monotonic()
    torch.manual_seed(0)  # the same weights in every call: losses then compare across machines and calls
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(work / "pruned")
    tokenizer.save_pretrained(work / "pruned")
    parameters = sum(p.numel() for p in model.parameters())
    del model
    print(json.dumps({"shape": shape, "parameters": parameters, "build_s": round(time.monotonic() - started, 1),
                      "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                      "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
