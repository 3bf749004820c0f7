"""The distributed set-up of one finetune task: ranks, process group, accelerate's state, DeepSpeed config.

One finetune is one SLURM job with ``ntasks_per_node`` = GPUs per node (and ``nodes`` > 1 for several
nodes); submitit starts one process per task and each process is one rank. There is no ``torchrun`` or
``deepspeed`` launcher inside the job, so ``setup()`` builds what a launcher would:

- Ranks come from, in order: a launcher's ``RANK``/``WORLD_SIZE`` (torchrun, or tests); submitit's
  ``TorchDistributedEnvironment().export()`` when the SLURM job has more than one task (submitit alone
  sets none of these variables); else one process (rank 0 of 1).
- ``MASTER_PORT`` with several ranks is ``20000 + SLURM_JOB_ID mod 40000`` unless the environment sets
  it. Every rank computes the same number without talking to the others, and the tasks of an array
  have distinct, consecutive SLURM_JOB_IDs, so two tasks sharing a node never pick the same port.
  (submitit's own choice hashes the job id to a random port in the same range, which can collide; rank
  0 cannot pick a free port for the others, because nothing connects the ranks before the rendezvous.)
  One process gets a free port from the kernel.
- The process group: nccl on GPUs, gloo on CPU. Each rank uses GPU ``LOCAL_RANK`` (GPU 0 when SLURM
  shows each task only its own GPU).
- accelerate's ``PartialState`` is created here, from the initialised group with its backend named, and
  the Trainer is told to reuse it (``accelerator_config={"use_configured_state": True}``); a check then
  fails loudly unless accelerate sees this rank and world size. Left to the Trainer, accelerate 1.15
  given ``cpu=False`` on a machine without GPUs (``use_cpu=False`` in TrainingArguments) finds no
  backend and sets ``num_processes=1``: every rank believes it is alone ("ds train_batch_size=16 vs hf
  train_batch_size (calculated)=8"; with "auto" batch values each rank silently trains on all the data).
  The resolved config states ``train_batch_size`` outright, so transformers' own check catches it too.
- Ranks other than 0 log at WARNING only; rank 0 alone writes results (workers/finetune.py).
- ``teardown()`` restores the environment, log levels and accelerate's state, because the local executor
  runs the next task in the same process; it destroys a group of several ranks, and keeps a one-rank
  group for the process's next DeepSpeed task (see ``teardown``).

DeepSpeed configs live in ``configs/deepspeed/`` as YAML (``finetune.deepspeed`` names one):

- ``zero2.yaml``: ZeRO-2, the default; gradients and optimizer state sharded.
- ``zero3.yaml``: ZeRO-3; parameters sharded too, for models that do not fit one GPU.
- ``zero3_offload.yaml``: ZeRO-3 with optimizer state and step on the CPU (DeepSpeed's CPU AdamW).

They are YAML, not DeepSpeed's JSON, so that each can open with the command that uses it and explain
its values: transformers reads a JSON config with ``json.load`` (no comments), and DeepSpeed rejects
unknown keys below the top level. ``resolve_deepspeed_config`` fills every ``"auto"`` from the recipe.

``finetune.deepspeed=auto`` uses ZeRO-2 on GPUs and whenever there is more than one rank, and no
DeepSpeed for one CPU process: there ZeRO has nothing to shard, and DeepSpeed would only add its engine
set-up (measured: +3 s CPU time per demo finetune, 13.6 s -> 16.3 s in a fresh process).
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shlex
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
import yaml

from jobs.config import DEEPSPEED_CONFIG_DIR as DEEPSPEED_DIR
from jobs.errors import InputError

T = TypeVar("T")

log = logging.getLogger(__name__)

DEFAULT_DEEPSPEED = "zero2"
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
PORT_BASE, PORT_SPAN = 20000, 40000  # submitit's range; below Linux's ephemeral ports (32768+) only in part


@dataclass(frozen=True)
class Ranks:
    """Where this process sits in the job; ``source`` says who told us."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    source: str = "single"  # "launcher" (RANK/WORLD_SIZE set), "submitit" (SLURM tasks) or "single"


