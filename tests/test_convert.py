"""Pickled checkpoints: refused without the per-model opt-in, converted once with it (``launch.py convert``),
and the converted folder loads without unpickling anything, with the pickle's exact logits.

The pickle is a real LLM-Pruner-style ``torch.save({"model", "tokenizer"})`` of a tiny Llama whose layers were
pruned unevenly: MLP widths 96 and 40, and the second layer down to 3 query heads over 1 key/value head.
"""
from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from jobs.checkpoints import SHAPES_FILE, find_checkpoint
from tests.cli_helpers import assert_one_line_error
from workers.modelio import load_converted

REPO = Path(__file__).resolve().parent.parent
HEAD_DIM = 16  # hidden 64 / 4 heads


def pruned_llama(tokenizer):
    from workers.demo_inputs import build_model, prune_unevenly

    model = build_model("Llama", 128, tokenizer, seed=3)
    prune_unevenly(model, [96, 40])
    attention = model.model.layers[1].self_attn  # LLM-Pruner's head pruning: fewer heads, same head_dim
    for name, rows in (("q_proj", 3 * HEAD_DIM), ("k_proj", HEAD_DIM), ("v_proj", HEAD_DIM)):
        linear = getattr(attention, name)
        linear.weight = torch.nn.Parameter(linear.weight[:rows].clone())
        linear.out_features = rows
    attention.o_proj.weight = torch.nn.Parameter(attention.o_proj.weight[:, :3 * HEAD_DIM].clone())
    attention.o_proj.in_features = 3 * HEAD_DIM
    attention.num_key_value_groups = 3
    return model.eval()


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["The quick brown fox jumps over the lazy dog.", "Repeat the word red."], return_tensors="pt",
                      padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tests.tiny_assets import build_tiny_tokenizer
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def study(tmp_path, tokenizer):
    """A results root whose Llama/best_ppl is an LLM-Pruner pickle; the reference logits of that model."""
    root = tmp_path / "results"
    folder = root / "for_finetuning" / "Llama" / "best_ppl"
    folder.mkdir(parents=True)
    model = pruned_llama(tokenizer)
    torch.save({"model": model, "tokenizer": tokenizer}, folder / "pytorch_model.bin")
    train = tmp_path / "train.json"
    train.write_text('[{"instruction": "Say hi.", "input": "", "output": "hi"}]')
    args = [f"study.results_root={root}", "study.models=[Llama]", f"data.train_path={train}"]
    return args, folder, logits(model, tokenizer)


