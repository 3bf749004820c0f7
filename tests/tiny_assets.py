"""Tiny, real model assets built offline for tests: a byte-level BPE tokenizer and a 2-layer Llama.

Both are made from scratch in a few hundred milliseconds, so tests exercise the real tokenizer and model
code paths (BOS handling, padding, LoRA on real projections) without any download.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"

# Enough text for a few hundred BPE merges: the Alpaca template's own words plus everyday sentences.
CORPUS = [
    "Below is an instruction that describes a task, paired with an input that provides further context.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n",
    "Add the two numbers and give the sum. Repeat the word. Name the colour of the sky.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "Pruned language models recover accuracy after a short LoRA finetune on instruction data.",
    "one two three four five six seven eight nine ten eleven twelve red green blue yellow",
    "What is the capital of France? Paris is the capital of France. Translate this sentence.",
]


def build_tiny_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (vocab <= 1000) that prepends BOS like Llama's, save it to ``folder``."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=[UNK, BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                      unk_token=UNK, model_max_length=512)
    folder.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(folder)
    return wrapped


def build_tiny_llama(folder: Path, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> Path:
    """Save a random-init 2-layer Llama (hidden 64) and ``tokenizer`` as one Hugging Face folder."""
    import torch  # imported here so tokenizer-only tests skip the model code's import time
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
