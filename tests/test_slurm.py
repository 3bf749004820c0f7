"""The study on a real single-node SLURM (slurmctld, slurmd, slurmdbd, munge, MariaDB on loopback).

Deselect with ``-m "not slurm"`` where there is no root or no Debian SLURM packages.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.config import load_config
from jobs.manifest import load_manifest
from jobs.state import is_done
from jobs.study import Pair, StudyPaths, select_pairs
from tests.cli_helpers import assert_one_line_error
from tests.slurm_cluster import (REPO, cluster_unavailable, launch, sacct_times, start_cluster, stop_cluster,
                                 wait_for_study, wait_until)

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def cluster():
    reason = cluster_unavailable()
    if reason:
        pytest.skip(reason)
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = start_cluster()
    yield
    stop_cluster()
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous


def study_args(root: Path) -> list[str]:
    """The demo study, 4 pairs (one of them the pickled checkpoint), sized for a 2-core test node."""
    resources = [f"resources.{stage}.{key}={value}" for stage in ("finetune", "evaluate", "compare")
                 for key, value in (("cpus_per_task", 1), ("gpus_per_node", 0), ("mem_gb", 1), ("time_min", 15))]
    return ["--config-file", "configs/demo.yaml", f"study.results_root={root}", "study.models=[Llama, Qwen]",
            "executor.kind=slurm", "executor.array_parallelism=2", "evaluate.limit=10", *resources]


def make_study(root: Path):
    args = study_args(root)
    config = load_config(REPO / "configs" / "demo.yaml", [arg for arg in args if "=" in arg and not arg.startswith("-")])
    from workers.demo_inputs import generate_demo_inputs
    generate_demo_inputs(config)
    return config, args


def test_study_completes_with_per_index_dependencies(cluster, tmp_path):
    root = tmp_path / "study"
    config, args = make_study(root)

    dry = launch("--batch-all", "--stage", "all", "--dry-run", *args)
    assert dry.returncode == 0, dry.stderr
    dry_scripts = {path.stem: path.read_text() for path in (root / "logs" / "dry_run").glob("*.sbatch")}
    assert set(dry_scripts) == {"finetune", "evaluate_pruned", "evaluate_finetuned", "compare"}
    assert "#SBATCH --array=0-3%2" in dry_scripts["finetune"]
    assert not (root / "manifest.json").exists()

    submitted = launch("--batch-all", "--stage", "all", *args)
    assert submitted.returncode == 0, submitted.stderr
    manifest = load_manifest(root)
    arrays = {array.name: array for array in manifest.attempts[0].arrays}
    assert arrays["evaluate_finetuned"].depends_on == (f"aftercorr:{arrays['finetune'].job_id}",)
    assert {clause.split(":")[1] for clause in arrays["compare"].depends_on} == {
        arrays["evaluate_pruned"].job_id, arrays["evaluate_finetuned"].job_id}
    early = launch("status", *args)
    assert early.returncode == 0, early.stderr
    assert re.search(r"PENDING|RUNNING", early.stdout), early.stdout

    rows = wait_for_study(root)
    bad = [(row.pair, row.stage, row.state, row.log) for row in rows if not row.done]
    assert not bad, bad
    final = launch("status", *args)
    assert "COMPLETED 13" in final.stdout, final.stdout

    paths = StudyPaths(config)
    for pair in select_pairs(config):
        for folder in (paths.finetuned_dir(pair), paths.baseline_eval_dir(pair), paths.finetuned_eval_dir(pair)):
            assert is_done(folder, verify_checksums=True), folder
        assert (paths.finetuned_eval_dir(pair) / "comparison_report.txt").is_file()
    assert "Pairs compared: 4. Missing: 0." in paths.study_summary().read_text()

    # Each evaluation started only after its own finetune ended (aftercorr)...
    finetune, evaluate = arrays["finetune"].job_id, arrays["evaluate_finetuned"].job_id
    times = sacct_times([finetune, evaluate])
    for index in range(4):
        assert times[f"{evaluate}_{index}"][1] >= times[f"{finetune}_{index}"][2]
    # ... and the first evaluation did not wait for the other finetunes to end.
    assert times[f"{evaluate}_0"][1] < max(times[f"{finetune}_{index}"][2] for index in range(4))

    # --dry-run rendered exactly what was submitted, but for the job ids it could not know.
    for name, array in arrays.items():
        submitted_text = next(Path(array.sbatch_file).glob("*_submission.sh")).read_text()
        expected = dry_scripts[name]
        for other in arrays.values():
            expected = expected.replace(f"JOBID_{other.name}", other.job_id)
        assert submitted_text == expected, name


def test_failures_are_resubmitted_by_index(cluster, tmp_path):
    root = tmp_path / "study"
    config, args = make_study(root)
    paths = StudyPaths(config)
    broken, cancelled = Pair("Llama", "best_acc"), Pair("Qwen", "best_acc")
    weights = paths.pruned_model(broken) / "model.safetensors"
    shutil.copy(weights, tmp_path / "good.safetensors")
    weights.write_bytes(b"not a safetensors file, but the login-node check only looks at names")

    submitted = launch("--batch-all", "--stage", "all", *args)
    assert submitted.returncode == 0, submitted.stderr
    manifest = load_manifest(root)
    finetune = next(array for array in manifest.attempts[0].arrays if array.name == "finetune")
    index = finetune.pairs.index(cancelled.slug)
    task = f"{finetune.job_id}_{index}"

    def running():
        states = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T"], capture_output=True, text=True).stdout
        return f"{task} RUNNING" in states
    wait_until(running, 300, interval=0.3, what=f"{task} to run")
    subprocess.run(["scancel", task], check=True)

    rows = wait_for_study(root)
    state = {(row.pair, row.stage): row.state for row in rows}
    assert state[(broken, "finetune")] == "FAILED"
    assert state[(broken, "evaluate_finetuned")] == "CANCELLED"  # its dependency failed
    assert state[(cancelled, "finetune")] == "CANCELLED"
    assert state[(Pair("Qwen", "best_ppl"), "evaluate_finetuned")] == "COMPLETED"

    shutil.copy(tmp_path / "good.safetensors", weights)  # the user fixes the broken checkpoint
    recipe = launch("resubmit", *args, "finetune.learning_rate=1e-3")
    assert_one_line_error(recipe, "finetune.learning_rate=0.001 differs", "only resources.* and executor.*")
    again = launch("resubmit", *args, "resources.finetune.time_min=17")  # more time for the retry
    assert again.returncode == 0, again.stderr
    assert "resubmitting indices 0,2" in again.stdout, again.stdout
    manifest = load_manifest(root)
    assert len(manifest.attempts) == 2
    assert manifest.study_config().resources.finetune.time_min == 17
    retry_finetune = manifest.attempts[1].arrays[0]
    assert retry_finetune.name == "finetune"
    script = Path(retry_finetune.sbatch_file) / f"{retry_finetune.job_id}_submission.sh"
    assert "#SBATCH --time=17" in script.read_text()
    retry = {array.name: array for array in manifest.attempts[1].arrays}
    assert retry["finetune"].pairs == (broken.slug, cancelled.slug)  # only the failed indices
    assert "Qwen__best_ppl" not in json.dumps([array.pairs for array in manifest.attempts[1].arrays])

    rows = wait_for_study(root)
    assert all(row.done for row in rows), [(row.pair, row.stage, row.state) for row in rows if not row.done]
    assert "Pairs compared: 4. Missing: 0." in paths.study_summary().read_text()
    nothing = launch("resubmit", *args)
    assert "nothing to resubmit" in nothing.stdout


def test_resubmit_without_manifest_is_a_clear_error(cluster, tmp_path):
    result = launch("resubmit", f"study.results_root={tmp_path}")
    assert result.returncode == 2 and "no manifest" in result.stderr


def test_cancel_stops_the_study_and_status_says_so(cluster, tmp_path):
    root = tmp_path / "study"
    _, args = make_study(root)
    args = [arg if arg != "study.models=[Llama, Qwen]" else "study.models=[Qwen]" for arg in args]
    submitted = launch("--batch-all", "--stage", "all", *args)
    assert submitted.returncode == 0, submitted.stderr
    cancelled = launch("cancel", *args)
    assert cancelled.returncode == 0, cancelled.stderr
    assert re.search(r"cancelled [1-9]\d* task\(s\)", cancelled.stdout), cancelled.stdout
    rows = wait_for_study(root, timeout=120)
    assert not any(row.active for row in rows)
    assert {row.state for row in rows if row.stage == "finetune"} <= {"CANCELLED", "COMPLETED"}
    assert any(row.state == "CANCELLED" for row in rows)


def test_a_submission_that_fails_half_way_takes_back_what_it_submitted(cluster, tmp_path):
    """The controller accepts the finetune array, then refuses the next one (as a MaxSubmitJobs limit would):
    nothing may be left in the queue outside a manifest. The refusal comes from a wrapper in front of the
    real sbatch; the first submission and the cancellation are real."""
    root = tmp_path / "study"
    _, args = make_study(root)
    wrapper = tmp_path / "bin" / "sbatch"
    wrapper.parent.mkdir()
    count = tmp_path / "sbatch_calls"
    wrapper.write_text(f"""#!/bin/sh
case " $* " in *" --test-only "*) exec '{shutil.which("sbatch")}' "$@" ;; esac  # `check`'s dry runs pass
echo x >> '{count}'
if [ "$(wc -l < '{count}')" -ge 2 ]; then
  echo "sbatch: error: Batch job submission failed: Job violates accounting/QOS policy (job submit limit)" >&2
  exit 1
fi
exec '{shutil.which("sbatch")}' "$@"
""")
    wrapper.chmod(0o755)
    environment = {**os.environ, "PATH": f"{wrapper.parent}:{os.environ['PATH']}"}
    failed = subprocess.run([sys.executable, str(REPO / "launch.py"), "--batch-all", "--stage", "all", *args],
                            cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0
    last = failed.stderr.strip().splitlines()[-1]  # after sbatch's own message, which submitit passes through
    assert "submitting evaluate_pruned failed" in last, failed.stderr
    match = re.search(r"the arrays already submitted \(([0-9]+)\) were cancelled", last)
    assert match, last
    queued = subprocess.run(["squeue", "-h", "-o", "%i", "-j", match.group(1)], capture_output=True, text=True)
    assert queued.stdout.strip() == ""  # the finetune array is gone from the queue
    assert not (root / "manifest.json").exists()
