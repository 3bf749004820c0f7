"""The demo study's inputs, made offline: a locally trained tokenizer, 12 tiny random-init pruned
models, alpaca-format training data and evaluation files in the real datasets' schemas.

The models stand in for real pruned checkpoints only in shape and format: Llama, Qwen2 and Mistral
architectures (the -Instruct ones share an architecture with another seed), best_acc and best_ppl with
different MLP widths as pruning leaves them, and one LLM-Pruner-style pickle whose layers have
non-uniform MLP widths. Everything here is deterministic for a given seed.
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
from jobs.study import Pair, StudyPaths, select_pairs
from workers.eval_data_demo import write_demo_eval_data

log = logging.getLogger(__name__)

ARCHITECTURES = {
    "Llama": (LlamaConfig, LlamaForCausalLM),
    "Qwen": (Qwen2Config, Qwen2ForCausalLM),
    "Mistral": (MistralConfig, MistralForCausalLM),
}
# best_acc keeps more of the MLP than best_ppl in this stand-in; the numbers only need to differ.
MLP_WIDTH = {"best_acc": 160, "best_ppl": 128}
PICKLED_PAIR = Pair("Llama", "best_ppl")
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


def build_model(pair: Pair, tokenizer: PreTrainedTokenizerFast, seed: int) -> torch.nn.Module:
    family = pair.model.removesuffix("-Instruct")
    config_class, model_class = ARCHITECTURES[family]
    config = config_class(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=MLP_WIDTH[pair.config],
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


def generate_demo_inputs(config: StudyConfig, seed: int = 0) -> None:
    """Write every input of the demo study; a folder already marked complete is left as it is."""
    inputs = Path(config.data.train_path).parent
    if is_done(inputs):
        log.info("demo inputs already in %s", inputs)
        return
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
    paths = StudyPaths(config)
    for number, pair in enumerate(select_pairs(config)):
        folder = paths.pruned_model(pair)
        model = build_model(pair, tokenizer, seed=seed * 1000 + number)
        folder.mkdir(parents=True, exist_ok=True)
        if pair == PICKLED_PAIR:
            prune_unevenly(model, [MLP_WIDTH[pair.config], MLP_WIDTH[pair.config] // 2])
            torch.save({"model": model, "tokenizer": tokenizer}, folder / "pytorch_model.bin")
        else:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        atomic_write_json(folder / "selection_info.json", {
            "model": pair.model, "pruning_config": pair.config,
            "source": "demo stand-in: random-init weights generated by launch.py demo, not selected from a search",
            "format": "llm-pruner pickle" if pair == PICKLED_PAIR else "huggingface",
            "parameters": sum(parameter.numel() for parameter in model.parameters())})
        log.info("demo model %s -> %s", pair.label, folder)
    atomic_write_text(inputs / "README.txt", "Generated by `python launch.py demo`; safe to delete.\n")
    mark_done(inputs, [train_path.name, "README.txt"])
