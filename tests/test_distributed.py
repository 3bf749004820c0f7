"""Distributed finetunes: rank detection, ports, DeepSpeed configs, and a real 2-rank ZeRO-2 run on CPU.

The 2-rank test starts two processes with the environment a submitit SLURM job with 2 tasks gives them
(SUBMITIT_EXECUTOR, SLURM_NTASKS, SLURM_PROCID, ...), so the production path runs: submitit's
TorchDistributedEnvironment, a gloo process group, real DeepSpeed ZeRO-2 through the real
``workers.entry.run_task``. Each process runs this file as a script (``child_main``), which wraps the
Trainer to record what its rank trained on and its LoRA weights after training.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.config import load_config
from jobs.errors import ConfigError, InputError
from jobs.study import Pair, StudyPaths
from tests.two_ranks import (PAIR, REPO, alpaca_rows, child_environment, finetune_in_one_process, run_two_ranks,
                             two_rank_study)


# ------------------------------------------------------------------------------------ fast units


def test_auto_uses_deepspeed_only_where_it_shards_or_on_gpu():
    from workers.distributed import choose_deepspeed

    assert choose_deepspeed("auto", 1, on_gpu=False) is None  # the demo: one CPU process
    assert choose_deepspeed("auto", 2, on_gpu=False) == "zero2"
    assert choose_deepspeed("auto", 1, on_gpu=True) == "zero2"
    assert choose_deepspeed("none", 8, on_gpu=True) is None
    assert choose_deepspeed("zero3", 1, on_gpu=False) == "zero3"


def test_ports_are_shared_by_ranks_and_distinct_across_array_tasks():
    from workers.distributed import master_port

    ports = [master_port(str(job_id)) for job_id in range(412_000, 412_012)]  # 12 consecutive array tasks
    assert len(set(ports)) == 12 and all(20000 <= port < 60000 for port in ports)
    assert master_port("412003") == master_port("412003")  # every rank of one job derives the same port


@pytest.mark.parametrize(("environment", "expected"), [
    ({}, (0, 0, 1, 1, "single")),
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, (0, 0, 1, 1, "single")),
    ({"SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2", "SLURM_PROCID": "5", "SLURM_LOCALID": "1"},
     (5, 1, 8, 4, "submitit")),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_NTASKS": "8"}, (1, 1, 2, 2, "launcher")),
])
def test_ranks_come_from_launcher_then_slurm_then_one_process(monkeypatch, environment, expected):
    from workers.distributed import detect_ranks

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_NTASKS", "SLURM_JOB_NUM_NODES",
                "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    ranks = detect_ranks()
    assert (ranks.rank, ranks.local_rank, ranks.world_size, ranks.local_world_size, ranks.source) == expected


def test_one_cpu_process_without_deepspeed_sets_nothing_up(monkeypatch):
    """The demo's path: no environment, no process group, no accelerate state; the Trainer does as before."""
    import torch

    from workers import distributed

    for key in (*distributed.ENV_KEYS, "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    run = distributed.setup("auto", on_gpu=False)
    try:
        assert (run.deepspeed, run.backend, run.configured_state) == (None, None, False)
        assert not torch.distributed.is_initialized()
        assert not any(key in os.environ for key in distributed.ENV_KEYS)
    finally:
        distributed.teardown()


def test_several_slurm_tasks_outside_submitit_is_a_clear_error(monkeypatch):
    from workers import distributed

    for key in (*distributed.ENV_KEYS, "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    with pytest.raises(RuntimeError, match="not started by submitit"):
        distributed.setup("none", on_gpu=False)
    distributed.teardown()
    assert "RANK" not in os.environ and "MASTER_PORT" not in os.environ


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_shipped_deepspeed_configs_resolve_every_auto(name):
    import torch

    from workers.distributed import DEEPSPEED_DIR, auto_values, load_deepspeed_config, resolve_deepspeed_config

    assert (DEEPSPEED_DIR / f"{name}.yaml").read_text().startswith("# Used by: python launch.py")
    values = auto_values(micro_batch_size=4, accumulation=8, world_size=2, learning_rate=1e-4, dtype=torch.bfloat16,
                         hidden_size=4096, warmup_steps=100, total_steps=1600, max_grad_norm=1.0, betas=(0.9, 0.999),
                         eps=1e-8, weight_decay=0.0)
    resolved = resolve_deepspeed_config(load_deepspeed_config(name), values)
    assert "auto" not in json.dumps(resolved)
    assert resolved["train_batch_size"] == 64 == 4 * 8 * 2  # the recipe's batch, whatever the rank count
    assert resolved["bf16"]["enabled"] is True and resolved["fp16"]["enabled"] is False
    assert resolved["zero_optimization"]["stage"] == (2 if name == "zero2" else 3)
    assert resolved["zero_optimization"]["reduce_bucket_size"] == 4096 * 4096
    if name == "zero3_offload":
        assert resolved["optimizer"]["params"]["lr"] == 1e-4
        assert resolved["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_unknown_auto_and_unknown_name_are_errors():
    from workers.distributed import load_deepspeed_config, resolve_deepspeed_config

    with pytest.raises(InputError, match='no recipe value for "auto" at zero_optimization.sub_group_size'):
        resolve_deepspeed_config({"zero_optimization": {"sub_group_size": "auto"}}, {"train_batch_size": 64})
    with pytest.raises(InputError, match="zero2, zero3, zero3_offload"):
        load_deepspeed_config("zero4")


def test_config_checks_deepspeed_name_and_batch_divisibility():
    assert load_config(None).finetune.deepspeed == "auto"
    with pytest.raises(ConfigError, match='finetune.deepspeed.*did you mean "zero3"'):
        load_config(None, ["finetune.deepspeed=zero4"])
    with pytest.raises(ConfigError, match=r"micro_batch_size x ranks \(4 x 3"):
        load_config(None, ["resources.finetune.gpus_per_node=3"])  # 64 sequences cannot split over 3 ranks
    load_config(None, ["resources.finetune.gpus_per_node=8", "resources.finetune.nodes=2"])  # 64 = 4 x 1 x 16


def test_a_build_lock_left_by_a_killed_build_is_named_with_its_rm(tmp_path, monkeypatch, caplog):
    """torch waits on a build folder's lock in silence and forever; one older than any build gets a warning."""
    from workers.distributed import STALE_BUILD_LOCK_S, warn_of_stale_build_locks

    root = tmp_path / "build root"  # the command to paste must survive the space
    fresh, stale = root / "cpu_adam" / "lock", root / "py311_cu130" / "fused_adam" / "lock"
    for lock in (fresh, stale):
        lock.parent.mkdir(parents=True)
        lock.touch()
    now = stale.stat().st_mtime + 60
    os.utime(stale, (now - STALE_BUILD_LOCK_S - 60,) * 2)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))

    with caplog.at_level("WARNING", logger="workers.distributed"):
        assert warn_of_stale_build_locks(now) == [str(stale)]
    assert [record.getMessage().split("delete it: ")[1] for record in caplog.records] == [f"rm '{stale}'"]


def test_finetune_jobs_get_one_task_per_gpu(tmp_path):
    from jobs.plan import build_plan
    from jobs.slurm import make_executor
    from jobs.study import select_pairs

    config = load_config(None, [f"study.results_root={tmp_path}", "resources.finetune.gpus_per_node=4",
                                "resources.finetune.nodes=2", "resources.evaluate.gpus_per_node=2"])
    plan = build_plan(config, select_pairs(config, "Llama", "best_acc"), "all")
    tasks = {array.worker: make_executor(config, array, "").parameters["ntasks_per_node"] for array in plan.arrays}
    assert tasks["finetune"] == 4 and tasks["evaluate_pruned"] == 1 and tasks["compare"] == 1
    assert make_executor(config, plan.array("finetune"), "").parameters["nodes"] == 2
    cpu_only = load_config(None, [f"study.results_root={tmp_path}", "resources.finetune.gpus_per_node=0"])
    plan = build_plan(cpu_only, select_pairs(cpu_only, "Llama", "best_acc"), "finetune")
    assert make_executor(cpu_only, plan.array("finetune"), "").parameters["ntasks_per_node"] == 1


def _exchange_flags(rank: int, world_size: int, folder: str) -> None:
    """One rank of the test below: rank 1 alone raises a flag at the second of three step ends."""
    import torch

    from workers.checkpointing import AcrossRanks

    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                                         world_size=world_size)
    try:
        at_once, one_step_late = AcrossRanks(), AcrossRanks(one_step_late=True)
        answers = []
        for step in range(3):
            raised = rank == 1 and step == 1
            answers.append([at_once.exchange(raised, False), one_step_late.exchange(raised, False)])
        Path(folder, f"rank{rank}.json").write_text(json.dumps(answers))
    finally:
        torch.distributed.destroy_process_group()


