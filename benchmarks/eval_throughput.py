#!/usr/bin/env python3
"""Evaluation throughput: lm-eval's HF backend (batch 1 and 64) against our ``prunetune`` backend, one run.

    # one H100, full sets for ours and hf@64, 20 docs per task at batch 1 (about 8 min; no network needed)
    python3 benchmarks/eval_throughput.py --no-fp32-reference
    # CPU smoke check of the whole script (tiny model, data at 5% of the real sizes)
    .venv/bin/python benchmarks/eval_throughput.py --tiny

Model: random-init Llama of the 6.7B pruned-Llama-3 shape (Llama-3-8B with MLP width 11008, vocab 128,256,
32 layers, GQA 32/8, hidden 4096), bf16 weights, SDPA attention, on the GPU.

Data: the seven tasks' files in their real schemas at their real sizes (BoolQ 3,270, PIQA 1,838, HellaSwag
10,042, WinoGrande 1,267, ARC-e 2,376, ARC-c 1,172, OBQA 500 docs), WikiText-2 test (~290k tokens) and PTB
validation (~80k tokens), made of synthetic words read by a word-level tokenizer built here (one token per
word or punctuation mark). Field lengths are drawn around ``LENGTHS``: our estimates of the real data's mean
Llama-3 token counts, so prompts and continuations are about as long as with the real data and tokenizer.

What is timed, in one process on one model:
- ``build``: lm-eval loading the seven full data sets and building all their requests (the same for every
  backend: lm-eval does it); also gives the full sets' request counts.
- per backend, each task as its own lm-eval run (as ``workers/evaluate.py`` runs them), in the same lm-eval
  session as the worker's (``zero_shot.lm_eval_session``: templates compiled once, for every backend). With
  ``--docs-per-task 0`` (the default) ours and hf@64 run the full sets and their wall time is measured end to
  end (build, tokenizing, scoring, metrics). Batch 1 runs ``--b1-docs-per-task`` docs: its time inside
  ``loglikelihood`` (scoring), extrapolated per task to the full set by request count, plus ``build``.
- ``hf@64/fp32``: HF at batch 64 with ``softmax_dtype=float32``, the numerically like-for-like reference
  (HF's default takes log-probs in bf16, rounding each and their sum to bf16).
- perplexity (``workers.perplexity``, LLM-Pruner's recipe, seq 128) on both texts at batch 64 (our default)
  and 8; the total uses the default.
Checks: every task's acc and acc_norm of ``prunetune`` against ``hf@64`` and ``hf@64/fp32`` (identical or
not, and how many docs' predictions differ), max |log-likelihood difference| per request; ``hf@1`` against
``hf@64`` on its docs shows what bf16 rounding alone moves.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from jobs.config import ZERO_SHOT_TASKS, DataSettings, EvaluateSettings  # noqa: E402
from workers import zero_shot  # noqa: E402
from workers.fast_lm import PruneTuneLM  # noqa: E402
from workers.perplexity import compute_perplexity  # noqa: E402

FULL_DOCS = {"boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376,
             "arc_challenge": 1172, "openbookqa": 500}
WIKITEXT_ROWS, PTB_ROWS = 4358, 3370
# (mean, sd) of each field in Llama-3 tokens (our estimates of the real data), drawn as words here.
LENGTHS = {"boolq.passage": (130, 55), "boolq.question": (9, 3), "piqa.goal": (12, 6), "piqa.sol": (22, 14),
           "hellaswag.label": (3, 1), "hellaswag.ctx_a.activitynet": (28, 8), "hellaswag.ctx_a.wikihow": (60, 20),
           "hellaswag.ctx_b": (7, 3), "hellaswag.ending.activitynet": (17, 6), "hellaswag.ending.wikihow": (32, 14),
           "winogrande.before": (12, 5), "winogrande.after": (10, 4), "winogrande.option": (2, 1),
           "arc_easy.question": (22, 9), "arc_easy.choice": (5, 3), "arc_challenge.question": (28, 12),
           "arc_challenge.choice": (7, 4), "openbookqa.stem": (12, 6), "openbookqa.choice": (4, 2),
           "wikitext.paragraph": (115, 50), "ptb.sentence": (24, 10)}
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]
PUNCTUATION = [":", "?", ".", ",", "_", "=", "\n"]
TEMPLATE_WORDS = ["Question", "Answer", "yes", "no", "Yes", "No"]

log = logging.getLogger("eval_throughput")


# ---------------------------------------------------------------- tokenizer and words


def word_list(size: int) -> list[str]:
    """``size`` distinct lower-case letter strings (a, b, ..., z, aa, ab, ...), each one word for the tokenizer."""
    words, number = [], 0
    while len(words) < size:
        value, text = number, ""
        while True:
            text = chr(97 + value % 26) + text
            value = value // 26 - 1
            if value < 0:
                break
        if text not in TEMPLATE_WORDS:
            words.append(text)
        number += 1
    return words


def build_tokenizer(vocab_size: int, folder: Path) -> tuple[Any, list[str]]:
    """A word-level tokenizer (BOS first, like Llama-3's) with ``vocab_size`` entries; returns it and its words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    fixed = SPECIAL + [mark for mark in PUNCTUATION if mark != "\n"] + TEMPLATE_WORDS
    words = word_list(vocab_size - len(fixed))
    vocab = {token: number for number, token in enumerate(fixed + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                      pad_token="<pad>", unk_token="<unk>", model_max_length=8192)
    wrapped.save_pretrained(folder)
    return wrapped, words


class Text:
    """Zipf-distributed words, deterministic for a seed."""

    def __init__(self, words: list[str], seed: int) -> None:
        self.rng, self.words = random.Random(seed), words
        total, self.cumulative = 0.0, []
        for rank in range(len(words)):
            total += 1.0 / (rank + 10)
            self.cumulative.append(total)

    def __call__(self, field: str, low: int = 1) -> str:
        mean, sd = LENGTHS[field]
        count = max(low, round(self.rng.gauss(mean, sd)))
        return " ".join(self.rng.choices(self.words, cum_weights=self.cumulative, k=count))


# ---------------------------------------------------------------- data in the real schemas


def write_data(folder: Path, words: list[str], scale: float) -> dict[str, int]:
    """The seven task files and the two perplexity texts under ``folder`` (local_files layout); docs per task."""
    text = Text(words, seed=0)
    rng = text.rng
    labels = list("ABCDE")

    def arc(prefix: str, index: int) -> dict[str, Any]:
        count = rng.choice([4] * 12 + [3, 5])
        names = labels[:count]
        return {"id": f"{prefix}_{index}", "question": text(f"{prefix}.question") + " ?",
                "choices": {"text": [text(f"{prefix}.choice") for _ in names], "label": names},
                "answerKey": rng.choice(names)}

    def hellaswag(index: int) -> dict[str, Any]:
        source = "wikihow" if rng.random() < 0.4 else "activitynet"
        ctx_a, ctx_b = text(f"hellaswag.ctx_a.{source}") + " .", text("hellaswag.ctx_b")
        return {"ind": index, "activity_label": text("hellaswag.label"), "ctx_a": ctx_a, "ctx_b": ctx_b,
                "ctx": f"{ctx_a} {ctx_b}", "endings": [text(f"hellaswag.ending.{source}") + " ." for _ in range(4)],
                "source_id": f"{source}~{index}", "split": "val", "split_type": "indomain",
                "label": str(rng.randrange(4))}

    makers = {
        "boolq": lambda i: {"question": text("boolq.question"), "passage": text("boolq.passage", 20) + " .",
                            "idx": i, "label": rng.randrange(2)},
        "piqa": lambda i: {"goal": text("piqa.goal") + " ?", "sol1": text("piqa.sol") + " .",
                           "sol2": text("piqa.sol") + " .", "label": rng.randrange(2)},
        "hellaswag": hellaswag,
        "winogrande": lambda i: {"sentence": f"{text('winogrande.before')} _ {text('winogrande.after')} .",
                                 "option1": text("winogrande.option"), "option2": text("winogrande.option"),
                                 "answer": rng.choice("12")},
        "arc_easy": lambda i: arc("arc_easy", i),
        "arc_challenge": lambda i: arc("arc_challenge", i),
        "openbookqa": lambda i: {"id": str(i), "question_stem": text("openbookqa.stem"),
                                 "choices": {"text": [text("openbookqa.choice") for _ in range(4)],
                                             "label": labels[:4]}, "answerKey": rng.choice(labels[:4])},
    }
    docs = {}
    for task, make in makers.items():
        docs[task] = max(4, round(FULL_DOCS[task] * scale))
        path = folder / zero_shot.TASK_SOURCES[task].data_file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(make(index)) + "\n" for index in range(docs[task])))
    wikitext = []
    for _ in range(max(20, round(WIKITEXT_ROWS * scale))):
        draw = rng.random()
        wikitext.append("" if draw < 0.35 else f" = {text('hellaswag.label')} = \n" if draw < 0.43 else
                        f" {text('wikitext.paragraph')} . \n")
    ptb = [text("ptb.sentence") for _ in range(max(20, round(PTB_ROWS * scale)))]
    for name, field, rows in (("wikitext2/test.jsonl", "text", wikitext), ("ptb/validation.jsonl", "sentence", ptb)):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("".join(json.dumps({field: row}) + "\n" for row in rows))
    return docs


