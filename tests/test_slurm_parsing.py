"""Narrow unit tests of the SLURM boundary with recorded sacct output (the real cluster is in test_slurm.py)."""
import pytest

from jobs import monitor, slurm
from jobs.config import load_config
from jobs.manifest import load_manifest, new_manifest
from jobs.plan import build_plan
from jobs.state import mark_done
from jobs.study import Pair, StudyPaths, select_pairs

# Recorded from Slurm 22.05 (sacct -X -n -P --format=JobID,State,ExitCode,Elapsed,NodeList,Start,End).
RECORDED = """\
41_0|COMPLETED|0:0|00:00:09|vm|2026-11-28T02:10:01|2026-11-28T02:10:10
41_1|FAILED|1:0|00:00:07|vm|2026-11-28T02:10:01|2026-11-28T02:10:08
41_2|CANCELLED by 0|0:15|00:00:03|vm|2026-11-28T02:10:09|2026-11-28T02:10:12
41_[3-5%2]|PENDING|0:0|00:00:00|None assigned|Unknown|Unknown
42|RUNNING|0:0|00:00:05|vm|2026-11-28T02:10:05|Unknown
43_7|TIMEOUT|0:0|00:15:00|node[01-02]|2026-11-28T02:10:05|2026-11-28T02:25:05
"""


def test_parse_sacct_arrays_ranges_and_plain_jobs():
    states = slurm.parse_sacct(RECORDED)
    assert states[("41", 0)].state == "COMPLETED"
    assert states[("41", 1)] == slurm.TaskState("FAILED", "1:0", "00:00:07", "vm")
    assert states[("41", 2)].state == "CANCELLED"  # "CANCELLED by 0" -> CANCELLED
    assert [states[("41", index)].state for index in (3, 4, 5)] == ["PENDING"] * 3
    assert states[("41", 3)].nodes == ""
    assert states[("42", None)].state == "RUNNING"
    assert states[("43", 7)].nodes == "node[01-02]"


def test_expand_ranges():
    assert slurm.expand_ranges("0-2,5,7-8%4") == [0, 1, 2, 5, 7, 8]


def test_dependency_of_a_one_task_array_is_afterok(tmp_path):
    config = load_config(None, [f"study.results_root={tmp_path}"])
    plan = build_plan(config, select_pairs(config, "Llama", "best_acc"), "all")
    submitted = {"finetune": slurm.SubmittedArray("finetune", "finetune", "7", ("Llama__best_acc",), ())}
    # submitit submits a one-task array as a plain job: aftercorr on it becomes afterok.
    assert slurm.render_dependency(plan.array("evaluate_finetuned"), submitted, plan) == "afterok:7"
    plan = build_plan(config, select_pairs(config), "all")
    assert slurm.render_dependency(plan.array("evaluate_finetuned"), submitted, plan) == "aftercorr:7"


@pytest.fixture
def study(tmp_path, monkeypatch):
    config = load_config(None, [f"study.results_root={tmp_path}", "study.models=[Llama]"])
    manifest = new_manifest(config)
    manifest.add_attempt([
        slurm.SubmittedArray("finetune", "finetune", "41", ("Llama__best_acc", "Llama__best_ppl"), ()),
        slurm.SubmittedArray("evaluate_pruned", "evaluate_pruned", "42", ("Llama__best_acc", "Llama__best_ppl"), ()),
        slurm.SubmittedArray("evaluate_finetuned", "evaluate_finetuned", "44", ("Llama__best_acc", "Llama__best_ppl"),
                             ("aftercorr:41",)),
        slurm.SubmittedArray("compare", "compare", "45", (), ("afterany:42", "afterany:44"))], "submit")
    manifest.save()
    return config, manifest


def test_manifest_round_trip(study):
    config, manifest = study
    loaded = load_manifest(config.study.results_root)
    assert loaded.attempts[0].arrays == manifest.attempts[0].arrays
    assert loaded.study_config() == config
    assert loaded.latest_tasks()[("Llama__best_ppl", "evaluate_finetuned")][1] == 1