def launch(*args, umask: int | None = None):
    return subprocess.run([sys.executable, str(REPO / "launch.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def test_pickle_is_refused_without_opt_in(study):
    args, folder, _ = study
    result = launch("convert", "--model", "Llama", "--config", "best_ppl", *args)
    assert_one_line_error(result, "unpickles it, which runs code from it",
                          "python launch.py convert --model Llama --config best_ppl --allow-pickle")
    run = launch("--model", "Llama", "--config", "best_ppl", "--stage", "finetune", "--dry-run", "--executor",
                 "local", *args)
    assert_one_line_error(run, "pickled checkpoint", "study.allow_pickle=[Llama/best_ppl]",
                          "convert it once to safetensors: python launch.py convert --model Llama --config best_ppl")
    assert sorted(path.name for path in folder.iterdir()) == ["pytorch_model.bin"]


def test_converted_folder_loads_without_unpickling_and_matches_the_pickle(study, monkeypatch):
    args, folder, expected = study
    result = launch("convert", "--model", "Llama", "--config", "best_ppl", "--allow-pickle", *args, umask=0o027)
    assert result.returncode == 0, result.stderr
    converted = folder / "converted"
    assert f"converted {folder / 'pytorch_model.bin'} -> {converted}" in result.stdout
    names = sorted(path.name for path in converted.iterdir())
    assert {"config.json", "model.safetensors", SHAPES_FILE, "tokenizer.json", "DONE.json"} <= set(names), names
    assert not [name for name in names if name.endswith((".bin", ".pkl", ".pt", ".tmp"))], names
    assert stat.S_IMODE(converted.stat().st_mode) == 0o750  # the user's umask (027), not mkdtemp's 0700
    assert {stat.S_IMODE(path.stat().st_mode) for path in converted.iterdir()} == {0o640}
    import json
    layers = json.loads((converted / SHAPES_FILE).read_text())["layers"]
    assert [(layer["intermediate_size"], layer["num_attention_heads"], layer["num_key_value_heads"])
            for layer in layers] == [(96, 4, 2), (40, 3, 1)]
    assert find_checkpoint(folder) == ("converted", converted)

    # No unpickling from here on: any attempt fails the test.
    def refuse(*_args, **_kwargs):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    from workers.modelio import load_pruned_model
    model, tokenizer = load_pruned_model(folder, allow_pickle=False)
    assert model.model.layers[1].mlp.gate_proj.out_features == 40
    assert torch.equal(logits(model.eval(), tokenizer), expected)

    # Later runs use the conversion and need no opt-in; converting again is a no-op.
    run = launch("--model", "Llama", "--config", "best_ppl", "--stage", "finetune", "--dry-run", "--executor", "local",
                 *args)
    assert run.returncode == 0, run.stderr
    again = launch("convert", "--model", "Llama", "--config", "best_ppl", *args)
    assert again.returncode == 0 and "already converted" in again.stdout, again.stderr


def test_a_pickle_naming_code_this_environment_lacks_still_converts(tmp_path, tokenizer, monkeypatch):
    """Like a transformers 4.x pickle under 5.x (``_compute_default_rope_parameters`` gone): plain unpickling
    fails, the conversion keeps tensors, config and tokenizer, and the rebuilt model gives the same logits."""
    gone = types.ModuleType("prunetune_gone_helpers")

    def _compute_default_rope_parameters(*args, **kwargs):
        raise NotImplementedError

    _compute_default_rope_parameters.__module__ = gone.__name__
    _compute_default_rope_parameters.__qualname__ = "_compute_default_rope_parameters"
    gone._compute_default_rope_parameters = _compute_default_rope_parameters
    monkeypatch.setitem(sys.modules, gone.__name__, gone)
    model = pruned_llama(tokenizer)
    model.model.rotary_emb.legacy_rope_init_fn = _compute_default_rope_parameters
    pickled = tmp_path / "pruned" / "pytorch_model.bin"
    pickled.parent.mkdir()
    torch.save({"model": model, "tokenizer": tokenizer}, pickled)
    monkeypatch.delitem(sys.modules, gone.__name__)
    with pytest.raises(ModuleNotFoundError):
        torch.load(pickled, weights_only=False)

    from workers.convert import convert_pickle
    from workers.modelio import load_pruned_model
    converted = convert_pickle(pickled)
    rebuilt, rebuilt_tokenizer = load_pruned_model(pickled.parent, allow_pickle=False)
    assert converted == pickled.parent / "converted"
    assert torch.equal(logits(rebuilt, rebuilt_tokenizer), logits(model, tokenizer))


def test_a_changed_pickle_makes_its_conversion_stale(study):
    args, folder, _ = study
    assert launch("convert", "--path", str(folder), "--allow-pickle", *args).returncode == 0
    with (folder / "pytorch_model.bin").open("ab") as stream:
        stream.write(b"\0")
    run = launch("--model", "Llama", "--config", "best_ppl", "--stage", "finetune", "--dry-run", "--executor", "local",
                 *args)
    assert_one_line_error(run, "was converted from an older pytorch_model.bin", "python launch.py convert --path")


def test_a_converted_model_with_tied_embeddings_loads_tied_and_exact(tmp_path):
    """The converted loader skips the random init (it is most of an 8B model's loading time); tying, which
    transformers does inside that init, must still happen."""
    from safetensors.torch import save_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    config.save_pretrained(tmp_path)
    save_model(model, str(tmp_path / "model.safetensors"))
    (tmp_path / SHAPES_FILE).write_text(json.dumps({"tensors": {name: list(value.shape)
                                                                for name, value in model.state_dict().items()}}))
    loaded = load_converted(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
