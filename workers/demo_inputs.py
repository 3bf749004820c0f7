"""The demo study's inputs, made offline: a locally trained tokenizer, a small pruning search over tiny
random-init candidates, alpaca-format training data and evaluation files in the real datasets' schemas.

The search has three candidates per model, each with its own (LLM-Pruner-style) pruning parameters and
MLP width, written under ``<inputs>/candidates/<Model>/<candidate>/`` and listed in
``<inputs>/pruning_search.jsonl``. Their ACC and PPL are SYNTHETIC stand-ins chosen so that each
selection is unambiguous; nothing measured them, and every row says so in ``metrics_source``.
``launch.py select`` then picks best_acc and best_ppl per model, as in a real study. Llama's best_ppl
candidate is an LLM-Pruner-style pickle whose layers have non-uniform MLP widths. The models stand in
for real pruned checkpoints only in shape and format: Llama, Qwen2 and Mistral architectures (the
-Instruct ones share an architecture with another seed). Everything here is deterministic for a seed.
"""
from __future__ import annotations

import json
import logging
import random
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers.utils import logging as transformers_logging
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM)

from jobs.config import StudyConfig
from jobs.state import atomic_write_json, atomic_write_text, is_done, mark_done
from workers.eval_data_demo import write_demo_eval_data

log = logging.getLogger(__name__)

ARCHITECTURES = {
    "Llama": (LlamaConfig, LlamaForCausalLM),
    "Qwen": (Qwen2Config, Qwen2ForCausalLM),
    "Mistral": (MistralConfig, MistralForCausalLM),
}
# Three candidates per model. The first two win best_acc and best_ppl by their synthetic metrics; the
# third is dominated (the runner-up of both). ``offset`` keeps each candidate's metrics distinct per model.
CANDIDATES = (
    {"suffix": "r20-taylor-param_first", "width": 160, "acc": 0.5946, "ppl": 15.82,
     "params": {"pruning_ratio": 0.20, "pruner_type": "taylor", "taylor": "param_first",
                "block_mlp_layer_start": 4, "block_mlp_layer_end": 30}},
    {"suffix": "r25-taylor-param_mix", "width": 128, "acc": 0.5731, "ppl": 13.39,
     "params": {"pruning_ratio": 0.25, "pruner_type": "taylor", "taylor": "param_mix",
                "block_mlp_layer_start": 3, "block_mlp_layer_end": 31}},
    {"suffix": "r35-l2", "width": 96, "acc": 0.5412, "ppl": 19.05,
     "params": {"pruning_ratio": 0.35, "pruner_type": "l2", "taylor": None,
                "block_mlp_layer_start": 4, "block_mlp_layer_end": 30}},
)
PICKLED = ("Llama", 1)  # Llama's second candidate (its best_ppl) is written as an LLM-Pruner pickle
SYNTHETIC = "synthetic stand-in written by launch.py demo; not measured"
SEARCH_FILE = "pruning_search.jsonl"
VOCAB_SIZE = 1024

SUBJECTS = ["the cat", "a farmer", "the river", "my teacher", "the old car", "a small bird", "the city",
            "our team", "the engineer", "a quiet child", "the market", "the storm"]
VERBS = ["sees", "builds", "carries", "paints", "finds", "follows", "moves", "opens", "watches", "helps"]
OBJECTS = ["a red box", "the bridge", "green apples", "the long road", "a heavy stone", "the garden",
           "two letters", "the blue door", "a warm coat", "the window"]
COLOURS = ["red", "green", "blue", "yellow", "white", "black"]


def _sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"


def alpaca_examples(count: int, seed: int) -> list[dict[str, str]]:
    """Instruction data with learnable structure, with and without an input field."""
    rng = random.Random(seed)
    examples = []
    for index in range(count):
        kind = index % 4
        if kind == 0:
            words = [rng.choice(COLOURS) for _ in range(rng.randint(2, 5))]
            examples.append({"instruction": "Repeat the colours in the same order.", "input": " ".join(words),
                             "output": " ".join(words) + "."})
        elif kind == 1:
            sentence = _sentence(rng)
            examples.append({"instruction": "Write the sentence in capital letters.", "input": sentence,
                             "output": sentence.upper() + "."})
        elif kind == 2:
            subject = rng.choice(SUBJECTS)
            examples.append({"instruction": f"Write a short sentence about {subject}.", "input": "",
                             "output": f"{subject.capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."})
        else:
            count_words = rng.randint(1, 6)
            examples.append({"instruction": "How many words are in the input?",
                             "input": " ".join(rng.choice(COLOURS) for _ in range(count_words)),
                             "output": f"There are {count_words} words."})
    return examples