@dataclass(frozen=True)
class DistributedRun:
    """What ``setup()`` made: the ranks, the chosen DeepSpeed config name (None: without), the device."""

    ranks: Ranks
    deepspeed: str | None
    backend: str | None  # None: no process group (one process without DeepSpeed)
    device: str

    @property
    def configured_state(self) -> bool:
        """Whether accelerate's state was made here, so the Trainer must reuse it."""
        return self.backend is not None


_saved_env: dict[str, str | None] = {}
_saved_levels: dict[str, int] = {}
_saved_warning_filters: list[Any] | None = None
_owns_group = False  # the live process group is the one setup() initialised
_configured_state = False  # setup() made accelerate's state for the current task


def _accumulation_notice(record: logging.LogRecord) -> bool:
    """False for accelerate's "Gradient accumulation steps mismatch" warning, which every DeepSpeed run logs.

    The Trainer gives accelerate ``num_steps=1`` on purpose (it accumulates itself, and tells DeepSpeed where
    each step ends); the 2-rank test checks that DeepSpeed steps exactly as often as the Trainer plans."""
    return "Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1" not in record.getMessage()


def detect_ranks() -> Ranks:
    """Read this process's ranks from the environment without changing anything."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        world_size = int(os.environ["WORLD_SIZE"])
        return Ranks(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"])), world_size,
                     int(os.environ.get("LOCAL_WORLD_SIZE", world_size)), "launcher")
    tasks = int(os.environ.get("SLURM_NTASKS", "1"))
    if tasks > 1:
        nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", "1"))
        return Ranks(int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_LOCALID"]), tasks, tasks // nodes,
                     "submitit")
    return Ranks()


def choose_deepspeed(setting: str, world_size: int, on_gpu: bool) -> str | None:
    """The DeepSpeed config name to use, or None: ``auto`` means zero2 on GPUs or with several ranks."""
    if setting == "none":
        return None
    if setting == "auto":
        return DEFAULT_DEEPSPEED if on_gpu or world_size > 1 else None
    return setting


def master_port(job_id: str) -> int:
    """The rendezvous port every rank of SLURM job ``job_id`` derives on its own (see the module docstring)."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def setup(deepspeed_setting: str, on_gpu: bool) -> DistributedRun:
    """Make this process a rank: environment, process group, GPU, accelerate state, log level."""
    ranks = detect_ranks()
    deepspeed = choose_deepspeed(deepspeed_setting, ranks.world_size, on_gpu)
    _quiet_other_ranks(ranks.rank)
    if ranks.world_size == 1 and deepspeed is None:
        # One process, no DeepSpeed: nothing to set up; the Trainer builds its own single-device state.
        return DistributedRun(ranks, None, None, "cuda:0" if on_gpu else "cpu")

    # accelerate's Accelerator sets ACCELERATE_USE_DEEPSPEED=true for good once it has a DeepSpeed plugin; left
    # behind, it would turn the next Trainer in this process (the local executor's next task) into DeepSpeed.
    _saved_env.update({key: os.environ.get(key) for key in (*ENV_KEYS, *_accelerate_keys())})
    _export_environment(ranks)
    backend = "nccl" if on_gpu else "gloo"
    device = torch.device("cpu")
    if on_gpu:
        device = torch.device("cuda", _gpu_index(ranks))
        torch.cuda.set_device(device)
    global _owns_group, _configured_state
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() != ranks.world_size:
        raise RuntimeError(f"a process group of {torch.distributed.get_world_size()} ranks is still alive in this "
                           f"process, and this task needs {ranks.world_size}; run it in a fresh process")
    address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    if torch.distributed.is_initialized():
        address = "this process's group from an earlier task"
    else:
        try:
            torch.distributed.init_process_group(backend, rank=ranks.rank, world_size=ranks.world_size,
                                                 device_id=device if on_gpu else None)
        except Exception as error:
            raise RuntimeError(f"rank {ranks.rank} of {ranks.world_size} could not join the {backend} process group "
                               f"at {address} ({str(error).splitlines()[0]}); if that port is taken, export another "
                               f"MASTER_PORT in the SLURM template's set-up lines") from error
        _owns_group = True
        atexit.register(_destroy_group)  # a group kept for the next task (see teardown) ends with the process
    if deepspeed and ranks.local_rank == 0:
        warn_of_stale_build_locks()
    if deepspeed and not on_gpu:
        _skip_cpu_inference_comm_op()
    _configure_accelerate(ranks, deepspeed is not None, on_gpu, backend)
    _configured_state = True
    if deepspeed:
        _quiet_deepspeed_noise()
    log.info("rank %d of %d (local %d of %d, from %s), %s process group via %s, %s, DeepSpeed %s",
             ranks.rank, ranks.world_size, ranks.local_rank, ranks.local_world_size, ranks.source, backend, address,
             device, deepspeed or "off")
    return DistributedRun(ranks, deepspeed, backend, str(device))


