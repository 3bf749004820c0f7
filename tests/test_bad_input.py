"""The bad-input battery (issue 6): every case prints one line (what, where, how to fix), exits with code 2,
writes nothing (the whole tree of inputs and results root is compared before and after) and submits nothing.

Each case runs with the local executor, and again against a real local SLURM cluster (marked ``slurm``),
where ``squeue`` must stay empty and ``sacct`` must record no job. A few cases exist only with SLURM (the
partition's GPUs, a results root that would break an sbatch script).

The study: one model (Llama), its two pairs as Hugging Face folders of zero weights (only headers are read
before submission) under ``inputs/``, training and evaluation data, and the results root ``results/``.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from tests.cli_helpers import assert_one_line_error

REPO = Path(__file__).resolve().parent.parent
LAYERS = {"model.embed_tokens.weight": [64, 16], "model.layers.0.mlp.gate_proj.weight": [48, 16],
          "model.layers.0.mlp.down_proj.weight": [16, 48], "lm_head.weight": [64, 16]}


def write_safetensors(path: Path, shapes: dict[str, list[int]]) -> None:
    """A valid safetensors file of zeros (float32)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * (shape[0] * shape[1] if len(shape) == 2 else shape[0])
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"\0" * offset)


@dataclass
class Study:
    tmp: Path
    inputs: Path
    root: Path
    args: list[str]  # the study's overrides
    cleanups: list[Callable[[], object]] = field(default_factory=list)

    def model(self, pair: str) -> Path:
        return self.inputs / "for_finetuning" / pair


def make_study(tmp: Path) -> Study:
    inputs, root = tmp / "inputs", tmp / "results"
    for pair in ("Llama/best_acc", "Llama/best_ppl"):
        folder = inputs / "for_finetuning" / pair
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        write_safetensors(folder / "model.safetensors", LAYERS)
    train = inputs / "train.json"
    train.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": f"{i}."} for i in range(8)]))
    from workers.eval_data_demo import write_demo_eval_data
    write_demo_eval_data(inputs / "eval", seed=0, docs_per_task=4, ppl_text_lines=10)
    root.mkdir()
    args = [f"study.results_root={root}", "study.models=[Llama]",
            f"study.pruned_model_path={inputs}/for_finetuning/{{model}}/{{config}}", f"data.train_path={train}",
            f"data.eval_data_dir={inputs / 'eval'}"]
    args += [f"resources.{stage}.{key}={value}" for stage in ("finetune", "evaluate", "compare")
             for key, value in (("cpus_per_task", 1), ("gpus_per_node", 0), ("mem_gb", 1), ("time_min", 15))]
    return Study(tmp, inputs, root, args)


# ------------------------------------------------------------------------------------ the cases
# Each case: (arrange the study and return launch.py's arguments, fragments the one line must hold).


def malformed_yaml(study):
    bad = study.inputs / "study.yaml"
    bad.write_text("study:\n  models: [Llama\n")
    return ["--batch-all", "--config-file", str(bad)], ["study.yaml line", "malformed YAML", "fix the syntax there"]


def unknown_key(study):
    study.args.append("finetune.lr=1e-4")
    return ["--batch-all"], ["unknown key finetune.lr", 'did you mean "lora_r"',
                                                 "valid: prompt_template, cutoff_len"]


def wrong_type(study):
    study.args += ["finetune.batch_size=many", "evaluate.tasks={boolq: 1}"]
    return ["--batch-all"], [
        "2 problem(s)", "finetune.batch_size: expected int, got 'many' (str)", "evaluate.tasks: expected a list"]


def model_outside_the_study(study):
    return ["--model", "Qwen", "--config", "best_acc"], ["--model 'Qwen': not in this study's study.models (Llama)",
                                                         "add it there"]


def unknown_model(study):
    return ["--model", "Lama", "--config", "best_acc"], ["--model 'Lama': unknown model", 'did you mean "Llama"',
                                                         "valid: Llama"]


def unknown_config(study):
    return ["--model", "Llama", "--config", "bestacc"], ["--config 'bestacc'", 'did you mean "best_acc"',
                                                         "valid: best_acc, best_ppl"]


def missing_model_folder(study):
    study.args.append("study.models=[Llama,Qwen]")
    return ["--model", "Qwen", "--config", "best_acc"], [
        f"pruned model {study.model('Qwen/best_acc')} does not exist", "set study.pruned_model_path"]


def empty_model_folder(study):
    study.model("Qwen/best_acc").mkdir(parents=True)
    study.args.append("study.models=[Llama,Qwen]")
    return ["--model", "Qwen", "--config", "best_acc"], [
        f"pruned model folder {study.model('Qwen/best_acc')} is empty", "copy or link the checkpoint there"]


def unrecognised_model_folder(study):
    folder = study.model("Qwen/best_acc")
    folder.mkdir(parents=True)
    (folder / "weights.npz").write_bytes(b"\0" * 16)
    study.args.append("study.models=[Llama,Qwen]")
    return ["--model", "Qwen", "--config", "best_acc"], [
        f"{folder} is neither a Hugging Face folder", "nor an LLM-Pruner pickle", "point study.pruned_model_path"]


