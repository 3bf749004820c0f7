"""The local executor on a machine with GPUs: each of its processes sees one GPU of its own."""
from __future__ import annotations

import multiprocessing
import os

import pytest

from jobs.executor import gpu_slots, start_pool, visible_gpus


@pytest.mark.parametrize("listed, expected", [("3,5", ["3", "5"]), ("", []), ("-1", []),
                                              ("GPU-1f2e, GPU-9a7b", ["GPU-1f2e", "GPU-9a7b"])])
def test_visible_gpus_follow_cuda_visible_devices(monkeypatch, listed, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", listed)
    assert visible_gpus() == expected


def test_gpus_are_dealt_round_robin():
    assert gpu_slots(2, ["3", "5", "6", "7"]) == ["3", "5"]
    assert gpu_slots(3, ["0"]) == ["0", "0", "0"]
    assert gpu_slots(2, []) == [None, None]  # no GPU: the processes' environment is left alone


def _gpu_once_both_run(barrier) -> str | None:
    barrier.wait(timeout=120)  # both processes hold a task: the two answers come from two processes
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_each_pool_process_sees_its_own_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    context = multiprocessing.get_context("spawn")
    with multiprocessing.Manager() as manager:
        barrier = manager.Barrier(2)
        pool = start_pool(context, 1, gpu_slots(2, visible_gpus()))
        try:
            answers = [pool.submit(_gpu_once_both_run, barrier) for _ in range(2)]
            assert sorted(answer.result(timeout=180) for answer in answers) == ["3", "5"]
        finally:
            pool.shutdown(wait=True)
