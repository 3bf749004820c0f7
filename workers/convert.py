"""One-time conversion of an LLM-Pruner pickle into a folder that loads without unpickling anything.

    python launch.py convert --model Llama --config best_ppl --allow-pickle    # or: --path <pickle> --allow-pickle

LLM-Pruner saves ``torch.save({"model": model, "tokenizer": tokenizer})``: loading that runs code from the
file, and it breaks when the libraries change (a pickle made with transformers 4.x refers to
``_compute_default_rope_parameters``, which 5.x removed). This unpickles it once, with the user's opt-in,
and writes ``converted/`` beside the pickle (``jobs.checkpoints.converted_dir``):

* ``model.safetensors``: the state dict (shared tensors once);
* ``config.json``: the model's config, with its architecture;
* ``pruned_shapes.json``: every tensor's shape and a per-layer summary, since structured pruning leaves
  layers of different widths that ``config.json`` cannot describe;
* the tokenizer's files; ``DONE.json`` last, recording the source pickle's name, size and SHA-256.

``workers.modelio.load_converted`` rebuilds the model from ``config.json``, resizes each layer to the
recorded shapes and loads the tensors from safetensors: no pickle, and no dependence on the classes and
functions the pickle referred to. The folder is written under a temporary name and renamed, so a crash
never leaves a half conversion that looks complete.

Classes or functions the pickle names that this environment lacks become inert stand-ins (with a
warning): only the tensors, the config and the tokenizer are kept, so the rope helper transformers 5
dropped does not stop the conversion.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import tempfile
import types
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model

from jobs.checkpoints import SHAPES_FILE, converted_dir
from jobs.errors import InputError
from jobs.state import is_done, mark_done, read_json, sha256_of

log = logging.getLogger(__name__)


class _Missing:
    """Stand-in for a class or function the pickle names but this environment lacks; never used for compute."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{type(self).__qualname__} is a stand-in for something missing from this environment")


class TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (AttributeError, ImportError) as error:
            log.warning("the pickle refers to %s.%s, which this environment lacks (%s); kept as an inert stand-in "
                        "(only tensors, config and tokenizer are converted)", module, name, error)
            return type(name, (_Missing,), {"__module__": module, "__qualname__": name})


# torch.load takes a pickle "module"; it subclasses this one's Unpickler for its zip format.
_tolerant_pickle = types.ModuleType("prunetune_tolerant_pickle")
_tolerant_pickle.Unpickler = TolerantUnpickler  # type: ignore[attr-defined]
_tolerant_pickle.load = lambda file, **kwargs: TolerantUnpickler(file, **kwargs).load()  # type: ignore[attr-defined]
_tolerant_pickle.__dict__.update({name: getattr(pickle, name) for name in ("dumps", "loads", "HIGHEST_PROTOCOL")})


def unpickle_checkpoint(pickle_file: Path) -> tuple[torch.nn.Module, Any]:
    """The (model, tokenizer) of an LLM-Pruner pickle. Runs code from the file: call only with the opt-in."""
    try:
        checkpoint = torch.load(pickle_file, map_location="cpu", weights_only=False, pickle_module=_tolerant_pickle)
    except Exception as error:  # torch.load raises anything the pickle's code raises
        raise InputError(f"{pickle_file} does not unpickle ({type(error).__name__}: {str(error).splitlines()[0]}); "
                         "convert it in the environment that made it (same torch and transformers)") from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), torch.nn.Module) \
            or checkpoint.get("tokenizer") is None:
        raise InputError(f"{pickle_file} is not an LLM-Pruner checkpoint (a dict with 'model' and 'tokenizer')")
    return checkpoint["model"], checkpoint["tokenizer"]


def layer_summary(model: torch.nn.Module) -> list[dict[str, int]]:
    """Per decoder layer, the widths pruning changes: MLP width, attention and key/value heads."""
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    summary = []
    for index, layer in enumerate(layers):
        entry = {"index": index}
        mlp, attention = getattr(layer, "mlp", None), getattr(layer, "self_attn", None)
        if mlp is not None and hasattr(mlp, "gate_proj"):
            entry["intermediate_size"] = mlp.gate_proj.weight.shape[0]
        if attention is not None and hasattr(attention, "q_proj"):
            entry["num_attention_heads"] = attention.q_proj.weight.shape[0] // head_dim
            entry["num_key_value_heads"] = attention.k_proj.weight.shape[0] // head_dim
        summary.append(entry)
    return summary


def _config_json(model: torch.nn.Module) -> dict[str, Any]:
    config = model.config
    try:
        data = config.to_dict()
    except Exception:  # a config pickled by another transformers version: its attributes are still plain values
        data = {key: value for key, value in vars(config).items() if not key.startswith("_")}
    data["architectures"] = [type(model).__name__]
    data.setdefault("model_type", getattr(config, "model_type", ""))
    return json.loads(json.dumps(data, default=str))


def convert_pickle(pickle_file: Path) -> Path:
    """Write ``converted/`` beside ``pickle_file`` (see the module docstring); return it. Idempotent."""
    destination = converted_dir(pickle_file)
    size = pickle_file.stat().st_size
    source = read_json(destination / "DONE.json").get("source", {}) if is_done(destination) else {}
    if (source.get("name"), source.get("bytes")) == (pickle_file.name, size):
        log.info("%s is already converted in %s", pickle_file, destination)
        return destination
    log.warning("unpickling %s to convert it (opted in); this runs code from the file", pickle_file)
    model, tokenizer = unpickle_checkpoint(pickle_file)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        (staging / "config.json").write_text(json.dumps(_config_json(model), indent=2) + "\n")
        save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"}, force_contiguous=True)
        tensors = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
        dtypes = sorted({str(tensor.dtype).removeprefix("torch.") for tensor in model.state_dict().values()})
        shapes = {"architecture": type(model).__name__, "dtypes": dtypes, "layers": layer_summary(model),
                  "tensors": tensors}
        (staging / SHAPES_FILE).write_text(json.dumps(shapes, indent=1) + "\n")
        tokenizer_files = [Path(name).name for name in tokenizer.save_pretrained(str(staging))]
        files = sorted({"config.json", "model.safetensors", SHAPES_FILE, *tokenizer_files} & {
            path.name for path in staging.iterdir()})
        mark_done(staging, files, extra={"source": {"name": pickle_file.name, "bytes": size,
                                                    "sha256": sha256_of(pickle_file)}})
        _follow_umask(staging)
        if destination.exists():  # an incomplete or outdated conversion
            shutil.rmtree(destination)
        os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("converted %s -> %s (%d tensors, layers %s)", pickle_file, destination, len(tensors),
             ", ".join(str(entry.get("intermediate_size", "?")) for entry in shapes["layers"]))
    return destination


def _follow_umask(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; the result follows the user's umask like any file they write."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)
