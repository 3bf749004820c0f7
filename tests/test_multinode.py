"""The study on a real two-node SLURM: finetunes that span both nodes, and a node that dies mid-finetune.

The cluster is ``scripts/local_slurm.sh --nodes 2``: two network namespaces, each a node with its own slurmd,
hostname and address, beside the single-node test cluster (own state folder and ports, see
tests/slurm_cluster.py). A finetune with ``resources.finetune.nodes=2`` and no GPUs runs one rank per node,
two ranks over gloo (DeepSpeed ZeRO-2, finetune.deepspeed=auto). A crashed node recovers through SLURM's own
requeue of the NODE_FAIL'd task (jobs stay requeueable, see jobs/slurm.py: submission_flags). Skipped without
root or SLURM; deselect with ``-m "not slurm"``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from jobs.manifest import load_manifest
from jobs.state import is_done
from jobs.study import Pair, StudyPaths
from tests.slurm_cluster import (MULTI_PORT_BASE, MULTI_STATE_DIR, cluster_unavailable, launch, node_command,
                                 sacct_times, start_cluster, stop_cluster, wait_for_study, wait_until)

pytestmark = pytest.mark.slurm

PAIR = Pair("Llama", "best_acc")
WORDS = "one two three four five six seven eight nine ten".split()


@pytest.fixture(scope="module")
def two_nodes():
    reason = cluster_unavailable(nodes=2)
    if reason:
        pytest.skip(reason)
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = start_cluster(MULTI_STATE_DIR, MULTI_PORT_BASE, nodes=2)
    yield
    stop_cluster(MULTI_STATE_DIR, MULTI_PORT_BASE)
    if saved is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = saved


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_assets(tmp_path_factory.mktemp("assets"))


def build_assets(root: Path) -> Path:
    """A tiny Llama, its tokenizer, 80 learnable Alpaca rows and small evaluation files under ``root``."""
    import random

    from tests.tiny_assets import build_tiny_llama, build_tiny_tokenizer
    from workers.eval_data_demo import write_demo_eval_data

    build_tiny_llama(root / "pruned", build_tiny_tokenizer(root / "tokenizer"))
    chooser = random.Random(0)
    rows = []
    for index in range(80):
        word = chooser.choice(WORDS)
        rows.append({"instruction": f"Repeat the word {word}.", "input": "" if index % 2 else "twice",
                     "output": f"{word} {word}"})
    (root / "alpaca.json").write_text(json.dumps(rows))
    write_demo_eval_data(root / "eval_data", docs_per_task=10, ppl_text_lines=60)
    return root


def study_args(root: Path, assets: Path, nodes: int, *extra: str) -> list[str]:
    """Llama's two pairs (one model folder for both), sized so that 1 and 2 ranks take the same steps.

    80 rows - 8 for validation = 72 = 36 micro-batches of 2: one rank accumulates 4 per optimizer step,
    each of two ranks 2, so every step sees the same 8 sequences either way. No LoRA dropout: its random
    masks would differ between the layouts."""
    resources = [f"resources.{stage}.{key}={value}" for stage in ("finetune", "evaluate", "compare")
                 for key, value in (("cpus_per_task", 1), ("gpus_per_node", 0), ("mem_gb", 1), ("time_min", 15))]
    return [f"study.results_root={root}", f"study.pruned_model_path={assets / 'pruned'}",
            f"data.train_path={assets / 'alpaca.json'}", f"data.eval_data_dir={assets / 'eval_data'}",
            "study.models=[Llama]", "executor.kind=slurm", "executor.array_parallelism=2",
            "finetune.learning_rate=5e-3", "finetune.batch_size=8", "finetune.micro_batch_size=2",
            "finetune.num_epochs=2", "finetune.logging_steps=1", "finetune.eval_steps=6", "finetune.cutoff_len=64",
            "finetune.lora_dropout=0", "evaluate.tasks=[boolq]", "evaluate.ppl_datasets=[wikitext2]",
            "evaluate.limit=5", *resources, f"resources.finetune.nodes={nodes}", *extra]


def crash_study_args(root: Path, assets: Path) -> list[str]:
    """One pair, the whole study (finetune, both evaluations, compare); 54 steps with a checkpoint every 3."""
    return study_args(root, assets, 2, "study.pruning_configs=[best_acc]", "finetune.num_epochs=6",
                      "finetune.checkpoint_steps=3")


def loss_lines(folder: Path) -> list[tuple[str, int, float]]:
    """(kind, step, loss) of every training and evaluation line of training_log.txt."""
    found = re.findall(r"^step (\d+)/\d+ epoch \S+ (loss|eval_loss) (\S+)", (folder / "training_log.txt").read_text(),
                       flags=re.MULTILINE)
    return [(kind, int(step), float(loss)) for step, kind, loss in found]


def task_logs(root: Path) -> str:
    return "".join(path.read_text(errors="replace") for path in sorted((root / "logs" / "submitit").glob("*/*_log.err")))


def test_finetunes_span_two_nodes_and_match_one_node(two_nodes, assets, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    two_args = study_args(two, assets, 2)
    one_args = study_args(one, assets, 1, "study.pruning_configs=[best_acc]")
    for args in (two_args, one_args):
        submitted = launch("--batch-all", "--stage", "finetune", *args)
        assert submitted.returncode == 0, submitted.stderr
    for root in (two, one):
        rows = wait_for_study(root, 600, interval=1)
        assert all(row.done for row in rows if row.stage == "finetune"), [(row.pair, row.state, row.log) for row in rows]

    status = launch("status", *two_args)
    finetune_rows = [line for line in status.stdout.splitlines() if " finetune " in line]
    assert len(finetune_rows) == 2 and all("COMPLETED" in line and "node[1-2]" in line for line in finetune_rows), \
        status.stdout
    # Both array tasks ran on both nodes at the same time, so their rendezvous ports had to differ.
    array = load_manifest(two).attempts[0].arrays[0]
    times = sacct_times([array.job_id])
    first, second = times[f"{array.job_id}_0"], times[f"{array.job_id}_1"]
    assert first[1] < second[2] and second[1] < first[2], times
    rendezvous = re.findall(r"rank 0 of 2 \(local 0 of 1, from submitit\), gloo process group via (\S+):(\d+)",
                            task_logs(two))
    assert len(rendezvous) == 2 and {host for host, _ in rendezvous} == {"node1"}, rendezvous
    assert len({port for _, port in rendezvous}) == 2, rendezvous

    reference = StudyPaths(load_manifest(one).study_config()).finetuned_dir(PAIR)
    expected = json.loads((reference / "finetuning_config.json").read_text())
    expected_losses = loss_lines(reference)
    config = load_manifest(two).study_config()
    for pair in (PAIR, Pair("Llama", "best_ppl")):
        folder = StudyPaths(config).finetuned_dir(pair)
        record = json.loads((folder / "finetuning_config.json").read_text())
        assert (record["derived"]["world_size"], record["derived"]["process_group_backend"]) == (2, "gloo")
        assert expected["derived"]["world_size"] == 1
        for key in ("train_examples", "val_examples", "total_optimizer_steps", "sequences_per_optimizer_step"):
            assert record["derived"][key] == expected["derived"][key], key
        assert record["metrics"]["optimizer_steps"] == expected["metrics"]["optimizer_steps"] == 18
        # Same data order: the same sequences in every optimizer step give the same loss, step by step.
        losses = loss_lines(folder)
        assert [(kind, step) for kind, step, _ in losses] == [(kind, step) for kind, step, _ in expected_losses]
        for (kind, step, got), (_, _, want) in zip(losses, expected_losses):
            tolerance = 1e-3 if kind == "loss" else 1e-2  # eval: each rank averages its own half of the batches
            assert abs(got - want) <= tolerance, (pair, kind, step, got, want)
        assert_same_adapter(folder, reference)
        # Rank 0 alone wrote: no stray files, and one "saved" line, in rank 0's log.
        assert sorted(path.name for path in folder.iterdir()) == sorted(
            ["adapter_model.safetensors", "adapter_config.json", "finetuning_config.json", "training_log.txt",
             "DONE.json"])
    saves = [path for path in (two / "logs" / "submitit").glob("*/*_log.err") if "adapter and records saved" in
             path.read_text(errors="replace")]
    assert sorted(path.name.split("_")[-2] for path in saves) == ["0", "0"], saves  # <job>_<index>_<rank>_log.err


def assert_same_adapter(folder: Path, reference: Path) -> None:
    """Two ranks (ZeRO-2, 2 accumulation steps each) train the adapter one process (4 steps) trains."""
    import torch
    from safetensors.torch import load_file

    got, want = (load_file(path / "adapter_model.safetensors") for path in (folder, reference))
    assert got.keys() == want.keys() and got
    largest = max(tensor.abs().max().item() for tensor in want.values())
    for name, tensor in want.items():
        assert torch.allclose(got[name], tensor, rtol=0, atol=1e-4 * largest), name


def finetune_runs(job_id: str) -> list[str]:
    """``<task id>|<state>`` of every run of the finetune job, oldest first (sacct --duplicates)."""
    return subprocess.run(["sacct", "-X", "-n", "-P", "--duplicates", "-o", "JobID,State", "-j", job_id],
                          capture_output=True, text=True, check=True).stdout.split()


def finetune_line(args: list[str], pattern: str) -> str | None:
    """The finetune line of `launch.py status` when its state cell matches ``pattern``."""
    found = re.search(rf"^.* finetune +{pattern} .*$", launch("status", *args).stdout, flags=re.MULTILINE)
    return found[0] if found else None


def test_node_crash_mid_finetune_is_requeued_by_slurm_and_resumes(two_nodes, assets, tmp_path):
    """SLURM requeues the NODE_FAIL'd finetune itself (sbatch's default --requeue, JobRequeue=1): the same task id
    runs again once node2 is back and resumes from its last checkpoint; no `resubmit`, no second attempt."""
    root = tmp_path / "study"
    args = crash_study_args(root, assets)
    submitted = launch("--batch-all", "--stage", "all", *args)
    assert submitted.returncode == 0, submitted.stderr
    config = load_manifest(root).study_config()
    folder = StudyPaths(config).finetuned_dir(PAIR)
    finetune_job = next(array.job_id for array in load_manifest(root).attempts[0].arrays if array.name == "finetune")

    wait_until(lambda: finetune_step(folder) >= 4, 300, interval=0.1, what="the finetune to pass its first checkpoint")
    node_command("crash-node", "node2")
    crashed_at = time.monotonic()

    # For a few seconds sacct's newest record is the NODE_FAIL, then accounting has the requeued run as well.
    shown = wait_until(lambda: finetune_line(args, r"(NODE_FAIL|PENDING \(requeued after NODE_FAIL\))"), 90,
                       interval=0.5, what="status to show the NODE_FAIL")
    detected = time.monotonic() - crashed_at
    assert "NODE_FAIL" in shown and ("node[1-2]" in shown or "requeued" in shown), shown
    wait_until(lambda: finetune_line(args, r"PENDING \(requeued after NODE_FAIL\)"), 60, interval=0.5,
               what="status to show the finetune requeued")
    requeued = time.monotonic() - crashed_at
    # node2 is down, so the requeued run cannot start: progress.json still holds the crashed run's last step.
    last_step = finetune_step(folder)
    assert 4 <= last_step < 54
    assert finetune_runs(finetune_job) == [f"{finetune_job}|NODE_FAIL", f"{finetune_job}|PENDING"]
    assert not is_done(folder)  # the crashed run wrote no results
    # One writer: resubmit leaves the requeued task alone.
    again = launch("resubmit", *args)
    assert again.returncode == 0 and "nothing to resubmit" in again.stdout, (again.stdout, again.stderr)
    assert len(load_manifest(root).attempts) == 1

    node_command("restart-node", "node2")
    rows = wait_for_study(root, 600, interval=1)
    complete = time.monotonic() - crashed_at
    print(f"node crash at step {last_step} of 54: NODE_FAIL in status after {detected:.1f} s, requeued after "
          f"{requeued:.1f} s, study complete after {complete:.1f} s")
    assert all(row.done for row in rows), [(row.stage, row.state, row.log) for row in rows if not row.done]
    finetune_row = next(row for row in rows if row.stage == "finetune")
    assert (finetune_row.state, finetune_row.attempt, finetune_row.nodes, finetune_row.restarts,
            finetune_row.requeued_after) == ("COMPLETED", 1, "node[1-2]", 1, "NODE_FAIL")
    assert finetune_runs(finetune_job) == [f"{finetune_job}|NODE_FAIL", f"{finetune_job}|COMPLETED"]
    assert len(load_manifest(root).attempts) == 1
    assert finetune_line(args, r"COMPLETED \(1 requeue\)")
    assert is_done(folder, verify_checksums=True)
    assert "Pairs compared: 1. Missing: 0." in StudyPaths(config).study_summary().read_text()

    # Written once: one "saved" line over both runs' logs (submitit opens them in append mode, so the crashed
    # run's lines are kept: two rendezvous lines), every step once in the training log.
    logs = task_logs(root)
    assert logs.count("rank 0 of 2 (local 0 of 1, from submitit)") == 2
    assert logs.count(f"{PAIR.label}: adapter and records saved") == 1
    steps = [step for kind, step, _ in loss_lines(folder) if kind == "loss"]
    assert steps == list(range(1, 55)), steps
    record = json.loads((folder / "finetuning_config.json").read_text())
    assert record["metrics"]["optimizer_steps"] == 54
    # Resumed from the last checkpoint (every 3 steps), not from the start: at most 3 steps done twice.
    resumed = record["derived"]["resumed_from_step"]
    assert 3 <= resumed <= last_step and resumed % 3 == 0 and last_step - resumed <= 3, (resumed, last_step)
    assert record["derived"]["slurm_restart_count"] == 1
    assert f"resumed from checkpoint-{resumed}" in (folder / "training_log.txt").read_text()
    assert f"resuming from {folder / 'checkpoints' / f'checkpoint-{resumed}'}" in logs


def finetune_step(folder: Path) -> int:
    """The optimizer step a running finetune last reported in its progress.json (0 before the first)."""
    try:
        return json.loads((folder / "progress.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0
