"""The SLURM items of `launch.py check`: is the scheduler reachable, and does each stage fit its partition.

One ``sinfo`` call describes the partitions; ``sbatch --test-only`` on the exact script a submission
would send catches what sinfo cannot show (accounts, qos, limits). Nothing is submitted.
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field

from jobs.check_findings import FAIL, OK, STAGE_OF_WORKER, WARN, Finding, StudyFacts
from jobs.config import StageResources, StudyConfig, did_you_mean
from jobs.errors import UserError
from jobs.plan import Plan, TaskArray


@dataclass
class Partition:
    name: str
    up: bool = False
    time_limit_min: float = 0.0  # inf for INFINITE
    nodes: int = 0
    gpus_per_node: int = 0
    gpu_types: set[str] = field(default_factory=set)
    cpus_per_node: int = 0
    mem_mb: int = 0


def parse_time_limit(text: str) -> float:
    """SLURM's ``[days-]hours:minutes:seconds`` (or ``minutes``, ``infinite``) in minutes."""
    text = text.strip().lower()
    if text in ("infinite", "unlimited", "n/a", ""):
        return float("inf")
    days, _, clock = text.rpartition("-")
    parts = [int(part) for part in clock.split(":")]
    if len(parts) == 1:
        hours, minutes, seconds = 0, parts[0], 0
    elif len(parts) == 2:
        hours, minutes, seconds = 0, parts[0], parts[1]
    else:
        hours, minutes, seconds = parts[-3:]
    return (int(days or 0) * 24 + hours) * 60 + minutes + seconds / 60


def format_minutes(minutes: float) -> str:
    if minutes == float("inf"):
        return "infinite"
    minutes = int(round(minutes))
    days, rest = divmod(minutes, 24 * 60)
    return (f"{days}-" if days else "") + f"{rest // 60}:{rest % 60:02d}:00"


def parse_gres(text: str) -> tuple[int, set[str]]:
    """GPUs per node and their types from sinfo's %G, e.g. ``gpu:a100:4(S:0-1),gpu:v100:2`` -> (4, {a100, v100})."""
    count, types = 0, set()
    for item in text.split(","):
        match = re.match(r"gpu(?::([A-Za-z][\w.-]*))?:(\d+)", item.strip())
        if match:
            count = max(count, int(match.group(2)))
            if match.group(1):
                types.add(match.group(1).lower())
    return count, types


def parse_sinfo(text: str) -> tuple[dict[str, Partition], str]:
    """``sinfo -h -o %P|%a|%l|%D|%G|%c|%m`` -> ({partition: facts}, default partition)."""
    partitions: dict[str, Partition] = {}
    default = ""
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) < 7:
            continue
        name, available, limit, nodes, gres, cpus, memory = fields[:7]
        if name.endswith("*"):
            name = name[:-1]
            default = name
        partition = partitions.setdefault(name, Partition(name))
        partition.up |= available.strip() == "up"
        partition.time_limit_min = max(partition.time_limit_min, parse_time_limit(limit))
        partition.nodes += int(re.sub(r"\D", "", nodes) or 0)
        gpus, types = parse_gres(gres)
        partition.gpus_per_node = max(partition.gpus_per_node, gpus)
        partition.gpu_types |= types
        partition.cpus_per_node = max(partition.cpus_per_node, int(re.sub(r"\D", "", cpus) or 0))
        partition.mem_mb = max(partition.mem_mb, int(re.sub(r"\D", "", memory) or 0))
    return partitions, default


