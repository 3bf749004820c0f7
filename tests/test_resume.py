"""A finetune that dies resumes from its last good checkpoint and ends where an uninterrupted run ends.

Real Trainer, real tiny Llama, real checkpoint files on disk; the faults are injected at a chosen
optimizer step: an exception (a crash after a checkpoint), SLURM's warning signal sent to this process,
and a truncated newest checkpoint.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jobs.state import is_done
from jobs.study import StudyPaths
from tests.test_finetune import PAIR, one_thread, tiny_study  # noqa: F401 (one_thread: autouse fixture)
from workers import checkpointing, finetune

# 58 training rows, 8 per step: 8 steps per epoch, 16 in all; a checkpoint every 3 steps.
SETTINGS = ("finetune.micro_batch_size=4", "finetune.checkpoint_steps=3", "finetune.logging_steps=1")


class InjectedCrash(RuntimeError):
    pass


def inject_at(monkeypatch: pytest.MonkeyPatch, step: int, fault: str) -> None:
    """At the end of optimizer ``step``: raise (a crash) or send this process the warning signal or SIGTERM."""
    original = checkpointing.StopOnSignal.on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == step and fault in ("signal", "term"):
            os.kill(os.getpid(), signal.SIGUSR2 if fault == "signal" else signal.SIGTERM)
        original(self, args, state, control, **kwargs)
        if state.global_step == step and fault == "crash":
            raise InjectedCrash(f"injected crash after step {step}")

    monkeypatch.setattr(checkpointing.StopOnSignal, "on_step_end", on_step_end)


def interrupted_run(config, monkeypatch: pytest.MonkeyPatch, step: int, fault: str, error: type, match: str = ""):
    """Run ``config``'s finetune with ``fault`` at ``step``; it must stop with ``error``. Returns the pair folder."""
    with monkeypatch.context() as patch:
        inject_at(patch, step, fault)
        with pytest.raises(error, match=match or None):
            finetune.run(config, PAIR)
    return StudyPaths(config).finetuned_dir(PAIR)


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def record(folder: Path) -> dict:
    return json.loads((folder / "finetuning_config.json").read_text())


def finetune_whole(tmp_path_factory: pytest.TempPathFactory, packing: str) -> Path:
    config = tiny_study(tmp_path_factory.mktemp(f"whole-{packing}"), *SETTINGS, f"finetune.packing={packing}")
    finetune.run(config, PAIR)
    return StudyPaths(config).finetuned_dir(PAIR)


