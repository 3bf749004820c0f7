"""Helpers for the 2-rank CPU finetunes: the study they train, both rank processes as SLURM starts them, and the
same finetune in one process to compare with."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from jobs.config import load_config
from jobs.study import Pair, StudyPaths

REPO = Path(__file__).resolve().parent.parent
PAIR = Pair("Llama", "best_acc")


def alpaca_rows(count: int) -> list[dict[str, str]]:
    """Distinct rows (the index is in the instruction), so each tokenized sequence names one example."""
    words = "one two three four five six seven eight nine ten".split()
    return [{"instruction": f"Repeat the word {words[index % 10]} ({index}).", "input": "",
             "output": f"{words[index % 10]} {words[index % 10]}"} for index in range(count)]


def free_port() -> int:
    from workers.distributed import free_port as pick

    return pick()


def child_environment(**settings: str) -> dict[str, str]:
    """This process's environment for a finetune child on the CPU: no rank, SLURM or accelerate variables of
    its own, one thread, this checkout importable; then ``settings``."""
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "ACCELERATE_"))}
    environment.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""})
    return {**environment, **settings}


def two_rank_study(root: Path, *overrides: str) -> list[str]:
    """A tiny model, its tokenizer and 80 distinct rows under ``root``; the overrides of a 2-GPU finetune of them
    (also written to ``root/overrides.json`` for the rank processes)."""
    from tests.tiny_assets import build_tiny_llama, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(root / "tokenizer")
    build_tiny_llama(root / "pruned", tokenizer)
    (root / "alpaca.json").write_text(json.dumps(alpaca_rows(80)))
    settings = [f"study.results_root={root / 'results'}", f"study.pruned_model_path={root / 'pruned'}",
                f"data.train_path={root / 'alpaca.json'}", "finetune.learning_rate=5e-3", "finetune.batch_size=16",
                "finetune.num_epochs=1", "finetune.logging_steps=1", "finetune.eval_steps=5",
                "finetune.val_set_size=8", "finetune.cutoff_len=64",
                # No dropout: its random masks depend on how each process draws random numbers, and the
                # comparisons with one process want the same arithmetic.
                "finetune.lora_dropout=0", "resources.finetune.gpus_per_node=2", *overrides]
    (root / "overrides.json").write_text(json.dumps(settings))
    return settings


def run_two_ranks(root: Path, child: Path) -> tuple[list[str], float]:
    """Run ``child root`` as the two tasks of a 1-node SLURM job; both outputs (kept in rankN.log) and the wall time."""
    port = free_port()
    processes = []
    started = time.monotonic()
    for rank in (0, 1):
        environment = child_environment(
            # What submitit's sbatch script and srun give task `rank` of a 1-node, 2-task job.
            SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="1",
            SLURM_NODEID="0", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
            SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(port),  # a free port: tests run side by side
            TORCH_EXTENSIONS_DIR=str(root / "torch_extensions"))  # where a JIT-compiled op would go: none should
        processes.append(subprocess.Popen([sys.executable, str(child), str(root)], cwd=REPO, env=environment,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=600)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    seconds = time.monotonic() - started
    for rank, output in enumerate(outputs):
        (root / f"rank{rank}.log").write_text(output)  # kept for a look after a failure
    for rank, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"rank {rank} failed:\n{output[-4000:]}"
    return outputs, seconds


def finetune_in_one_process(root: Path, results: Path) -> Path:
    """The same finetune as the ranks under ``root`` ran, in this process alone (one thread); its output folder."""
    import torch

    from workers import finetune

    one = load_config(None, [*json.loads((root / "overrides.json").read_text()), f"study.results_root={results}",
                             "resources.finetune.gpus_per_node=1"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        finetune.run(one, PAIR)
    finally:
        torch.set_num_threads(threads)
    return StudyPaths(one).finetuned_dir(PAIR)
