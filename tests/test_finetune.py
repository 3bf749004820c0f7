"""A real LoRA finetune of a tiny random Llama on generated Alpaca rows (CPU, a few seconds)."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.config import load_config
from jobs.errors import InputError
from jobs.state import DONE_MARKER, is_done
from jobs.study import Pair, StudyPaths
from tests.tiny_assets import build_tiny_llama, build_tiny_tokenizer
from workers import finetune
from workers.finetune import clamp_val_size

PAIR = Pair("Llama", "best_acc")
NUMBERS = "one two three four five six seven eight nine ten".split()


def alpaca_rows(count: int) -> list[dict[str, str]]:
    """Learnable rows: the response repeats a word from the instruction, so the loss falls quickly."""
    chooser = random.Random(0)
    rows = []
    for index in range(count):
        word = chooser.choice(NUMBERS)
        rows.append({"instruction": f"Repeat the word {word}.", "input": "" if index % 2 else "twice",
                     "output": f"{word} {word}"})
    return rows


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: a model this small gains nothing from two, and loses much when cores are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_study(root: Path, *overrides: str):
    """A tiny Llama, its tokenizer and 64 learnable rows under ``root``; the config to finetune them."""
    tokenizer = build_tiny_tokenizer(root / "tokenizer")
    build_tiny_llama(root / "pruned", tokenizer)
    train_path = root / "alpaca.json"
    train_path.write_text(json.dumps(alpaca_rows(64)))
    return load_config(None, [
        f"study.results_root={root / 'results'}", f"study.pruned_model_path={root / 'pruned'}",
        f"data.train_path={train_path}", "finetune.learning_rate=5e-3", "finetune.batch_size=8",
        "finetune.num_epochs=2", "finetune.logging_steps=2", "finetune.eval_steps=8", "finetune.cutoff_len=128",
        *overrides])


@pytest.fixture(scope="module")
def finished(one_thread, tmp_path_factory: pytest.TempPathFactory):
    config = tiny_study(tmp_path_factory.mktemp("study"), "finetune.micro_batch_size=4")
    finetune.run(config, PAIR)
    return config, StudyPaths(config).finetuned_dir(PAIR)


def test_outputs_and_done_marker(finished) -> None:
    _, folder = finished
    for name in ("adapter_model.safetensors", "adapter_config.json", "finetuning_config.json", "training_log.txt",
                 DONE_MARKER):
        assert (folder / name).is_file(), name
    assert is_done(folder, verify_checksums=True)
    assert sorted(path.name for path in folder.iterdir()) == sorted(
        ["adapter_model.safetensors", "adapter_config.json", "finetuning_config.json", "training_log.txt",
         DONE_MARKER])  # no scratch or staging folders left behind
    modes = {(folder / name).stat().st_mode for name in ("adapter_model.safetensors", "training_log.txt")}
    assert len(modes) == 1  # safetensors' 0600 widened to the user's umask like every other result file


def test_adapter_trained_and_loss_fell(finished) -> None:
    from safetensors.torch import load_file

    _, folder = finished
    weights = load_file(folder / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in weights.items() if "lora_B" in name]
    assert lora_b and max(tensor.abs().max().item() for tensor in lora_b) > 0  # B starts at exactly zero
    adapter = json.loads((folder / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"}
    metrics = json.loads((folder / "finetuning_config.json").read_text())["metrics"]
    assert metrics["lora_b_max_abs"] > 0
    assert metrics["last_train_loss"] < metrics["first_train_loss"]
    assert metrics["train_tokens_per_s"] > 0


def test_record_has_resolved_settings(finished) -> None:
    config, folder = finished
    record = json.loads((folder / "finetuning_config.json").read_text())
    derived = record["derived"]
    assert derived["gradient_accumulation_steps"] == 8 // 4
    assert derived["world_size"] == 1
    assert (derived["train_examples"], derived["val_examples"]) == (58, 6)  # val clamped to a tenth of 64
    assert derived["total_optimizer_steps"] == 16  # ceil(58 / 4) = 15 batches -> 8 steps per epoch x 2
    assert record["metrics"]["optimizer_steps"] == 16
    assert derived["warmup_steps_used"] == 1  # 100 configured, clamped to a tenth of 16
    assert record["settings"]["learning_rate"] == config.finetune.learning_rate
    assert set(record["settings"]) == set(config.finetune.__dataclass_fields__)
    assert record["base_model"]["format"] == "hf"
    assert set(record["versions"]) == {"torch", "transformers", "peft", "accelerate"}


def test_training_log_lines(finished) -> None:
    _, folder = finished
    lines = (folder / "training_log.txt").read_text().splitlines()
    train_lines = [line for line in lines if " loss " in line and "eval_loss" not in line]
    assert len(train_lines) == 16 // 2  # one per logging step
    assert sum("eval_loss" in line for line in lines) == 2  # steps 8 and 16
    assert any(line.startswith("train_tokens ") and "train_tokens_per_s" in line for line in lines)
    assert any(line.startswith("train_loss initial") for line in lines)


def test_second_run_skips(finished, monkeypatch: pytest.MonkeyPatch) -> None:
    config, folder = finished
    before = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}

    def fail(*args, **kwargs):
        raise AssertionError("a done pair must not load its model again")

    monkeypatch.setattr(finetune, "load_pruned_model", fail)
    finetune.run(config, PAIR)
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == before


def test_tiny_data_no_val_set_grouped_and_capped(tmp_path: Path) -> None:
    """Fewer than 10 rows: no validation split, so no evaluation; max_steps caps the run."""
    tokenizer = build_tiny_tokenizer(tmp_path / "tokenizer")
    build_tiny_llama(tmp_path / "pruned", tokenizer)
    (tmp_path / "alpaca.jsonl").write_text("\n".join(json.dumps(row) for row in alpaca_rows(8)))
    config = load_config(None, [
        f"study.results_root={tmp_path / 'results'}", f"study.pruned_model_path={tmp_path / 'pruned'}",
        f"data.train_path={tmp_path / 'alpaca.jsonl'}", "finetune.batch_size=4", "finetune.micro_batch_size=2",
        "finetune.max_steps=3", "finetune.logging_steps=1", "finetune.group_by_length=true",
        "finetune.lora_target_modules=[q_proj, v_proj, w_nonexistent]",
    ])
    finetune.run(config, PAIR)
    folder = StudyPaths(config).finetuned_dir(PAIR)
    assert is_done(folder)
    record = json.loads((folder / "finetuning_config.json").read_text())
    assert (record["derived"]["train_examples"], record["derived"]["val_examples"]) == (8, 0)
    assert record["derived"]["lora_target_modules_used"] == ["q_proj", "v_proj"]
    assert record["metrics"]["optimizer_steps"] == record["derived"]["total_optimizer_steps"] == 3
    assert record["derived"]["warmup_steps_used"] == 0
    assert "eval_loss" not in (folder / "training_log.txt").read_text()

    no_targets = load_config(None, [f"study.results_root={tmp_path / 'other'}",
                                    f"study.pruned_model_path={tmp_path / 'pruned'}",
                                    f"data.train_path={tmp_path / 'alpaca.jsonl'}",
                                    "finetune.lora_target_modules=[w_nonexistent]"])
    with pytest.raises(InputError, match="set finetune.lora_target_modules"):
        finetune.run(no_targets, PAIR)


@pytest.mark.parametrize(("requested", "rows", "expected"), [
    (2000, 51760, 2000), (2000, 200, 20), (2000, 64, 6), (2000, 10, 1), (2000, 9, 0), (0, 500, 0), (3, 500, 3),
])
def test_val_size_clamp(requested: int, rows: int, expected: int) -> None:
    assert clamp_val_size(requested, rows) == expected


def test_packed_path_trains_the_same_recipe(tmp_path):
    """finetune.packing=on (the GPU default) on CPU: padding-free rows, same sequences per step, loss falls."""
    config = tiny_study(tmp_path, "finetune.packing=on", "finetune.packing_max_tokens=128")
    finetune.run(config, PAIR)
    folder = StudyPaths(config).finetuned_dir(PAIR)
    assert is_done(folder, verify_checksums=True)
    record = json.loads((folder / "finetuning_config.json").read_text())
    derived = record["derived"]
    assert derived["sequences_per_optimizer_step"] == 8
    assert derived["packed_rows_per_rank_and_step"] >= 1
    assert derived["gradient_accumulation_steps"] == derived["packed_rows_per_rank_and_step"]
    assert derived["packed_model"]["grouped_lora_modules"] == 2 * 2  # attention and MLP of both layers
    assert derived["packed_model"]["joined_base_modules"] == 2 * 2  # each with its base weights as one tensor
    assert derived["packed_model"]["layer_shapes"] == 1  # the tiny model is unpruned
    metrics = record["metrics"]
    assert metrics["optimizer_steps"] == derived["total_optimizer_steps"]  # the plan matched what ran
    assert metrics["last_train_loss"] < metrics["first_train_loss"]
    assert metrics["last_eval_loss"] is not None  # evaluation runs packed too


def test_compiled_packed_path_trains_as_the_eager_one(tmp_path):
    """finetune.compile=on runs the GPU default's compiled layers and loss (Inductor's CPU code here) through the
    real worker; with dropout off (its random masks come from other kernels when compiled) the losses agree."""
    losses = {}
    for mode in ("off", "on"):
        config = tiny_study(tmp_path / mode, "finetune.packing=on", "finetune.packing_max_tokens=128",
                            "finetune.lora_dropout=0", f"finetune.compile={mode}")
        finetune.run(config, PAIR)
        record = json.loads((StudyPaths(config).finetuned_dir(PAIR) / "finetuning_config.json").read_text())
        assert record["derived"]["packed_model"]["compiled_layers"] == (2 if mode == "on" else 0)
        metrics = record["metrics"]
        losses[mode] = (metrics["first_train_loss"], metrics["last_train_loss"], metrics["last_eval_loss"])
    assert losses["on"][1] < losses["on"][0]
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-3)


def test_cuda_graphs_layout_trains_as_the_packed_path(tmp_path):
    """finetune.cuda_graphs=on: micro-batches padded to a multiple of the cutoff and a fixed segment count, the loss
    over every position, gradients in one flat buffer zeroed in place (on the CPU nothing is captured). With dropout
    off (padding changes how many random numbers it draws) the losses are the packed path's."""
    losses = {}
    for graphs in ("off", "on"):
        config = tiny_study(tmp_path / graphs, "finetune.packing=on", "finetune.packing_max_tokens=256",
                            "finetune.lora_dropout=0", "finetune.deepspeed=none", f"finetune.cuda_graphs={graphs}")
        finetune.run(config, PAIR)
        metrics = json.loads((StudyPaths(config).finetuned_dir(PAIR) / "finetuning_config.json").read_text())["metrics"]
        losses[graphs] = (metrics["first_train_loss"], metrics["last_train_loss"], metrics["last_eval_loss"])
        assert ("cuda_graphs" in metrics) == (graphs == "on")
    assert metrics["cuda_graphs"]["graphs"] >= 2  # padded lengths seen; on the CPU none is captured
    assert losses["on"][1] < losses["on"][0]
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-4)