def teardown() -> None:
    """Undo ``setup()``: accelerate state, environment, log levels; the process group of several ranks.

    A one-rank group stays alive until the process ends: the local executor may run the next DeepSpeed
    finetune in this same process, and DeepSpeed keeps sub-groups of the group in module globals, which
    a destroyed group leaves dangling ("Group ... is not registered" in the next ``deepspeed.initialize``).
    The next ``setup()`` reuses it. A SLURM task with several ranks ends after its one finetune.
    """
    global _configured_state, _saved_warning_filters
    if _configured_state:
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(reset_partial_state=True)  # the next Trainer builds or gets its own
        _configured_state = False
    if _owns_group and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        _destroy_group()
    if sys.modules.get("transformers") is not None:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
        unset_hf_deepspeed_config()  # else a ZeRO-3 config would make later from_pretrained calls shard
    for key in _accelerate_keys() if _saved_env else ():
        _saved_env.setdefault(key, None)  # set during the task: remove it
    for key, value in _saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _saved_env.clear()
    for name, level in _saved_levels.items():
        logging.getLogger(name or None).setLevel(level)
    _saved_levels.clear()
    if _saved_warning_filters is not None:
        warnings.filters[:] = _saved_warning_filters
        _saved_warning_filters = None
    logging.getLogger("accelerate.accelerator").removeFilter(_accumulation_notice)


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    if torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Rank 0: the one process that logs progress and writes results."""
    return rank() == 0


def from_rank0(compute: Callable[[], T]) -> T:
    """``compute()``'s value on rank 0, given to every rank (collective), for decisions all ranks must share."""
    value = compute()
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def gathered(parameters: list[torch.nn.Parameter]) -> Iterator[None]:
    """Make ZeRO-3-sharded ``parameters`` whole on every rank inside the block (a no-op otherwise).

    Collective: every rank must enter it, even those that only rank 0's work inside waits for."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parameters, modifier_rank=None):
        yield


# ------------------------------------------------------------------------------ DeepSpeed configs


def deepspeed_config_names() -> list[str]:
    return sorted(path.stem for path in DEEPSPEED_DIR.glob("*.yaml"))


def load_deepspeed_config(name: str) -> dict[str, Any]:
    """The YAML file ``configs/deepspeed/<name>.yaml`` as DeepSpeed's config dict, "auto" values unfilled."""
    path = DEEPSPEED_DIR / f"{name}.yaml"
    if not path.is_file():
        raise InputError(f"{path} does not exist; set finetune.deepspeed to auto, none or one of "
                         f"{', '.join(deepspeed_config_names())}")
    loaded = yaml.safe_load(path.read_text())
    if not isinstance(loaded, dict):
        raise InputError(f"{path}: expected a mapping of DeepSpeed settings, got {type(loaded).__name__}")
    return loaded


