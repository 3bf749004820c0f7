"""The fault matrix of issue 6 on the real local SLURM: every fault ends with the study complete, nothing partial
left, at most one resubmit and at most one checkpoint interval of steps redone (tests/fault_matrix.py).

About 10 minutes on 2 cores; deselect with ``-m "not slurm"`` or ``-m "not slow"``. The table is printed (-s
shows it, and a failure message carries it).
"""
from __future__ import annotations

import pytest

from tests.fault_matrix import fault_cluster, render_table, run_matrix
from tests.slurm_cluster import cluster_unavailable

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster():
    reason = cluster_unavailable()
    if reason:
        pytest.skip(reason)
    with fault_cluster() as conf:
        yield conf


def test_every_fault_recovers(cluster, tmp_path_factory: pytest.TempPathFactory) -> None:
    outcomes = run_matrix(tmp_path_factory.mktemp("faults"))
    table = render_table(outcomes)
    print("\n" + table)
    assert len(outcomes) == 9, table  # one row per fault of the issue (cancel: running and pending)
    failed = [outcome.fault for outcome in outcomes if not outcome.recovered]
    assert not failed, f"not recovered: {failed}\n{table}"
    for outcome in outcomes:
        assert outcome.resubmits <= 1, table
        if outcome.bound is not None:
            assert outcome.steps_redone is not None and outcome.steps_redone <= outcome.bound, table
    requeued = {outcome.fault: outcome for outcome in outcomes if outcome.fault in ("preemption", "time limit")}
    assert all(outcome.resubmits == 0 and outcome.attempts >= 2 for outcome in requeued.values()), table
