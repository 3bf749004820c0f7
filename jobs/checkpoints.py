"""Recognise a pruned checkpoint's format from its files alone (login node: no weights are loaded).

Three formats:

* ``hf``: a Hugging Face folder (``config.json`` + weights), loaded with ``from_pretrained``.
* ``pickle``: an LLM-Pruner ``torch.save({"model": model, "tokenizer": tokenizer})`` file. Unpickling it runs
  code from it, so it loads only with the per-model opt-in ``study.allow_pickle``.
* ``converted``: what ``launch.py convert`` made of a pickle (``workers/convert.py``): ``model.safetensors``,
  ``config.json``, the tokenizer and ``pruned_shapes.json`` (every tensor's shape, since pruning leaves
  layers of different widths that ``config.json`` cannot describe). It lives in ``converted/`` beside the
  pickle, is preferred over the pickle, and loads without unpickling anything.
"""
from __future__ import annotations

import json
import shlex
import struct
from pathlib import Path
from typing import Any

from jobs.errors import InputError
from jobs.state import is_done, read_json

HF_MARKERS = ("config.json",)
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")
# LLM-Pruner saves torch.save({"model": model, "tokenizer": tokenizer}, ".../pytorch_model.bin").
PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "pruned_model.bin")
CONVERTED_DIR = "converted"
SHAPES_FILE = "pruned_shapes.json"
CONVERTED_FILES = ("config.json", "model.safetensors", SHAPES_FILE)


def convert_command(label: str = "", path: Path | None = None) -> str:
    """The command that converts a pickle once into a folder that loads without unpickling."""
    model, _, config = label.partition("/")
    which = f"--model {model} --config {config}" if config else f"--path {shlex.quote(str(path or '<pickle>'))}"
    return f"python launch.py convert {which} --allow-pickle"


def converted_dir(pickle_file: Path) -> Path:
    """Where ``launch.py convert`` puts the safe copy of a pickle: ``converted/`` in the pickle's folder."""
    return pickle_file.parent / CONVERTED_DIR


def find_checkpoint(path: Path) -> tuple[str, Path]:
    """Return ("hf", folder), ("converted", folder) or ("pickle", file); raise InputError saying what is wrong
    and how to fix it. A complete conversion of the pickle wins over the pickle itself."""
    if path.is_file():
        return _prefer_converted(path)
    if not path.exists():
        raise InputError(f"pruned model {path} does not exist; put the checkpoint there or set "
                         "study.pruned_model_path in the config")
    if not path.is_dir():
        raise InputError(f"pruned model {path} is neither a folder nor a file")
    names = {child.name for child in path.iterdir()}
    if not names - {"selection_info.json", "baseline_evaluation"}:
        raise InputError(f"pruned model folder {path} is empty; copy or link the checkpoint there "
                         "(a Hugging Face folder, or an LLM-Pruner pytorch_model.bin)")
    if SHAPES_FILE in names:
        missing = [name for name in CONVERTED_FILES if name not in names]
        if missing:
            raise InputError(f"{path} is a converted checkpoint without {', '.join(missing)}; run "
                             f"`{convert_command()}` on its pickle again")
        return "converted", path
    if "config.json" in names:
        if not names & set(HF_WEIGHTS):
            raise InputError(f"{path} has config.json but no weights ({', '.join(HF_WEIGHTS)}); "
                             "save the model with save_pretrained")
        return "hf", path
    for name in PICKLE_NAMES:
        if name in names:
            return _prefer_converted(path / name)
    raise InputError(f"{path} is neither a Hugging Face folder (config.json + weights) nor an LLM-Pruner "
                     f"pickle ({', '.join(PICKLE_NAMES)}); point study.pruned_model_path at the checkpoint")


def _prefer_converted(pickle_file: Path) -> tuple[str, Path]:
    folder = converted_dir(pickle_file)
    if not is_done(folder):
        return "pickle", pickle_file
    source = read_json(folder / "DONE.json").get("source", {})
    if source.get("name") != pickle_file.name:
        return "pickle", pickle_file  # the conversion of another pickle in the same folder
    if source.get("bytes") != pickle_file.stat().st_size:
        raise InputError(f"{folder} was converted from an older {pickle_file.name} (the pickle changed since); "
                         f"delete {folder} and run `{convert_command(path=pickle_file)}` again")
    return "converted", folder


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """{tensor name: shape} from a safetensors file's header, without reading the tensors."""
    with path.open("rb") as stream:
        (size,) = struct.unpack("<Q", stream.read(8))
        if size > 100_000_000:
            raise ValueError(f"{path} is not a safetensors file")
        header: dict[str, Any] = json.loads(stream.read(size))
    return {name: entry["shape"] for name, entry in header.items() if name != "__metadata__"}


def model_shapes(kind: str, location: Path) -> dict[str, list[int]] | None:
    """Every weight's shape from the checkpoint's headers; None when they cannot be read without unpickling."""
    try:
        if kind == "converted":
            return {name: list(shape) for name, shape in read_json(location / SHAPES_FILE)["tensors"].items()}
        if kind == "hf":
            index = location / "model.safetensors.index.json"
            if index.is_file():
                shards = sorted(set(read_json(index)["weight_map"].values()))
                return {name: shape for shard in shards for name, shape in safetensors_shapes(location / shard).items()}
            if (location / "model.safetensors").is_file():
                return safetensors_shapes(location / "model.safetensors")
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None
    return None


def adapter_mismatch(adapter_dir: Path, base: dict[str, list[int]]) -> str:
    """'' when every LoRA matrix of the adapter fits a weight of the base model, else the first misfit.

    peft names ``base_model.model.<module>.lora_A.weight`` ([rank, in_features]) and ``...lora_B.weight``
    ([out_features, rank]); the base's ``<module>.weight`` is [out_features, in_features].
    """
    weights = adapter_dir / "adapter_model.safetensors"
    try:
        adapter = safetensors_shapes(weights)
    except (OSError, ValueError, struct.error) as error:
        return f"{weights} cannot be read ({error})"
    for name, shape in sorted(adapter.items()):
        for side, axis in ((".lora_A.weight", 1), (".lora_B.weight", 0)):
            if not name.endswith(side):
                continue
            module = name.removeprefix("base_model.model.").removesuffix(side)
            target = base.get(f"{module}.weight")
            if target is None:
                return f"the adapter has {module}, which the base model lacks"
            if len(target) != 2 or shape[axis] != target[axis]:
                what = "in_features" if axis == 1 else "out_features"
                return f"{module}: the adapter's {what} is {shape[axis]}, the base model's weight is {target}"
    return ""