def auto_values(*, micro_batch_size: int, accumulation: int, world_size: int, learning_rate: float,
                dtype: torch.dtype, hidden_size: int, warmup_steps: int, total_steps: int, max_grad_norm: float,
                betas: tuple[float, float], eps: float, weight_decay: float) -> dict[str, Any]:
    """What each "auto" becomes, by dotted key: the recipe's values, computed the way transformers does."""
    return {
        "train_batch_size": micro_batch_size * accumulation * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": max_grad_norm,
        "bf16.enabled": dtype == torch.bfloat16,
        "fp16.enabled": dtype == torch.float16,
        "optimizer.params.lr": learning_rate,
        "optimizer.params.betas": list(betas),
        "optimizer.params.eps": eps,
        "optimizer.params.weight_decay": weight_decay,
        "scheduler.params.warmup_min_lr": 0.0,
        "scheduler.params.warmup_max_lr": learning_rate,
        "scheduler.params.warmup_num_steps": warmup_steps,
        "scheduler.params.total_num_steps": total_steps,
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
    }


def resolve_deepspeed_config(raw: dict[str, Any], values: dict[str, Any], where: str = "") -> dict[str, Any]:
    """A copy of ``raw`` with every "auto" replaced from ``values``; an "auto" it does not know is an error."""
    unknown: list[str] = []

    def fill(node: Any, prefix: str) -> Any:
        if isinstance(node, dict):
            return {key: fill(value, f"{prefix}{key}.") for key, value in node.items()}
        dotted = prefix.rstrip(".")
        if node == "auto":
            if dotted not in values:
                unknown.append(dotted)
            return values.get(dotted, node)
        return node

    resolved = fill(raw, "")
    if unknown:
        raise InputError(f"{where or 'DeepSpeed config'}: no recipe value for \"auto\" at {', '.join(unknown)}; "
                         f"write a number there (auto works for: {', '.join(values)})")
    return resolved


# ------------------------------------------------------------------------------------- helpers


def _export_environment(ranks: Ranks) -> None:
    """Set what ``env://`` initialisation and DeepSpeed read: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*."""
    if ranks.source == "launcher":
        os.environ.setdefault("LOCAL_RANK", str(ranks.local_rank))
        os.environ.setdefault("LOCAL_WORLD_SIZE", str(ranks.local_world_size))
        missing = [key for key in ("MASTER_ADDR", "MASTER_PORT") if key not in os.environ]
        if missing and ranks.world_size > 1:
            raise RuntimeError(f"RANK and WORLD_SIZE are set but {' and '.join(missing)} is not; export both "
                               "MASTER_ADDR and MASTER_PORT, or unset RANK to let submitit or one process decide")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    elif ranks.source == "submitit":
        if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
            raise RuntimeError(f"SLURM_NTASKS={ranks.world_size} but this process was not started by submitit; "
                               "run finetunes through launch.py, or export RANK, WORLD_SIZE, LOCAL_RANK, "
                               "MASTER_ADDR and MASTER_PORT for each process yourself")
        from submitit.helpers import TorchDistributedEnvironment

        environment = TorchDistributedEnvironment()
        environment.master_port = int(os.environ.get("MASTER_PORT") or master_port(os.environ["SLURM_JOB_ID"]))
        # RANK and WORLD_SIZE are unset (else source would be "launcher"), so overwrite only touches MASTER_*;
        # CUDA_VISIBLE_DEVICES is left as SLURM set it (it may name physical GPUs): _gpu_index picks the GPU.
        environment.export(set_cuda_visible_devices=False, overwrite=True)
    else:  # one process that still needs a process group (DeepSpeed): else DeepSpeed tries MPI discovery
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))


def _accelerate_keys() -> list[str]:
    return [key for key in os.environ if key.startswith("ACCELERATE_")]


def _gpu_index(ranks: Ranks) -> int:
    count = torch.cuda.device_count()
    if count == 1:
        return 0  # SLURM bound one GPU to this task (or there is one)
    if count < ranks.local_world_size:
        raise RuntimeError(f"{ranks.local_world_size} ranks on this node but {count} GPUs visible; set "
                           "resources.finetune.gpus_per_node to the GPUs each node has")
    return ranks.local_rank