def test_zero3_packed_path_trains_uncompiled_and_ungrouped(tmp_path):
    """ZeRO-3 gathers each module's parameters as it runs: the packed path trains there with neither LoRA groups
    nor compiled layers (which would trace the gathering hooks). In a child process, because DeepSpeed's process
    group stays for the process's later tasks (the local executor's case)."""
    from tests.two_ranks import REPO, child_environment

    overrides = ["finetune.packing=on", "finetune.packing_max_tokens=128", "finetune.deepspeed=zero3"]
    script = ("import sys; from pathlib import Path; from tests.test_finetune import PAIR, tiny_study; "
              "from workers import finetune; finetune.run(tiny_study(Path(sys.argv[1]), *sys.argv[2:]), PAIR)")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path), *overrides], cwd=REPO,
                          env=child_environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    config = load_config(None, [f"study.results_root={tmp_path / 'results'}", *overrides])
    folder = StudyPaths(config).finetuned_dir(PAIR)
    assert is_done(folder, verify_checksums=True)
    record = json.loads((folder / "finetuning_config.json").read_text())
    assert record["derived"]["deepspeed"] == "zero3"
    packed = record["derived"]["packed_model"]
    assert (packed["grouped_lora_modules"], packed["compiled_layers"]) == (0, 0)
    assert record["metrics"]["last_train_loss"] < record["metrics"]["first_train_loss"]