def _slurm_command(command: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def check_slurm(config: StudyConfig, plan: Plan, facts: StudyFacts) -> list[Finding]:
    """sinfo answers; each stage's partition exists, is up and has the GPUs, CPUs, memory and time asked for;
    ``sbatch --test-only`` accepts the request (which also checks account and qos)."""
    try:
        result = _slurm_command(["sinfo", "-h", "-o", "%P|%a|%l|%D|%G|%c|%m"])
    except FileNotFoundError:
        return [Finding("slurm", FAIL, "sinfo not found: SLURM is not reachable from this machine",
                        "run on the cluster's login node, or pass --executor local")]
    except subprocess.TimeoutExpired:
        return [Finding("slurm", FAIL, "sinfo did not answer in 30 s", "is slurmctld up? try `sinfo` yourself")]
    if result.returncode:
        return [Finding("slurm", FAIL, f"sinfo failed: {(result.stderr or result.stdout).strip()[:200]}",
                        "check SLURM_CONF and that slurmctld is up (`scontrol ping`)")]
    facts.partitions, facts.default_partition = parse_sinfo(result.stdout)
    findings = [Finding("slurm", OK, f"sinfo answers: partitions {', '.join(facts.partitions) or 'none'} "
                        f"(default {facts.default_partition or 'none'})")]
    first_array = {STAGE_OF_WORKER[array.worker]: array for array in reversed(plan.arrays)}
    for stage in ("finetune", "evaluate", "compare"):
        if stage in first_array:
            findings += _stage_fits_partition(config, stage, first_array[stage], facts)
    return findings


def _stage_fits_partition(config: StudyConfig, stage: str, array: TaskArray, facts: StudyFacts) -> list[Finding]:
    resources: StageResources = getattr(config.resources, stage)
    key = f"resources.{stage}"
    name = resources.partition or facts.default_partition
    if not name:
        return [Finding("partition", FAIL, f"{stage}: no partition set and the cluster has no default",
                        f"set {key}.partition to one of {', '.join(facts.partitions)}")]
    partition = facts.partitions.get(name)
    if partition is None:
        return [Finding("partition", FAIL, f"{stage}: partition {name!r} does not exist"
                        f"{did_you_mean(name, facts.partitions)}",
                        f"set {key}.partition to one of {', '.join(facts.partitions)}")]
    problems = []
    if resources.time_min > partition.time_limit_min:
        problems.append((f"time_min {resources.time_min} ({format_minutes(resources.time_min)}) exceeds the "
                         f"partition's limit {format_minutes(partition.time_limit_min)}",
                         f"lower {key}.time_min to <= {int(partition.time_limit_min)} or pick another partition"))
    if resources.gpus_per_node > partition.gpus_per_node:
        problems.append((f"gpus_per_node {resources.gpus_per_node} but its nodes have {partition.gpus_per_node} GPU(s)",
                         f"lower {key}.gpus_per_node or pick a GPU partition"))
    if resources.nodes > partition.nodes:
        problems.append((f"nodes {resources.nodes} but it has {partition.nodes}", f"lower {key}.nodes"))
    if partition.cpus_per_node and resources.cpus_per_task > partition.cpus_per_node:
        problems.append((f"cpus_per_task {resources.cpus_per_task} but its nodes have {partition.cpus_per_node}",
                         f"lower {key}.cpus_per_task"))
    if partition.mem_mb and resources.mem_gb * 1024 > partition.mem_mb:
        problems.append((f"mem_gb {resources.mem_gb} but its nodes have {partition.mem_mb // 1024} GB",
                         f"lower {key}.mem_gb"))
    if problems:
        return [Finding("partition", FAIL, f"{stage} on {name}: {problem}", fix) for problem, fix in problems]
    findings = []
    if not partition.up:
        findings.append(Finding("partition", WARN, f"{stage}: partition {name} is not up; jobs wait until it is",
                                "pick another partition or ask the admins"))
    test = sbatch_test_only(config, array)
    if test:
        findings.append(Finding("partition", FAIL, f"{stage}: sbatch --test-only rejects the request ({test})",
                                f"fix {key} (account, qos, partition) to what your association allows "
                                "(`sacctmgr show assoc user=$USER`)"))
    else:
        gpus = f", {resources.gpus_per_node} of {partition.gpus_per_node} GPU(s)" if resources.gpus_per_node else ""
        findings.append(Finding("partition", OK, f"{stage} fits {name}: time {format_minutes(resources.time_min)} "
                                f"of {format_minutes(partition.time_limit_min)}{gpus}; sbatch --test-only accepts it"))
    return findings


def sbatch_test_only(config: StudyConfig, array: TaskArray) -> str:
    """'' when ``sbatch --test-only`` accepts the array's script, else sbatch's reason.

    The script is the one a submission would send (``jobs.slurm`` renders it, without dependencies), so
    partition, account, qos, GPUs, time and the template's lines are tested as they will be submitted.
    """
    from jobs import slurm

    try:
        script = slurm.render_sbatch(slurm.make_executor(config, array, ""), array.size)
    except UserError as error:
        return str(error)
    try:
        result = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired) as error:
        return f"sbatch --test-only: {type(error).__name__}"
    if result.returncode:
        return ((result.stderr or result.stdout).strip().splitlines() or ["no output"])[-1][:200]
    return ""