def pickle_not_opted_in(study):
    folder = study.model("Qwen/best_acc")
    folder.mkdir(parents=True)
    (folder / "pytorch_model.bin").write_bytes(b"PK\0\0")  # never read: the opt-in is checked first
    study.args.append("study.models=[Llama,Qwen]")
    return ["--model", "Qwen", "--config", "best_acc"], [
        "is a pickled checkpoint", "study.allow_pickle=[Qwen/best_acc]", "python launch.py convert --model Qwen"]


def adapter_of_another_base(study):
    """A finished adapter trained on a wider model (gate_proj in_features 32) than this base (16)."""
    from jobs.state import mark_done
    adapter = study.root / "finetuned" / "Llama" / "best_acc_finetuned"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    write_safetensors(adapter / "adapter_model.safetensors", {
        "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight": [8, 32],
        "base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight": [48, 8]})
    mark_done(adapter, ["adapter_config.json", "adapter_model.safetensors"])
    return ["--model", "Llama", "--config", "best_acc", "--stage", "evaluate"], [
        f"adapter {adapter} (Llama/best_acc) does not fit its base model",
        "model.layers.0.mlp.gate_proj: the adapter's in_features is 32, the base model's weight is [48, 16]",
        f"delete {adapter}"]


def missing_offline_dataset(study):
    (study.inputs / "eval" / "hellaswag" / "validation.jsonl").unlink()
    return ["--batch-all", "--stage", "evaluate"], ["evaluation data missing offline (local_files)", "hellaswag",
                                                    "README: Evaluation data"]


def missing_training_data(study):
    study.args.append(f"data.train_path={study.inputs / 'alpaca.json'}")
    return ["--batch-all"], [
        f"training data {study.inputs / 'alpaca.json'} does not exist", "set data.train_path"]


def gpus_beyond_partition(study):
    study.args.append("resources.finetune.gpus_per_node=16")
    return ["--batch-all", "--stage", "finetune"], [
        "finetune on debug: gpus_per_node 16 but its nodes have 4 GPU(s)", "lower resources.finetune.gpus_per_node"]


def results_root_is_a_file(study):
    blocker = study.tmp / "blocker"
    blocker.write_text("a file where the results root's parent should be a folder\n")
    study.args.append(f"study.results_root={blocker / 'results'}")
    return ["--batch-all"], [
        f"results root {blocker / 'results'} is not writable ({blocker} is a file, not a folder)",
        "set study.results_root to a folder you can write"]


def results_root_read_only(study):
    mount = study.tmp / "read-only"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.decode().strip()}")
    study.cleanups.append(lambda: subprocess.run(["umount", str(mount)], check=False))
    study.args.append(f"study.results_root={mount / 'results'}")
    return ["--batch-all"], [
        f"results root {mount / 'results'} is not writable ({mount} is on a read-only file system)"]


def results_root_breaks_sbatch(study):
    root = study.tmp / "my results"
    study.args.append(f"study.results_root={root}")
    return ["--batch-all"], [
        "would break the sbatch script", "set study.results_root to a path without spaces"]


def model_name_with_shell_metacharacters(study):
    return ["--model", "Llama;touch pwned", "--config", "best_acc"], [
        "--model 'Llama;touch pwned': not a valid model name", "letters, digits and . _ - only", "use one of Llama"]


def config_name_with_path_separators(study):
    return ["--model", "Llama", "--config", "../../best_acc"], [
        "--config '../../best_acc': not a valid pruning config name", "use one of best_acc, best_ppl"]


def study_model_with_path_separators(study):
    study.args.append("study.models=[Llama/../../etc]")
    return ["--batch-all"], [
        "study.models: unknown name 'Llama/../../etc'", "valid: Llama"]


def partition_with_a_newline(study):
    study.args.append('resources.finetune.partition="debug\\n#SBATCH --uid=0"')  # YAML's \n: a real newline
    return ["--batch-all"], [
        "resources.finetune.partition: 'debug\\n#SBATCH --uid=0' is not a SLURM name"]


def template_with_an_inline_token(study):
    template = study.inputs / "cluster.yaml"
    template.write_text("setup:\n  - export HF_HUB_OFFLINE=1\n  - export HF_TOKEN=hf_battery_secret\n")
    study.args.append(f"executor.slurm_template={template}")
    return ["--batch-all", "--dry-run"], [
        "setup sets HF_TOKEN to a literal value, which would be copied into every job's submission script",
        "export HF_TOKEN=$(cat ~/.hf_token)"]


def write_manifest(study) -> None:
    from jobs.config import load_config
    from jobs.manifest import new_manifest
    new_manifest(load_config(None, study.args)).save()


def resubmit_indices_out_of_range(study):
    write_manifest(study)
    return ["resubmit", "--indices", "2,7"], ["--indices 2,7: out of range", "indices 0-1",
                                               "see `launch.py status`"]


