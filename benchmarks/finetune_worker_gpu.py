#!/usr/bin/env python3
"""The real finetune worker (workers.finetune.run) on a GPU: padded recipe path vs packed path.

    python3 benchmarks/finetune_worker_gpu.py --shape 1b --steps 6

Builds a random-init Llama of the chosen shape, a tokenizer trained here and alpaca-like rows (about
160 tokens, prompt masked), then runs the worker twice on the same data: ``finetune.packing=off``
(LLM-Pruner's layout: micro batch 4, padded) and ``finetune.packing=on`` (the default on GPUs). It prints
the real-token throughput each run recorded in its finetuning_config.json. ``benchmarks/lora_throughput.py``
is the controlled kernel-level benchmark; this one shows the worker itself takes the fast path.
"""
from __future__ import annotations

import argparse
import json
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
}
WORDS = ("the model learns to follow short instructions about colours numbers animals places and simple "
         "facts while the pruned network recovers what it lost").split()


def rows(count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
        out.append({"instruction": words(rng.randint(8, 30)), "input": words(rng.randint(0, 30)),
                    "output": words(rng.randint(20, 160))})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps of 64 sequences per run")
    parser.add_argument("--variants", default="off,on", help="finetune.packing values to run, in order")
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jobs.config import load_config
    from jobs.study import Pair, StudyPaths
    from workers import finetune
    from workers.demo_inputs import train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="prunetune-worker-gpu-"))
    data = rows(64 * args.steps + 16, seed=0)
    (work / "alpaca.json").write_text(json.dumps(data))
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(" ".join(row.values()) for row in data))
    tokenizer = train_tokenizer([corpus], work / "tokenizer")
    hidden, intermediate, layers, heads, kv_heads, _ = SHAPES[args.shape]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    started = time.monotonic()
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(work / "pruned")
    tokenizer.save_pretrained(work / "pruned")
    parameters = sum(p.numel() for p in model.parameters())
    del model
    print(json.dumps({"shape": args.shape, "parameters": parameters, "build_s": round(time.monotonic() - started, 1),
                      "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                      "torch": torch.__version__}), flush=True)

    results = []
    for variant in args.variants.split(","):
        study = load_config(None, [
            f"study.results_root={work / variant}", f"study.pruned_model_path={work / 'pruned'}",
            f"data.train_path={work / 'alpaca.json'}", f"finetune.packing={variant}", "finetune.deepspeed=none",
            f"finetune.max_steps={args.steps}", "finetune.val_set_size=16", "finetune.eval_steps=1000",
            "finetune.logging_steps=1"])
        started = time.monotonic()
        finetune.run(study, Pair("Llama", "best_acc"))
        wall = time.monotonic() - started
        record = json.loads((StudyPaths(study).finetuned_dir(Pair("Llama", "best_acc")) /
                             "finetuning_config.json").read_text())
        metrics = record["metrics"]
        results.append({"packing": variant, "tokens_per_s": round(metrics["train_tokens_per_s"]),
                        "train_runtime_s": metrics["train_runtime_s"], "wall_s": round(wall, 1),
                        "steps": metrics["optimizer_steps"], "first_loss": round(metrics["first_train_loss"], 4),
                        "last_loss": round(metrics["last_train_loss"], 4),
                        "rows_per_step": record["derived"]["packed_rows_per_rank_and_step"]})
        print(json.dumps(results[-1]), flush=True)
    if len(results) == 2 and results[0]["tokens_per_s"]:
        print(f"packed / padded real-token throughput: {results[1]['tokens_per_s'] / results[0]['tokens_per_s']:.2f}x "
              "(train_runtime includes torch.compile of the packed path's first steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