def _configure_accelerate(ranks: Ranks, use_deepspeed: bool, on_gpu: bool, backend: str) -> None:
    """Create accelerate's shared state from the initialised group, of the DeepSpeed type when it is used.

    ``cpu=False`` on CPU too, with DeepSpeed: accelerate only takes its DeepSpeed branch when not forced to
    CPU; finding no GPU, it keeps the CPU device. ``ACCELERATE_USE_DEEPSPEED`` is what that branch reads.
    """
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    if use_deepspeed:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        state = PartialState(cpu=not (use_deepspeed or on_gpu), backend=backend)
    finally:
        if previous is None:
            os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous
    if (state.num_processes, state.process_index) != (ranks.world_size, ranks.rank):
        raise RuntimeError(f"accelerate sees rank {state.process_index} of {state.num_processes}, the process group "
                           f"rank {ranks.rank} of {ranks.world_size}; check the accelerate version (tested: 1.15)")


def _destroy_group() -> None:
    global _owns_group
    if _owns_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _owns_group = False


def _skip_cpu_inference_comm_op() -> None:
    """Keep DeepSpeed's CPU comm backend from JIT-compiling its shared-memory op (deepspeed_shm_comm).

    The op serves DeepSpeed's inference all-reduce only; training reduces through torch.distributed either way.
    Building it took 22-70 s per machine on 2 cores, and torch guards the build with a lock file that even a
    cached load takes: a process killed while holding it (a cancelled job, a lost node) leaves it behind, and every
    later DeepSpeed run on that machine then waits on it forever."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)  # what DeepSpeed 0.19 reads before building
    if builder is not None and isinstance(compatible, dict):
        compatible[builder.NAME] = False


STALE_BUILD_LOCK_S = 30 * 60  # a DeepSpeed op builds in minutes; a lock this old has lost its owner


def warn_of_stale_build_locks(now: float | None = None) -> list[str]:
    """Name any torch extension build lock old enough to be left behind by a killed process.

    DeepSpeed JIT-compiles the ops a config asks for (CPU Adam under ``zero3_offload``) through torch, which
    waits on the build folder's ``lock`` file without a word and without end. A job cancelled mid-build leaves
    the file, and every later job that needs the op then hangs. Deleting it is left to the user: another job
    may be building right now on a shared home folder."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    now = time.time() if now is None else now
    stale = []
    for lock in _build_locks(root):
        with contextlib.suppress(OSError):  # released while we looked
            age = now - os.stat(lock).st_mtime
            if age > STALE_BUILD_LOCK_S:
                stale.append(lock)
                log.warning("torch extension build lock %s is %.0f min old; a DeepSpeed op that builds there waits "
                            "on it forever. If no job is building it now, delete it: rm %s", lock, age / 60,
                            shlex.quote(lock))
    return stale


def _build_locks(root: str) -> list[str]:
    """<root>/<op>/lock, and <root>/py311_cu130/<op>/lock (torch adds that level when TORCH_EXTENSIONS_DIR is unset)."""
    import glob

    root = glob.escape(root)
    return sorted(glob.glob(os.path.join(root, "*", "lock")) + glob.glob(os.path.join(root, "*", "*", "lock")))


def _quiet_deepspeed_noise() -> None:
    """Drop two messages every DeepSpeed run repeats on every rank and that ask nothing of us."""
    global _saved_warning_filters
    if _saved_warning_filters is None:
        _saved_warning_filters = list(warnings.filters)
    # DeepSpeed 0.19.8 calls these torch.distributed functions, which torch 2.13 deprecates: once per step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                            r"is deprecated", category=FutureWarning)
    logging.getLogger("accelerate.accelerator").addFilter(_accumulation_notice)


def _quiet_other_ranks(this_rank: int) -> None:
    """Ranks other than 0 log warnings and errors only: one readable log per job, from rank 0."""
    if this_rank == 0:
        return
    for name in ("", "deepspeed", "DeepSpeed"):
        logger = logging.getLogger(name or None)
        _saved_levels.setdefault(name, logger.level)
        logger.setLevel(max(logger.level, logging.WARNING))