# ---------------------------------------------------------------- model


def build_model(tiny: bool, vocab_size: int, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2) if tiny else
             dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8))
    config = LlamaConfig(**shape, vocab_size=vocab_size, max_position_embeddings=8192, rope_theta=500000.0,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


# ---------------------------------------------------------------- runs


def build_all(data: DataSettings, tokenizer: Any) -> tuple[float, dict[str, int], dict[str, tuple[float, float]]]:
    """Seconds lm-eval takes to load the full sets and build every request; requests per task; the mean
    context and continuation lengths in tokens per task (to compare with the real data's)."""
    started = time.perf_counter()
    with zero_shot.lm_eval_session(), zero_shot.offline_hub():
        tasks = zero_shot.task_manager_for(data, ZERO_SHOT_TASKS).load(list(ZERO_SHOT_TASKS))["tasks"]
        for task in tasks.values():
            task.build_all_requests(limit=None)
    seconds = time.perf_counter() - started
    lengths = {}
    for name, task in tasks.items():
        contexts, continuations = zip(*(instance.args for instance in task.instances))
        lengths[name] = tuple(sum(map(len, tokenizer(list(texts), add_special_tokens=False)["input_ids"]))
                              / len(texts) for texts in (contexts, continuations))
    return seconds, {name: len(task.instances) for name, task in tasks.items()}, lengths


def run_backend(lm: Any, data: DataSettings, docs: int) -> dict[str, Any]:
    """Each task as its own lm-eval run on its first ``docs`` docs: scoring time, requests, scores, samples."""
    import lm_eval.evaluator

    spent = {"seconds": 0.0, "requests": 0}
    scoring = lm.loglikelihood

    def timed(requests: list[Any], **kwargs: Any) -> list[tuple[float, bool]]:
        started = time.perf_counter()
        answers = scoring(requests, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        spent["seconds"] += time.perf_counter() - started
        spent["requests"] += len(requests)
        return answers

    lm.loglikelihood = timed  # lm-eval looks the method up on the instance
    per_task = {}
    for task in ZERO_SHOT_TASKS:
        before, started = dict(spent), time.perf_counter()
        with zero_shot.lm_eval_session(), zero_shot.offline_hub():
            results = lm_eval.evaluator.simple_evaluate(
                model=lm, tasks=[task], num_fewshot=0, limit=docs or None, log_samples=True,
                task_manager=zero_shot.task_manager_for(data, ZERO_SHOT_TASKS))
        metrics = results["results"][task]
        per_task[task] = {"wall_s": time.perf_counter() - started,
                          "scoring_s": spent["seconds"] - before["seconds"],
                          "requests": spent["requests"] - before["requests"],
                          "acc": metrics.get("acc,none"), "acc_norm": metrics.get("acc_norm,none"),
                          "samples": {sample["doc_id"]: sample for sample in results["samples"][task]}}
    return per_task


def compare(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """Per task on the docs both ran: identical scores?, docs whose prediction differs, max |Δ log-likelihood|."""
    report = {}
    for task in ZERO_SHOT_TASKS:
        common = sorted(ours[task]["samples"].keys() & theirs[task]["samples"].keys())
        differing, worst, flags = 0, 0.0, 0
        sums = {"ours": [0.0, 0.0], "theirs": [0.0, 0.0]}
        for doc in common:
            a, b = ours[task]["samples"][doc], theirs[task]["samples"][doc]
            for name, sample in (("ours", a), ("theirs", b)):
                sums[name][0] += sample["acc"]
                sums[name][1] += sample.get("acc_norm", sample["acc"])
            differing += (a["acc"], a.get("acc_norm")) != (b["acc"], b.get("acc_norm"))
            for (x, greedy_x), (y, greedy_y) in zip((r[0] for r in a["resps"]), (r[0] for r in b["resps"])):
                worst, flags = max(worst, abs(x - y)), flags + (greedy_x != greedy_y)
        report[task] = {"docs": len(common), "identical": sums["ours"] == sums["theirs"],
                        "docs_differing": differing, "max_abs_loglik_diff": worst, "greedy_flag_diffs": flags,
                        "acc": [s[0] / max(1, len(common)) for s in sums.values()],
                        "acc_norm": [s[1] / max(1, len(common)) for s in sums.values()]}
    return report


def perplexity_times(model: torch.nn.Module, tokenizer: Any, folder: Path, batch_sizes: list[int],
                     device: torch.device) -> list[dict[str, Any]]:
    rows = []
    texts = {name: [json.loads(line)[field] for line in (folder / path).read_text().splitlines()]
             for name, path, field in (("wikitext2", "wikitext2/test.jsonl", "text"),
                                       ("ptb", "ptb/validation.jsonl", "sentence"))}
    for batch_size in batch_sizes:
        for name, rows_of_text in texts.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            started = time.perf_counter()
            result = compute_perplexity(model, tokenizer, rows_of_text, 128, batch_size, False, device)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            rows.append({"dataset": name, "batch_size": batch_size, "seconds": time.perf_counter() - started,
                         "tokens": result["n_text_tokens"], "ppl": result["ppl"]})
    return rows


def summarize(name: str, per_task: dict[str, Any], full_requests: dict[str, int], build_s: float) -> dict[str, Any]:
    """Full sets run: the measured wall time of the seven lm-eval runs. Subsampled: the measured scoring per
    task, extrapolated to the full set by requests, plus lm-eval's full build time."""
    requests = sum(entry["requests"] for entry in per_task.values())
    scoring = sum(entry["scoring_s"] for entry in per_task.values())
    wall = sum(entry["wall_s"] for entry in per_task.values())
    full_scoring = sum(entry["scoring_s"] * full_requests[task] / max(1, entry["requests"])
                       for task, entry in per_task.items())
    measured = requests == sum(full_requests.values())
    return {"run": name, "requests": requests, "scoring_s": scoring, "requests_per_s": requests / scoring,
            "wall_s": wall, "full_scoring_s": full_scoring, "measured_full": measured,
            "full_tasks_s": wall if measured else build_s + full_scoring,
            "per_task_requests_per_s": {task: entry["requests"] / entry["scoring_s"]
                                        for task, entry in per_task.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model and data at 5%% of the real sizes (CPU)")
    parser.add_argument("--docs-per-task", type=int, default=0,
                        help="docs per task timed for batch 64 and ours (0: the full sets, measured end to end)")
    parser.add_argument("--b1-docs-per-task", type=int, default=20, help="docs per task timed for HF batch 1")
    parser.add_argument("--hf-batch-size", type=int, default=64)
    parser.add_argument("--ppl-batch-sizes", default="64,8", help="perplexity batch sizes to time (64: our default)")
    parser.add_argument("--no-fp32-reference", action="store_true", help="skip HF with softmax_dtype=float32")
    parser.add_argument("--runs", default="all",
                        help="which runs, comma-separated names from prunetune, hf@N, hf@1, hf@N/fp32 (N: "
                             "--hf-batch-size; hf@N is the reference for the comparisons); all: every one")
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("lm_eval", "transformers", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.tiny:
        args.docs_per_task, args.b1_docs_per_task = min(args.docs_per_task, 12), min(args.b1_docs_per_task, 4)
        torch.set_num_threads(1)  # a tiny model on a busy 2-core box runs faster on one thread
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from lm_eval.models.huggingface import HFLM

    started = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="eval_throughput-"))
    vocab_size = 4096 if args.tiny else 128256
    tokenizer, words = build_tokenizer(vocab_size, folder / "tokenizer")
    docs = write_data(folder / "eval", words, 0.05 if args.tiny else 1.0)
    data = DataSettings(eval_data_dir=str(folder / "eval"))
    log.info("data in %s: %s docs (%.1fs)", folder, docs, time.perf_counter() - started)
    model = build_model(args.tiny, len(tokenizer), device)
    with torch.no_grad():  # first kernels and allocator growth, outside every timing
        model(torch.randint(10, vocab_size, (8, 256), device=device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    log.info("model: %.2fB parameters, %s, %s (ready at %.1fs)", sum(p.numel() for p in model.parameters()) / 1e9,
             next(model.parameters()).dtype, device, time.perf_counter() - started)

    build_s, full_requests, lengths = build_all(data, tokenizer)
    log.info("lm-eval build of the full sets: %.1fs, %d requests %s", build_s, sum(full_requests.values()),
             full_requests)
    log.info("mean context / continuation tokens per request: %s",
             ", ".join(f"{task} {context:.0f}/{continuation:.1f}" for task, (context, continuation) in lengths.items()))
    runs: dict[str, dict[str, Any]] = {}
    plan = [("prunetune", lambda: PruneTuneLM(pretrained=model, tokenizer=tokenizer, batch_size=args.hf_batch_size),
             args.docs_per_task),
            (f"hf@{args.hf_batch_size}", lambda: HFLM(pretrained=model, tokenizer=tokenizer,
                                                      batch_size=args.hf_batch_size), args.docs_per_task),
            ("hf@1", lambda: HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1), args.b1_docs_per_task)]
    if not args.no_fp32_reference:
        plan.append((f"hf@{args.hf_batch_size}/fp32", lambda: HFLM(pretrained=model, tokenizer=tokenizer,
                                                                   batch_size=args.hf_batch_size,
                                                                   softmax_dtype=torch.float32),
                     args.docs_per_task))
    if args.runs != "all":
        plan = [entry for entry in plan if entry[0] in args.runs.split(",")]
    fallback = None
    for name, make, docs_per_task in plan:
        run_started = time.perf_counter()
        lm = make()
        runs[name] = run_backend(lm, data, docs_per_task)
        fallback = fallback or getattr(lm, "fallback", None)
        log.info("%s: %d docs per task in %.1fs", name, docs_per_task, time.perf_counter() - run_started)
    ppl = perplexity_times(model, tokenizer, folder / "eval",
                           [int(size) for size in args.ppl_batch_sizes.split(",")], device)

    hf_name = f"hf@{args.hf_batch_size}"
    summaries = [summarize(name, per_task, full_requests, build_s) for name, per_task in runs.items()]
    reference = next((summary for summary in summaries if summary["run"] == hf_name), summaries[0])
    print(f"\nDevice: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}; torch {torch.__version__}; "
          f"model {'tiny' if args.tiny else '6.7B pruned-Llama-3 shape'}; full sets: "
          f"{sum(full_requests.values())} requests; lm-eval build of the full sets {build_s:.1f}s")
    print("\n| run | docs/task | requests timed | scoring s | requests/s | est. full 7 tasks (min, incl. build) "
          "| speedup vs " + hf_name + " |\n|---|---|---|---|---|---|---|")
    for summary in summaries:
        docs_per_task = args.b1_docs_per_task if summary["run"] == "hf@1" else args.docs_per_task
        how = "measured" if summary["measured_full"] else "extrapolated"
        print(f"| {summary['run']} | {docs_per_task or 'all'} | {summary['requests']} | {summary['scoring_s']:.1f} | "
              f"{summary['requests_per_s']:.0f} | {summary['full_tasks_s'] / 60:.2f} ({how}) | "
              f"{reference['full_tasks_s'] / summary['full_tasks_s']:.2f}x |")
    print("\nrequests/s per task: " + "; ".join(
        f"{summary['run']}: " + ", ".join(f"{task} {rate:.0f}" for task, rate in summary["per_task_requests_per_s"]
                                          .items()) for summary in summaries))
    print("\n| perplexity | batch | tokens | seconds | ppl |\n|---|---|---|---|---|")
    for row in ppl:
        print(f"| {row['dataset']} | {row['batch_size']} | {row['tokens']} | {row['seconds']:.1f} | {row['ppl']:.1f} |")
    sizes = {row["batch_size"] for row in ppl}
    ppl_size = EvaluateSettings.ppl_batch_size if EvaluateSettings.ppl_batch_size in sizes else min(sizes)
    ppl_seconds = sum(row["seconds"] for row in ppl if row["batch_size"] == ppl_size)
    ours = next((summary for summary in summaries if summary["run"] == "prunetune"), reference)
    total_ours, total_hf = ours["full_tasks_s"] + ppl_seconds, reference["full_tasks_s"] + ppl_seconds
    print(f"\nFull evaluation of one model (7 tasks incl. build + both PPLs at batch {ppl_size}, {ppl_seconds:.1f}s): "
          f"{hf_name} {total_hf / 60:.2f} min, prunetune {total_ours / 60:.2f} min: {total_hf / total_ours:.2f}x "
          f"(target: >= 2x and <= 1.5 min)")
    if fallback:
        print(f"WARNING: prunetune fell back to HFLM's scoring: {fallback}")

    checks = {name: compare(runs["prunetune"], runs[name]) for name in runs if name != "prunetune" and
              "prunetune" in runs}
    if "hf@1" in runs and hf_name in runs:
        checks["hf@1 vs " + hf_name] = compare(runs["hf@1"], runs[hf_name])
    print("\n| comparison | task | docs | scores identical | docs differing | max abs Δ loglik | greedy flags "
          "differing | acc (a / b) | acc_norm (a / b) |\n|---|---|---|---|---|---|---|---|---|")
    for label, report in checks.items():
        label = label if " vs " in label else f"prunetune vs {label}"
        for task, entry in report.items():
            print(f"| {label} | {task} | {entry['docs']} | {'yes' if entry['identical'] else 'NO'} | "
                  f"{entry['docs_differing']} | {entry['max_abs_loglik_diff']:.3g} | {entry['greedy_flag_diffs']} | "
                  f"{entry['acc'][0]:.4f} / {entry['acc'][1]:.4f} | "
                  f"{entry['acc_norm'][0]:.4f} / {entry['acc_norm'][1]:.4f} |")
    print()
    for label, report in checks.items():
        label = label if " vs " in label else f"prunetune vs {label}"
        differing = [f"{task} ({entry['docs_differing']} docs)" for task, entry in report.items()
                     if not entry["identical"]]
        print(f"{label}: " + ("acc and acc_norm identical on all seven tasks" if not differing else
                              "scores differ on " + ", ".join(differing)))
    print(f"\ntotal wall time of this script: {time.perf_counter() - started:.0f}s")
    if args.json:
        for per_task in runs.values():
            for entry in per_task.values():
                entry.pop("samples")
        args.json.write_text(json.dumps({"build_s": build_s, "full_requests": full_requests, "lengths": lengths,
                                         "runs": runs,
                                         "summaries": summaries, "ppl": ppl, "checks": checks,
                                         "fallback": fallback}, indent=1))


if __name__ == "__main__":
    main()
