"""Recognise a pruned checkpoint's format from its files alone (login node: no weights are loaded)."""
from __future__ import annotations

from pathlib import Path

from jobs.errors import InputError

HF_MARKERS = ("config.json",)
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")
# LLM-Pruner saves torch.save({"model": model, "tokenizer": tokenizer}, ".../pytorch_model.bin").
PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "pruned_model.bin")


def find_checkpoint(path: Path) -> tuple[str, Path]:
    """Return ("hf", folder) or ("pickle", file); raise InputError saying what is wrong and how to fix it."""
    if path.is_file():
        return "pickle", path
    if not path.exists():
        raise InputError(f"pruned model {path} does not exist; put the checkpoint there or set "
                         "study.pruned_model_path in the config")
    if not path.is_dir():
        raise InputError(f"pruned model {path} is neither a folder nor a file")
    names = {child.name for child in path.iterdir()}
    if not names - {"selection_info.json", "baseline_evaluation"}:
        raise InputError(f"pruned model folder {path} is empty; copy or link the checkpoint there "
                         "(a Hugging Face folder, or an LLM-Pruner pytorch_model.bin)")
    if "config.json" in names:
        if not names & set(HF_WEIGHTS):
            raise InputError(f"{path} has config.json but no weights ({', '.join(HF_WEIGHTS)}); "
                             "save the model with save_pretrained")
        return "hf", path
    for name in PICKLE_NAMES:
        if name in names:
            return "pickle", path / name
    raise InputError(f"{path} is neither a Hugging Face folder (config.json + weights) nor an LLM-Pruner "
                     f"pickle ({', '.join(PICKLE_NAMES)}); point study.pruned_model_path at the checkpoint")