def test_status_classifies_from_one_query(study, monkeypatch):
    config, manifest = study
    paths = StudyPaths(config)
    finished = paths.finetuned_dir(Pair("Llama", "best_acc"))
    finished.mkdir(parents=True)
    (finished / "adapter_config.json").write_text("{}")
    mark_done(finished, ["adapter_config.json"])
    recorded = {("41", 0): slurm.TaskState("COMPLETED"), ("41", 1): slurm.TaskState("COMPLETED"),
                ("42", 0): slurm.TaskState("RUNNING"), ("42", 1): slurm.TaskState("PENDING"),
                ("44", 0): slurm.TaskState("FAILED")}
    queries = []
    monkeypatch.setattr(slurm, "query_states", lambda ids: (queries.append(ids), (recorded, "sacct"))[1])
    rows, _ = monitor.collect(manifest, config)
    state = {(row.pair.label if row.pair else "study", row.stage): row.state for row in rows}
    assert len(queries) == 1 and queries[0] == ["41", "42", "44", "45"]
    assert state[("Llama/best_acc", "finetune")] == "COMPLETED"
    assert state[("Llama/best_ppl", "finetune")] == "incomplete"  # COMPLETED, outputs missing
    assert state[("Llama/best_ppl", "evaluate_finetuned")] == "CANCELLED"  # no record, array known
    assert state[("study", "compare")] == "CANCELLED"  # neither sacct nor squeue knows job 45
    needs = {row.pair.label for row in rows if row.pair and monitor.needs_rerun(row)}
    assert needs == {"Llama/best_acc", "Llama/best_ppl"}


def test_without_sacct_a_missing_task_is_unknown(study, monkeypatch):
    config, manifest = study
    monkeypatch.setattr(slurm, "query_states", lambda ids: ({("41", 0): slurm.TaskState("RUNNING")}, "squeue"))
    rows, _ = monitor.collect(manifest, config)
    state = {(row.pair.label if row.pair else "study", row.stage): row.state for row in rows}
    assert state[("Llama/best_acc", "finetune")] == "RUNNING"
    assert state[("study", "compare")] == "UNKNOWN"  # squeue alone cannot tell finished from cancelled


# Recorded on the two-node test cluster (scripts/local_slurm.sh start --nodes 2) with
# `sacct -X -n -P --duplicates --format=JobID,State,ExitCode,Elapsed,NodeList,Start,End,Submit`: an array of
# three 2-node tasks (%2), node2 crashed. ~1 s after the NODE_FAIL accounting has only the failed runs ...
NODE_FAIL_BEFORE_REQUEUE = """\
2_0|NODE_FAIL|0:0|00:00:13|node[1-2]|2026-11-28T04:55:21|2026-11-28T04:55:34|2026-11-28T04:55:21
2_1|NODE_FAIL|0:0|00:00:13|node[1-2]|2026-11-28T04:55:21|2026-11-28T04:55:34|2026-11-28T04:55:21
2_2|PENDING|0:0|00:00:00|None assigned|Unknown|Unknown|2026-11-28T04:55:21
"""
# ... while the controller has already requeued them (`squeue -h -r -o '%i|%T|%r'`, the same moment) ...
SQUEUE_AT_NODE_FAIL = """\
2_1|PENDING|BeginTime
2_0|PENDING|BeginTime
2_2|PENDING|Nodes required for job are DOWN, DRAINED or reserved for jobs in higher priority partitions
"""
# ... and ~2 s later the requeued runs, same task ids, stamped with the requeue time as Submit.
REQUEUED_AFTER_NODE_FAIL = NODE_FAIL_BEFORE_REQUEUE + """\
2_0|PENDING|0:0|00:00:00|None assigned|Unknown|Unknown|2026-11-28T04:55:34
2_1|PENDING|0:0|00:00:00|None assigned|Unknown|Unknown|2026-11-28T04:55:34
"""


def test_the_newest_run_of_a_requeued_task_is_its_state():
    states = slurm.parse_sacct(REQUEUED_AFTER_NODE_FAIL)
    assert states[("2", 0)] == slurm.TaskState("PENDING", "0:0", "00:00:00", "", restarts=1, requeued_after="NODE_FAIL")
    assert states[("2", 1)].state == "PENDING" and states[("2", 1)].restarts == 1
    assert states[("2", 2)] == slurm.TaskState("PENDING", "0:0", "00:00:00", "")  # never ran: no restart
    # The newest run is the one with the latest Submit, whatever order sacct lists them in.
    reordered = "".join(reversed(REQUEUED_AFTER_NODE_FAIL.splitlines(keepends=True)))
    assert slurm.parse_sacct(reordered) == states
    # Finished after the requeue: the newest run's state, and the count of runs before it.
    finished = REQUEUED_AFTER_NODE_FAIL.replace(
        "2_0|PENDING|0:0|00:00:00|None assigned|Unknown|Unknown",
        "2_0|COMPLETED|0:0|00:01:10|node[1-2]|2026-11-28T04:55:50|2026-11-28T04:57:00")
    assert slurm.parse_sacct(finished)[("2", 0)] == slurm.TaskState(
        "COMPLETED", "0:0", "00:01:10", "node[1-2]", restarts=1, requeued_after="NODE_FAIL")