def train_tokenizer(corpus_files: list[Path], folder: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here, with Llama-like special tokens."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train([str(path) for path in corpus_files], trainer)
    # Like Llama's tokenizer: BOS first when special tokens are added.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>", pad_token="<pad>", model_max_length=2048)
    wrapped.save_pretrained(folder)
    return wrapped


def build_model(model_name: str, width: int, tokenizer: PreTrainedTokenizerFast, seed: int) -> torch.nn.Module:
    family = model_name.removesuffix("-Instruct")
    config_class, model_class = ARCHITECTURES[family]
    config = config_class(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=width,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=512, tie_word_embeddings=False,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return model_class(config)


def prune_unevenly(model: torch.nn.Module, widths: list[int]) -> None:
    """Shrink each layer's MLP to its own width, as LLM-Pruner's structured pruning leaves a model."""
    for layer, width in zip(model.model.layers, widths):
        mlp = layer.mlp
        mlp.gate_proj.weight = torch.nn.Parameter(mlp.gate_proj.weight[:width].clone())
        mlp.up_proj.weight = torch.nn.Parameter(mlp.up_proj.weight[:width].clone())
        mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight[:, :width].clone())
        for linear, (outputs, inputs) in ((mlp.gate_proj, (width, None)), (mlp.up_proj, (width, None)),
                                          (mlp.down_proj, (None, width))):
            linear.out_features = outputs or linear.out_features
            linear.in_features = inputs or linear.in_features


def generate_demo_inputs(config: StudyConfig, seed: int = 0) -> Path:
    """Everything the demo study needs: its inputs and search (``write_demo_search``), then ``select``."""
    search = write_demo_search(config, seed)
    from jobs.select import select
    select(config, search, mode="symlink")
    return search


def write_demo_search(config: StudyConfig, seed: int = 0) -> Path:
    """Write the demo's data, candidates and search file; a folder already marked complete is left as it is."""
    inputs = Path(config.data.train_path).parent
    search = inputs / SEARCH_FILE
    if is_done(inputs) and search.is_file():
        log.info("demo inputs already in %s", inputs)
        return search
    inputs.mkdir(parents=True, exist_ok=True)
    transformers_logging.disable_progress_bar()
    train_path = Path(config.data.train_path)
    atomic_write_json(train_path, alpaca_examples(256, seed))
    write_demo_eval_data(Path(config.data.eval_data_dir), seed=seed)
    with tempfile.TemporaryDirectory() as scratch:
        corpus = Path(scratch) / "corpus.txt"
        texts = [" ".join(example.values()) for example in json.loads(train_path.read_text())]
        texts += [line for path in sorted(Path(config.data.eval_data_dir).rglob("*.jsonl"))
                  for line in path.read_text().splitlines()]
        corpus.write_text("\n".join(texts))
        tokenizer = train_tokenizer([corpus], inputs / "tokenizer")
    rows = []
    for model_number, model_name in enumerate(config.study.models):
        for number, candidate in enumerate(CANDIDATES):
            name = f"{model_name}-{candidate['suffix']}"
            folder = inputs / "candidates" / model_name / name
            folder.mkdir(parents=True, exist_ok=True)
            # The first two candidates get the seeds the demo's best_acc/best_ppl models always had.
            model = build_model(model_name, candidate["width"], tokenizer,
                                seed=seed * 1000 + 2 * model_number + number if number < 2 else seed * 1000 + 500
                                + model_number)
            if (model_name, number) == PICKLED:
                prune_unevenly(model, [candidate["width"], candidate["width"] // 2])
                torch.save({"model": model, "tokenizer": tokenizer}, folder / "pytorch_model.bin")
            else:
                model.save_pretrained(folder)
                tokenizer.save_pretrained(folder)
            offset = 0.0021 * model_number  # distinct, still synthetic, numbers per model
            rows.append({"model": model_name, "candidate": name, "path": str(folder.relative_to(inputs)),
                         "params": candidate["params"], "acc": round(candidate["acc"] - offset, 4),
                         "ppl": round(candidate["ppl"] + 10 * offset, 2), "metrics_source": SYNTHETIC})
            log.info("demo candidate %s -> %s", name, folder)
    atomic_write_text(search, "".join(json.dumps(row) + "\n" for row in rows))
    atomic_write_text(inputs / "README.txt", "Generated by `python launch.py demo`; safe to delete. The ACC and PPL "
                      f"in {SEARCH_FILE} are synthetic stand-ins, not measurements.\n")
    mark_done(inputs, [train_path.name, "README.txt", SEARCH_FILE])
    return search