def test_every_rank_sees_a_flag_raised_on_one_rank_at_the_same_step(tmp_path):
    """workers/checkpointing.AcrossRanks: the stop/save agreement. Over NCCL it is read one step late (no wait
    for the GPU); both ways, every rank gets the same answer at the same step, so all save and stop together."""
    import torch.multiprocessing

    torch.multiprocessing.spawn(_exchange_flags, args=(2, str(tmp_path)), nprocs=2)
    expected = [[[False, False], [False, False]],  # step 0: nothing raised
                [[True, False], [False, False]],  # step 1: rank 1 raises; at once, or not yet
                [[False, False], [True, False]]]  # step 2: one step late, on both ranks alike
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected


# ------------------------------------------------------------------------------- 2 ranks, ZeRO-2


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ddp")
    overrides = two_rank_study(root, "finetune.micro_batch_size=4")  # "finetune.deepspeed" stays auto: zero2
    outputs, seconds = run_two_ranks(root, Path(__file__))
    config = load_config(None, overrides)
    return config, root, outputs, seconds


def _rank_record(root: Path, rank: int) -> dict:
    return json.loads((root / f"rank{rank}.json").read_text())


@pytest.mark.slow
def test_each_rank_trains_on_its_own_half(two_ranks):
    config, root, _, seconds = two_ranks
    print(f"2-rank ZeRO-2 finetune: {seconds:.1f} s wall (both processes, imports included)")
    record = json.loads((StudyPaths(config).finetuned_dir(PAIR) / "finetuning_config.json").read_text())
    train_examples = record["derived"]["train_examples"]
    assert train_examples == 72  # 80 rows minus 8 for validation
    seen = [_rank_record(root, rank)["sequences"] for rank in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == train_examples // 2  # one epoch: each rank sees its half once
    assert len(set(seen[0])) == len(seen[0]) and not set(seen[0]) & set(seen[1])  # disjoint shards
    assert len(set(seen[0]) | set(seen[1])) == train_examples  # together, every example


@pytest.mark.slow
def test_effective_batch_is_the_recipe_batch(two_ranks):
    config, root, _, _ = two_ranks
    record = json.loads((StudyPaths(config).finetuned_dir(PAIR) / "finetuning_config.json").read_text())
    derived = record["derived"]
    assert (derived["world_size"], derived["deepspeed"], derived["process_group_backend"]) == (2, "zero2", "gloo")
    assert derived["gradient_accumulation_steps"] == 16 // 4 // 2  # halved: the second rank brings 4 sequences
    assert derived["sequences_per_optimizer_step"] == 16
    deepspeed = derived["deepspeed_config"]
    assert (deepspeed["train_batch_size"], deepspeed["train_micro_batch_size_per_gpu"],
            deepspeed["gradient_accumulation_steps"]) == (16, 4, 2)
    for rank in (0, 1):
        trainer = _rank_record(root, rank)
        assert (trainer["world_size"], trainer["engine_train_batch_size"], trainer["accumulation"]) == (2, 16, 2)
        assert trainer["engine_optimizer_steps"] == 5  # DeepSpeed stepped where the Trainer did, not twice as often
        assert trainer["deepspeed"] is True
    assert record["metrics"]["optimizer_steps"] == derived["total_optimizer_steps"] == 5  # 9 batches per rank / 2
    assert record["versions"]["deepspeed"] == "0.19.8"


@pytest.mark.slow
def test_both_ranks_hold_the_same_trained_lora_weights(two_ranks):
    from safetensors.torch import load_file

    config, root, _, _ = two_ranks
    weights = [load_file(root / f"rank{rank}_lora.safetensors") for rank in (0, 1)]
    assert weights[0].keys() == weights[1].keys() and weights[0]
    for name, tensor in weights[0].items():
        assert tensor.equal(weights[1][name]), name
    assert max(tensor.abs().max().item() for name, tensor in weights[0].items() if "lora_B" in name) > 0
    adapter = load_file(StudyPaths(config).finetuned_dir(PAIR) / "adapter_model.safetensors")
    assert {name.replace(".default", "") for name in weights[0]} == set(adapter)
    for name, tensor in weights[0].items():
        assert tensor.equal(adapter[name.replace(".default", "")]), name  # rank 0 saved what both ranks hold


@pytest.mark.slow
def test_two_ranks_train_what_one_process_trains(two_ranks, tmp_path):
    """2 ranks x 2 accumulation steps (ZeRO-2) take the optimizer steps of 1 process x 4 accumulation steps
    (no DeepSpeed) over the same sequences, so the adapters agree up to float rounding."""
    import torch
    from safetensors.torch import load_file

    config, root, _, _ = two_ranks
    single = finetune_in_one_process(root, tmp_path)
    assert json.loads((single / "finetuning_config.json").read_text())["derived"]["gradient_accumulation_steps"] == 4
    expected = load_file(single / "adapter_model.safetensors")
    got = load_file(StudyPaths(config).finetuned_dir(PAIR) / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    largest = max(tensor.abs().max().item() for tensor in expected.values())
    for name, tensor in expected.items():
        assert torch.allclose(got[name], tensor, rtol=0, atol=1e-5 * largest), name  # measured: 4e-7 of 0.015


@pytest.mark.slow
def test_deepspeed_on_cpu_compiles_no_op(two_ranks):
    """DeepSpeed's CPU comm op serves inference only: not built, so no 22-70 s compile and no build lock that a
    killed rank could leave behind for every later run to wait on."""
    _, root, outputs, _ = two_ranks
    assert not (root / "torch_extensions").exists()
    assert not any("built successfully" in output for output in outputs)


@pytest.mark.slow
def test_rank_zero_alone_writes_and_logs(two_ranks):
    config, _, outputs, _ = two_ranks
    folder = StudyPaths(config).finetuned_dir(PAIR)
    assert sorted(path.name for path in folder.iterdir()) == sorted(
        ["adapter_model.safetensors", "adapter_config.json", "finetuning_config.json", "training_log.txt",
         "DONE.json"])
    assert len([line for line in (folder / "training_log.txt").read_text().splitlines() if " loss " in line]) == 5
    assert " INFO workers.finetune: Llama/best_acc: step 5/5" in outputs[0]
    # Rank 1 logs warnings only, apart from the task runner's start and done lines (its pid and host).
    assert [line for line in outputs[1].splitlines() if " INFO " in line and " INFO prunetune.task: " not in line] == []


@pytest.fixture(scope="module")
def back_to_back(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """Three finetunes in one child process (zero2, zero2, none), each checkpointing after every step."""
    from tests.tiny_assets import build_tiny_llama, build_tiny_tokenizer

    root = tmp_path_factory.mktemp("back_to_back")
    tokenizer = build_tiny_tokenizer(root / "tokenizer")
    build_tiny_llama(root / "pruned", tokenizer)
    (root / "alpaca.json").write_text(json.dumps(alpaca_rows(16)))
    (root / "overrides.json").write_text(json.dumps([
        f"study.results_root={root / 'results'}", f"study.pruned_model_path={root / 'pruned'}",
        f"data.train_path={root / 'alpaca.json'}", "finetune.batch_size=8", "finetune.micro_batch_size=4",
        "finetune.max_steps=2", "finetune.cutoff_len=64", "finetune.checkpoint_steps=1", "finetune.logging_steps=1",
        "finetune.keep_checkpoints=true"]))
    environment = child_environment()
    done = subprocess.run([sys.executable, __file__, str(root), "back-to-back"], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return root, json.loads((root / "back_to_back.json").read_text())


@pytest.mark.slow
def test_one_process_runs_deepspeed_finetunes_back_to_back(back_to_back):
    """The local executor's case: one process, no launcher, task after task. DeepSpeed must not fall back to
    MPI discovery, the second DeepSpeed finetune must not trip over the first one's process group, and a
    finetune without DeepSpeed afterwards must not inherit it."""
    _, runs = back_to_back
    assert [run["deepspeed"] for run in runs] == ["zero2", "zero2", "none"]
    assert all(run["leftover_environment"] == [] for run in runs)  # RANK, MASTER_PORT, ACCELERATE_* restored
    assert all(run["optimizer_steps"] == 2 for run in runs)


@pytest.mark.slow
def test_zero2_checkpoints_save_the_trained_adapter_without_copying_the_model(back_to_back):
    """workers/lora_trainer.py: a ZeRO-2 checkpoint's adapter comes from the model itself (accelerate's copy of
    the whole state dict to CPU is never made), and it holds the LoRA weights DeepSpeed saved at that step."""
    import torch
    from safetensors.torch import load_file

    root, runs = back_to_back
    for run in runs[:2]:
        assert run["full_state_dict_copies"] == 0
        for step in (1, 2):
            checkpoint = Path(run["checkpoints"]) / f"checkpoint-{step}"
            adapter = load_file(str(checkpoint / "adapter_model.safetensors"))
            assert adapter and all("lora_" in name for name in adapter)
            # DeepSpeed's own file of the module's trainable weights at this step: plain tensors, no code.
            saved = torch.load(checkpoint / f"global_step{step}" / "mp_rank_00_model_states.pt", map_location="cpu",
                               weights_only=True)["module"]
            # peft names the adapter in the module ("lora_A.default.weight") and not in its file ("lora_A.weight")
            lora_saved = {name.replace(".default.", "."): tensor for name, tensor in saved.items() if "lora_" in name}
            assert sorted(lora_saved) == sorted(adapter)
            assert all(torch.equal(lora_saved[name].to(tensor.dtype), tensor) for name, tensor in adapter.items())
            # The gradient norm stays a tensor during the step; logging still turns it into a number.
            history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
            assert all(isinstance(entry["grad_norm"], float) and entry["grad_norm"] > 0
                       for entry in history if "loss" in entry)
    assert runs[1]["lora_b_changed"]  # step 2's adapter differs from step 1's: the checkpoints track training


# ------------------------------------------------------------------------ child process (one rank)


def child_main(root: Path) -> None:
    """One rank: run the real task entry point with a Trainer that records what this rank trained on."""
    sys.path.insert(0, str(REPO))
    import torch
    from safetensors.torch import save_file

    from jobs.plan import TaskSpec
    from workers import finetune
    from workers.entry import run_task

    rank = int(os.environ["SLURM_PROCID"])
    sequences: list[str] = []

    class RecordingTrainer(finetune.LoraTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"]):
                sequences.append(hashlib.sha1(str(ids[mask.bool()].tolist()).encode()).hexdigest())
            return super().training_step(model, inputs, *args, **kwargs)

        def train(self, *args, **kwargs):
            result = super().train(*args, **kwargs)
            lora = {name: param.detach().clone().contiguous() for name, param in self.model.named_parameters()
                    if "lora_" in name}
            save_file(lora, str(root / f"rank{rank}_lora.safetensors"))
            engine = self.model_wrapped
            (root / f"rank{rank}.json").write_text(json.dumps({
                "sequences": sequences, "world_size": self.args.world_size,
                "accumulation": self.args.gradient_accumulation_steps, "deepspeed": self.is_deepspeed_enabled,
                "engine_train_batch_size": engine.train_batch_size() if self.is_deepspeed_enabled else None,
                "engine_optimizer_steps": engine.global_steps if self.is_deepspeed_enabled else None,
                "threads": torch.get_num_threads()}))
            return result

    finetune.LoraTrainer = RecordingTrainer
    config = load_config(None, json.loads((root / "overrides.json").read_text()))
    run_task(TaskSpec("finetune", 0, "finetune", config, PAIR, (PAIR,)))


def back_to_back_main(root: Path) -> None:
    """Three finetunes in this one process, as a local executor worker runs them: zero2, zero2, none."""
    import accelerate
    from safetensors.torch import load_file

    from jobs.plan import TaskSpec
    from workers.checkpointing import CHECKPOINTS
    from workers.entry import run_task

    copies = []
    copy_state_dict = accelerate.Accelerator.get_state_dict

    def counted(self, *args, **kwargs):
        copies.append(1)
        return copy_state_dict(self, *args, **kwargs)

    accelerate.Accelerator.get_state_dict = counted
    overrides = json.loads((root / "overrides.json").read_text())
    runs = []
    for model, deepspeed in (("Llama", "zero2"), ("Qwen", "zero2"), ("Mistral", "none")):
        config = load_config(None, [*overrides, f"finetune.deepspeed={deepspeed}"])
        pair = Pair(model, "best_acc")
        copies.clear()
        run_task(TaskSpec("finetune", 0, "finetune", config, pair, (pair,)))
        out_dir = StudyPaths(config).finetuned_dir(pair)
        checkpoints = out_dir / CHECKPOINTS
        first, second = (load_file(str(checkpoints / f"checkpoint-{step}" / "adapter_model.safetensors"))
                         for step in (1, 2))
        record = json.loads((out_dir / "finetuning_config.json").read_text())
        leftover = sorted(key for key in os.environ
                          if key.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "ACCELERATE_")))
        runs.append({"deepspeed": record["derived"]["deepspeed"], "leftover_environment": leftover,
                     "optimizer_steps": record["metrics"]["optimizer_steps"], "full_state_dict_copies": len(copies),
                     "checkpoints": str(checkpoints),
                     "lora_b_changed": any(not first[name].equal(second[name]) for name in first if "lora_B" in name)})
    (root / "back_to_back.json").write_text(json.dumps(runs))


if __name__ == "__main__":
    if sys.argv[2:] == ["back-to-back"]:
        back_to_back_main(Path(sys.argv[1]))
    else:
        child_main(Path(sys.argv[1]))