def test_one_duplicates_query_per_poll(monkeypatch):
    calls = []
    monkeypatch.setattr(slurm, "_run", lambda command, timeout=60: (calls.append(command), REQUEUED_AFTER_NODE_FAIL)[1])
    states, source = slurm.query_states(["2"])
    assert source == "sacct" and len(calls) == 1
    assert calls[0][0] == "sacct" and "--duplicates" in calls[0]
    assert "--format=" + ",".join(slurm.SACCT_FIELDS) in calls[0]
    assert states[("2", 0)].restarts == 1


@pytest.fixture
def requeued_study(tmp_path):
    """A study whose two finetunes (tasks 2_0 and 2_1 of the recording) went NODE_FAIL on a two-node cluster."""
    config = load_config(None, [f"study.results_root={tmp_path}", "study.models=[Llama]"])
    manifest = new_manifest(config)
    pairs = ("Llama__best_acc", "Llama__best_ppl")
    manifest.add_attempt([
        slurm.SubmittedArray("finetune", "finetune", "2", pairs, ()),
        slurm.SubmittedArray("evaluate_finetuned", "evaluate_finetuned", "3", pairs, ("aftercorr:2",)),
        slurm.SubmittedArray("compare", "compare", "4", (), ("afterany:3",))], "submit")
    manifest.save()
    return config, manifest


def fake_slurm(monkeypatch, sacct: str, squeue: str) -> list[list[str]]:
    """sacct and squeue answer with recorded text; submitting anything fails the test."""
    calls = []

    def run(command, timeout=60):
        calls.append(command)
        return sacct if command[0] == "sacct" else squeue
    monkeypatch.setattr(slurm, "_run", run)
    monkeypatch.setattr(slurm, "submit_plan", lambda *args, **kwargs: pytest.fail("resubmitted a requeued task"))
    return calls


@pytest.mark.parametrize("sacct, squeue", [(REQUEUED_AFTER_NODE_FAIL, ""),  # accounting has the requeued run
                                           (NODE_FAIL_BEFORE_REQUEUE, SQUEUE_AT_NODE_FAIL)])  # only the controller
def test_resubmit_leaves_a_task_slurm_requeued_alone(requeued_study, monkeypatch, capsys, sacct, squeue):
    config, manifest = requeued_study
    calls = fake_slurm(monkeypatch, sacct, squeue)
    assert monitor.resubmit(config.study.results_root, None, "all") == 0
    assert "nothing to resubmit" in capsys.readouterr().out
    assert len(load_manifest(config.study.results_root).attempts) == 1
    assert [command[0] for command in calls].count("sacct") == 1


def test_status_shows_the_requeue_and_a_final_node_fail_is_rerun(requeued_study, monkeypatch):
    config, manifest = requeued_study
    fake_slurm(monkeypatch, REQUEUED_AFTER_NODE_FAIL, "")
    rows, _ = monitor.collect(manifest, config)
    finetunes = [row for row in rows if row.stage == "finetune"]
    assert [(row.state, row.active, row.attempt, row.restarts) for row in finetunes] == [("PENDING", True, 1, 1)] * 2
    assert finetunes[0].state_text == "PENDING (requeued after NODE_FAIL)"
    assert monitor.render(rows, "sacct").count("PENDING (requeued after NODE_FAIL)") == 2
    assert not any(monitor.needs_rerun(row) for row in finetunes)
    # A job that may not be requeued (--no-requeue, JobRequeue=0) ends NODE_FAIL: a failure resubmit reruns.
    fake_slurm(monkeypatch, NODE_FAIL_BEFORE_REQUEUE, "")
    rows, _ = monitor.collect(manifest, config)
    finetunes = [row for row in rows if row.stage == "finetune"]
    assert [(row.state, row.active, row.state_text) for row in finetunes] == [("NODE_FAIL", False, "NODE_FAIL")] * 2
    assert all(monitor.needs_rerun(row) for row in finetunes)