@pytest.fixture(scope="module")
def whole_padded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every interrupted padded run must end equal to."""
    return finetune_whole(tmp_path_factory, "off")


@pytest.fixture(scope="module")
def whole_packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finetune_whole(tmp_path_factory, "on")


def assert_same_run(resumed: Path, whole: Path) -> None:
    expected, got = adapter(whole), adapter(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    whole_log = (whole / "training_log.txt").read_text().splitlines()
    resumed_log = [line for line in (resumed / "training_log.txt").read_text().splitlines()
                   if not line.startswith("resumed from")]
    loss_lines = lambda lines: [line for line in lines if " loss " in line]  # noqa: E731
    assert len(loss_lines(resumed_log)) == len(loss_lines(whole_log)) == 16  # the whole run's log, nothing twice
    assert record(resumed)["metrics"]["optimizer_steps"] == record(whole)["metrics"]["optimizer_steps"] == 16


@pytest.mark.parametrize("packing", ["off", "on"], ids=["padded", "packed"])
def test_crash_resumes_from_the_last_checkpoint(packing: str, request, tmp_path: Path, monkeypatch) -> None:
    whole = request.getfixturevalue("whole_padded" if packing == "off" else "whole_packed")
    config = tiny_study(tmp_path, *SETTINGS, f"finetune.packing={packing}")
    folder = interrupted_run(config, monkeypatch, 7, "crash", InjectedCrash)
    assert not is_done(folder)
    saved = [step for step, _ in checkpointing.checkpoint_steps(folder / checkpointing.CHECKPOINTS)]
    assert saved == [6, 3]  # save_total_limit 2: the newest two, each with its marker
    finetune.run(config, PAIR)
    assert is_done(folder, verify_checksums=True)
    assert record(folder)["derived"]["resumed_from_step"] == 6  # step 7 is the only step redone
    assert "resumed from checkpoint-6" in (folder / "training_log.txt").read_text()
    assert not (folder / checkpointing.CHECKPOINTS).exists()  # removed once the adapter is done
    assert_same_run(folder, whole)


def test_warning_signal_saves_at_the_step_end_and_stops(whole_padded: Path, tmp_path: Path, monkeypatch) -> None:
    whole = whole_padded  # the signal path does not depend on the batch layout
    config = tiny_study(tmp_path, *SETTINGS, "finetune.packing=off")
    # Between the periodic checkpoints 3 and 6.
    folder = interrupted_run(config, monkeypatch, 5, "signal", finetune.TrainingInterrupted, match="step 5")
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL  # our handlers are gone again
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    newest = checkpointing.latest_valid_checkpoint(folder / checkpointing.CHECKPOINTS)
    assert newest is not None and newest.name == "checkpoint-5"  # no step lost
    finetune.run(config, PAIR)
    assert record(folder)["derived"]["resumed_from_step"] == 5
    assert_same_run(folder, whole)


def test_corrupt_newest_checkpoint_falls_back(whole_padded: Path, tmp_path: Path, monkeypatch) -> None:
    whole = whole_padded  # checkpoint validation does not depend on the batch layout
    config = tiny_study(tmp_path, *SETTINGS, "finetune.packing=off")
    folder = interrupted_run(config, monkeypatch, 7, "crash", InjectedCrash)
    newest = folder / checkpointing.CHECKPOINTS / "checkpoint-6"
    optimizer = newest / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])  # a half-written file
    assert "bytes" in checkpointing.marker_problem(newest)
    finetune.run(config, PAIR)
    assert record(folder)["derived"]["resumed_from_step"] == 3
    assert_same_run(folder, whole)


def test_checkpoint_of_other_settings_is_not_resumed(tmp_path: Path, monkeypatch) -> None:
    config = tiny_study(tmp_path, *SETTINGS, "finetune.packing=off", "finetune.max_steps=4")
    folder = interrupted_run(config, monkeypatch, 4, "crash", InjectedCrash)
    changed = tiny_study(tmp_path, *SETTINGS, "finetune.packing=off", "finetune.max_steps=4",
                         "finetune.learning_rate=1e-3")
    finetune.run(changed, PAIR)
    assert record(folder)["derived"]["resumed_from_step"] == 0
    assert record(folder)["settings"]["learning_rate"] == 1e-3


def test_changing_only_how_often_to_checkpoint_keeps_the_checkpoints(tmp_path: Path, monkeypatch) -> None:
    config = tiny_study(tmp_path, *SETTINGS, "finetune.packing=off", "finetune.max_steps=8")
    folder = interrupted_run(config, monkeypatch, 7, "crash", InjectedCrash)
    rerun = tiny_study(tmp_path, *SETTINGS, "finetune.packing=off", "finetune.max_steps=8",
                       "finetune.checkpoint_minutes=5", "finetune.max_requeues=1")
    finetune.run(rerun, PAIR)
    assert record(folder)["derived"]["resumed_from_step"] == 6


def test_time_based_checkpoints_without_a_step_interval(tmp_path: Path, monkeypatch) -> None:
    """finetune.checkpoint_minutes alone: a save whenever that much time has passed (here: every step)."""
    config = tiny_study(tmp_path, "finetune.micro_batch_size=4", "finetune.logging_steps=1", "finetune.packing=off",
                        "finetune.checkpoint_steps=0", "finetune.checkpoint_minutes=0.00001")
    folder = interrupted_run(config, monkeypatch, 5, "crash", InjectedCrash)  # raised before step 5's save
    saved = [step for step, _ in checkpointing.checkpoint_steps(folder / checkpointing.CHECKPOINTS)]
    assert saved == [4, 3]
    assert all(checkpointing.marker_problem(path) is None
               for _, path in checkpointing.checkpoint_steps(folder / checkpointing.CHECKPOINTS))


def test_sigterm_saves_at_the_step_end_and_stops_without_requeue(tmp_path: Path, monkeypatch) -> None:
    """scancel or a requeue from outside sends SIGTERM first: the steps since the last checkpoint are kept."""
    config = tiny_study(tmp_path, *SETTINGS, "finetune.packing=off")
    folder = interrupted_run(config, monkeypatch, 4, "term", finetune.TrainingInterrupted,
                             match="terminated at step 4")
    newest = checkpointing.latest_valid_checkpoint(folder / checkpointing.CHECKPOINTS)
    assert newest is not None and newest.name == "checkpoint-4"


def test_a_checkpoint_resumes_whatever_the_speed_settings_say():
    from jobs.config import load_config

    def key(*overrides: str) -> str:
        return checkpointing.recipe_key(load_config(None, list(overrides)).finetune, 1, Path("m"), "d.json", True)

    assert key("finetune.compile=off") == key("finetune.compile=on") == key("finetune.max_requeues=9") == key()
    assert key("finetune.learning_rate=2e-4") != key()