@pytest.mark.parametrize(("setting", "on_gpu", "sharded", "shapes", "compiles"), [
    ("auto", True, False, 1, True), ("auto", True, False, finetune.AUTO_COMPILE_MAX_LAYER_SHAPES, True),
    ("auto", True, False, finetune.AUTO_COMPILE_MAX_LAYER_SHAPES + 1, False),  # a compile per shape costs more
    ("auto", False, False, 1, False), ("on", False, False, 30, True), ("off", True, False, 1, False),
    ("auto", True, True, 1, False), ("on", True, True, 1, False),  # ZeRO-3's hooks are not for compiled layers
])
def test_when_the_packed_path_compiles_its_layers(setting, on_gpu, sharded, shapes, compiles):
    assert finetune.compiles_layers(setting, on_gpu, sharded, shapes) is compiles


def test_a_lone_rank_keeps_to_one_gpu_of_several(tmp_path, caplog):
    """One rank on a machine showing 4 GPUs: the Trainer would wrap the model in nn.DataParallel and take 4 x the
    micro-batch per step. The GPU count is set as the Trainer's device set-up sets it (no GPU here)."""
    from transformers import TrainingArguments

    def args_seeing_four_gpus() -> TrainingArguments:
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, use_cpu=True, report_to=[])
        args._n_gpu = 4
        return args

    lone = args_seeing_four_gpus()
    finetune.one_gpu_per_rank(lone, world_size=1, pair=PAIR)
    assert (lone.n_gpu, lone.train_batch_size) == (1, 4)
    assert "4 GPUs are visible" in caplog.text and "gpus_per_node" in caplog.text
    ranked = args_seeing_four_gpus()  # with several ranks the Trainer already uses one GPU per rank
    finetune.one_gpu_per_rank(ranked, world_size=2, pair=PAIR)
    assert ranked.n_gpu == 4