def cancel_indices_out_of_range(study):
    write_manifest(study)
    return ["cancel", "--indices", "9"], ["--indices 9: out of range"]


def resubmit_without_manifest(study):
    return ["resubmit"], [f"no manifest at {study.root / 'manifest.json'}", "pass study.results_root="]


CASES = [malformed_yaml, unknown_key, wrong_type, unknown_model, model_outside_the_study, unknown_config, missing_model_folder,
         empty_model_folder, unrecognised_model_folder, pickle_not_opted_in, adapter_of_another_base,
         missing_offline_dataset, missing_training_data, results_root_is_a_file, results_root_read_only,
         model_name_with_shell_metacharacters, config_name_with_path_separators, study_model_with_path_separators,
         partition_with_a_newline, resubmit_indices_out_of_range, cancel_indices_out_of_range,
         resubmit_without_manifest]
SLURM_ONLY = [gpus_beyond_partition, results_root_breaks_sbatch, template_with_an_inline_token]
MONITOR_COMMANDS = ("resubmit", "cancel")


def tree(folder: Path) -> dict[str, int]:
    """Every path below ``folder`` with its size (a mount point's contents are skipped)."""
    return {str(path.relative_to(folder)): path.lstat().st_size for path in folder.rglob("*")
            if not path.parent.name == "read-only"}


def run_case(case, tmp_path: Path, executor: str, env: dict[str, str] | None = None) -> None:
    study = make_study(tmp_path)
    try:
        command, fragments = case(study)
        before = tree(tmp_path)
        argv = [*command, *study.args]
        if command[0] not in MONITOR_COMMANDS:
            argv += ["--executor", executor]
        result = subprocess.run([sys.executable, str(REPO / "launch.py"), *argv], cwd=REPO, capture_output=True,
                                text=True, timeout=120, env=env)
        assert_one_line_error(result, *fragments)
        assert tree(tmp_path) == before, "bad input wrote something"
    finally:
        for cleanup in study.cleanups:
            cleanup()


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_bad_input_local(case, tmp_path):
    run_case(case, tmp_path, "local")


# ------------------------------------------------------------------------------------ real SLURM

@pytest.fixture(scope="module")
def cluster():
    from tests.slurm_cluster import cluster_unavailable, start_cluster, stop_cluster
    reason = cluster_unavailable()
    if reason:
        pytest.skip(reason)
    conf = start_cluster()
    yield {**os.environ, "SLURM_CONF": conf}
    stop_cluster()


def jobs_since(env: dict[str, str], start: str) -> tuple[str, str]:
    queued = subprocess.run(["squeue", "-h", "-o", "%i %j"], env=env, capture_output=True, text=True, check=True)
    recorded = subprocess.run(["sacct", "-X", "-n", "-P", "-S", start, "-o", "JobID,JobName"], env=env,
                              capture_output=True, text=True, check=True)
    return queued.stdout.strip(), recorded.stdout.strip()


@pytest.mark.slurm
@pytest.mark.parametrize("case", CASES + SLURM_ONLY, ids=[case.__name__ for case in CASES + SLURM_ONLY])
def test_bad_input_submits_nothing_to_slurm(case, tmp_path, cluster):
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 1))
    run_case(case, tmp_path, "slurm", env=cluster)
    assert jobs_since(cluster, start) == ("", ""), "bad input reached the scheduler"


@pytest.mark.parametrize("executor", ["local", pytest.param("slurm", marks=pytest.mark.slurm)])
def test_the_good_study_passes_the_same_checks(executor, tmp_path, request, monkeypatch):
    """The battery's study itself passes every check a submission runs, so each case fails for its own reason."""
    from jobs.check import require_ready
    from jobs.config import load_config
    from jobs.plan import build_plan
    from jobs.study import select_pairs
    if executor == "slurm":
        monkeypatch.setenv("SLURM_CONF", request.getfixturevalue("cluster")["SLURM_CONF"])
    config = load_config(None, make_study(tmp_path).args)
    plan = build_plan(config, select_pairs(config), "all")
    require_ready(config, plan, executor, dry_run=False)  # raises InputError on the first failure


def test_tokens_in_the_environment_stay_out_of_scripts_and_manifest(tmp_path):
    """SLURM passes the user's environment to the job; nothing PruneTune writes may carry it (dry run: the exact
    sbatch scripts a submission sends)."""
    study = make_study(tmp_path)
    secret = "hf_battery_secret_0123456789"
    env = {**os.environ, "HF_TOKEN": secret, "WANDB_API_KEY": secret}
    result = subprocess.run([sys.executable, str(REPO / "launch.py"), "--batch-all", "--dry-run", "--executor",
                             "slurm", *study.args], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    written = [path for path in study.root.rglob("*") if path.is_file()]
    assert any(path.suffix == ".sbatch" for path in written), written
    assert not [path for path in written if secret in path.read_text(errors="replace")]
    assert secret not in result.stdout + result.stderr
