#!/usr/bin/env python3
"""What ``finetune.cuda_graphs=on`` captures and scores over whole epochs: shapes per rank, head rows, padding.

    .venv/bin/python benchmarks/finetune_worker_gpu.py --shape tiny --work /tmp/w --prepare-only --steps 120
    .venv/bin/python benchmarks/captured_shapes.py --work /tmp/w

Reads the benchmark's prepared tokenizer and alpaca-like rows, tokenizes them as the worker does (the recipe's
cutoff, prompt masked), plans the steps as ``workers/packed_trainer.py`` does, and collates rank 0's
micro-batches with the captured path's collator. For each layout it prints, per GPU count and token budget:

- ``graphs``: distinct micro-batch shapes rank 0 meets, each one CUDA graph;
- ``padded_per_real``: tokens through the layers per real token (the filler up to a multiple of the cutoff);
- ``head_rows_per_real``: rows through the vocabulary-wide head per real token.

Layouts: ``every_position`` scores every padded position (the captured path); ``target_slots`` would score the
target positions padded to a multiple of the cutoff (34bdfa3 did, reverted: on an H200 it was no faster and
captured about twice the graphs, benchmarks/RESULTS.md); ``uncaptured`` is the packed path without graphs, which
scores the targets alone. No model runs: these are counts, the same on any machine.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.config import FinetuneSettings  # noqa: E402
from workers.packed_trainer import captured_collator  # noqa: E402
from workers.packing import IGNORE_INDEX, PackedStepSampler, micro_batches_for_budget  # noqa: E402
from workers.prompts import tokenize_example  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="a folder finetune_worker_gpu.py --prepare-only made")
    parser.add_argument("--layouts", default="1:2816,1:3072,1:8192,2:8192,4:8192",
                        help="GPUs:packing_max_tokens pairs, comma-separated")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--slot-multiple", type=int, default=256, help="target_slots: targets padded to this multiple")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    tune = FinetuneSettings()
    tokenizer = AutoTokenizer.from_pretrained(args.work / "tokenizer")
    rows = json.loads((args.work / "alpaca.json").read_text())
    items = [tokenize_example(row, tokenizer, tune.cutoff_len, tune.train_on_inputs, tune.add_eos_token)
             for row in rows]
    lengths = [len(item["input_ids"]) for item in items]
    print(json.dumps({"rows": len(items), "mean_tokens": round(sum(lengths) / len(lengths), 1),
                      "cutoff": tune.cutoff_len, "epochs": args.epochs}), flush=True)
    collate = captured_collator(tune, tokenizer.pad_token_id)
    for layout in args.layouts.split(","):
        world, budget = (int(part) for part in layout.split(":"))
        micro = micro_batches_for_budget(lengths, tune.batch_size, world, max_tokens=budget, seed=tune.seed,
                                         epochs=args.epochs)
        sampler = PackedStepSampler(lengths, tune.batch_size, world, micro, seed=tune.seed)
        lengths_seen, pairs_seen = set(), set()
        micro_batches = real = padded = targets = slots = 0
        for epoch in range(args.epochs):
            sampler.set_epoch(epoch)
            for step in sampler.steps():
                for group in step[0::world]:  # rank 0's micro-batches
                    batch = collate([items[index] for index in group])
                    length = batch["input_ids"].shape[-1]
                    target_count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # t predicts labels[t + 1]
                    slot_count = target_count + -target_count % args.slot_multiple
                    lengths_seen.add(length)
                    pairs_seen.add((length, slot_count))
                    micro_batches += 1
                    real += sum(lengths[index] for index in group)
                    padded += length
                    targets += target_count
                    slots += slot_count
        print(json.dumps({"gpus": world, "packing_max_tokens": budget, "micro_batches_per_step": micro,
                          "real_tokens_per_micro_batch": round(real / micro_batches),
                          "padded_per_real": round(padded / real, 3),
                          # every position but the last of a micro-batch predicts a next token
                          "every_position": {"graphs": len(lengths_seen),
                                             "head_rows_per_real": round((padded - micro_batches) / real, 3)},
                          "target_slots": {"graphs": len(pairs_seen), "head_rows_per_real": round(slots / real, 3)},
                          "uncaptured": {"head_rows_per_real": round(targets / real, 3)}}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
