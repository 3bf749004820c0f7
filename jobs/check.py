"""``launch.py check``: validate a study on the login node in seconds, without loading any weights.

Two depths share one list of checks:

* ``require_ready`` runs the quick ones before every submission or local run (a writable results root, file
  presence and format, the pickle opt-in, finished adapters that fit their base, DeepSpeed and batch
  arithmetic, no secret typed into the SLURM template, the SLURM partition): the first failure becomes
  one ``InputError`` line, exit code 2, before anything is written or submitted.
* ``check_study`` (``launch.py check``) adds the deeper ones (tokenizers load, training data and every
  evaluation file parse with the fields the workers read), prints a checklist with the fix for each
  failure, and the cost estimate of the study (``jobs/cost.py``). Exit code 2 when any check fails.

Nothing here imports torch, transformers, peft, deepspeed or lm-eval; ``tokenizers`` (a Rust
extension, ~0.1 s) reads ``tokenizer.json`` to check it and to count tokens.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

import yaml

from jobs.check_findings import FAIL, OK, SKIP, WARN, Finding, StudyFacts, _from_error
from jobs.check_slurm import check_slurm
from jobs.checkpoints import adapter_mismatch, convert_command, find_checkpoint, model_shapes
from jobs.config import StudyConfig
from jobs.errors import InputError
from jobs.eval_data import EVAL_DATASETS, location, missing_eval_data, wanted_datasets
from jobs.executor import resolve_kind
from jobs.plan import Plan, build_plan
from jobs.slurm_template import inline_secrets
from jobs.state import sha256_of
from jobs.study import Pair, StudyPaths, pickle_allowed

REPO_ROOT = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------------ the checks


def model_pairs(plan: Plan) -> list[Pair]:
    """The pairs whose checkpoint some task of the plan loads."""
    return sorted({pair for array in plan.arrays if array.worker != "compare" for pair in array.pairs})


def workers_of(plan: Plan) -> set[str]:
    return {array.worker for array in plan.arrays}


# Paths that reach an sbatch script (#SBATCH --output=<root>/logs/...) or srun's command line: a space, quote,
# newline or SLURM filename pattern (%) there would split or rewrite the script.
SBATCH_SAFE_PATH = re.compile(r"^[A-Za-z0-9._/+,:@=~-]+$")


def check_results_root(config: StudyConfig, kind: str = "local") -> list[Finding]:
    """The root (or its nearest existing parent) is a folder this user can write, on a writable file system.

    ``os.access`` alone says yes to root everywhere, so a read-only mount and a file in the way are
    checked for themselves.
    """
    root = Path(config.study.results_root)
    fix = "set study.results_root to a folder you can write"
    if any(ord(character) < 32 for character in str(root)):
        return [Finding("results root", FAIL, f"results root {str(root)!r} contains a control character", fix)]
    if kind == "slurm" and not SBATCH_SAFE_PATH.match(str(root.absolute())):
        return [Finding("results root", FAIL, f"results root {str(root.absolute())!r} has characters that would "
                        "break the sbatch script (only letters, digits and ._/+,:@=~- are allowed with SLURM)",
                        "set study.results_root to a path without spaces, quotes or %")]
    existing = next((parent for parent in (root, *root.parents) if parent.exists() or parent.is_symlink()),
                    Path("."))
    if not existing.is_dir():
        return [Finding("results root", FAIL, f"results root {root} is not writable ({existing} is a file, not a "
                        "folder)", fix)]
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        return [Finding("results root", FAIL, f"results root {root} is not writable ({existing} is on a read-only "
                        "file system)", fix)]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [Finding("results root", FAIL, f"results root {root} is not writable ({existing} denies writing)",
                        fix)]
    return [Finding("results root", OK, f"{root} is writable")]


def check_checkpoints(config: StudyConfig, pairs: list[Pair], facts: StudyFacts) -> list[Finding]:
    """Every checkpoint exists, is a format PruneTune loads, and a pickle is opted in."""
    findings, kinds = [], {"hf": [], "converted": [], "pickle": []}
    paths = StudyPaths(config)
    for pair in pairs:
        try:
            kind, location = find_checkpoint(paths.pruned_model(pair))
        except InputError as error:
            findings.append(_from_error("checkpoint", error))
            continue
        if kind == "pickle" and not pickle_allowed(config, pair):
            findings.append(Finding(
                "checkpoint", FAIL, f"{location} ({pair.label}) is a pickled checkpoint, and loading a pickle runs "
                "code from it", f"if you trust it, add study.allow_pickle=[{pair.label}] (or list the model), or "
                f"convert it once to safetensors: {convert_command(pair.label)}"))
            continue
        facts.checkpoints[pair] = (kind, location)
        kinds[kind].append(pair)
    if not pairs:
        return [Finding("checkpoints", SKIP, "no task of this plan loads a checkpoint")]
    if facts.checkpoints:
        opted_in = ", ".join(pair.label for pair in kinds["pickle"])
        pickles = f", {len(kinds['pickle'])} LLM-Pruner pickle(s) opted in ({opted_in})" if opted_in else ""
        converted = f", {len(kinds['converted'])} converted pickle(s)" if kinds["converted"] else ""
        findings.insert(0, Finding("checkpoints", OK, f"{len(facts.checkpoints)} of {len(pairs)} recognised: "
                                   f"{len(kinds['hf'])} Hugging Face folder(s){converted}{pickles}"))
    return findings


def check_adapters(config: StudyConfig, plan: Plan, facts: StudyFacts) -> list[Finding]:
    """A finished adapter about to be evaluated fits its base model: every LoRA matrix matches the shape of the
    weight it wraps (from the safetensors headers; a pickle's shapes are unknown without unpickling it)."""
    paths = StudyPaths(config)
    pairs = [pair for array in plan.arrays if array.name == "evaluate_finetuned_ready" for pair in array.pairs]
    findings = []
    for pair in pairs:
        if pair not in facts.checkpoints:
            continue  # its checkpoint already failed
        base = model_shapes(*facts.checkpoints[pair])
        adapter = paths.finetuned_dir(pair)
        problem = adapter_mismatch(adapter, base) if base is not None else ""
        if problem:
            findings.append(Finding("adapter", FAIL, f"adapter {adapter} ({pair.label}) does not fit its base model "
                                    f"{facts.checkpoints[pair][1]}: {problem}", "finetune it again on this base: "
                                    f"delete {adapter} and run --model {pair.model} --config {pair.config} --stage all"))
    if pairs and not findings:
        findings.append(Finding("adapter", OK, f"{len(pairs)} finished adapter(s) fit their base models"))
    return findings


def check_tokenizers(facts: StudyFacts) -> list[Finding]:
    """Each checkpoint's tokenizer.json loads with the ``tokenizers`` library (no transformers import)."""
    from tokenizers import Tokenizer

    findings: list[Finding] = []
    loaded: dict[str, str] = {}  # sha256 of tokenizer.json -> first pair
    inside_pickle: list[Pair] = []
    own = 0
    for pair, (kind, location) in sorted(facts.checkpoints.items()):
        folder = location.parent if kind == "pickle" else location
        candidate = folder / "tokenizer.json"
        if not candidate.is_file():
            if kind == "pickle":
                inside_pickle.append(pair)
            elif any((folder / name).is_file() for name in ("tokenizer.model", "vocab.json", "spiece.model")):
                findings.append(Finding("tokenizer", WARN, f"{pair.label}: {folder} has slow-tokenizer files but no "
                                        "tokenizer.json, so it is not checked here (transformers converts it on "
                                        "the compute node)", "save it with tokenizer.save_pretrained(<folder>) to "
                                        "check it and count tokens on the login node"))
            else:
                findings.append(Finding("tokenizer", FAIL, f"{pair.label}: no tokenizer in {folder} "
                                        "(tokenizer.json, tokenizer.model)", "save the base model's tokenizer there "
                                        "with tokenizer.save_pretrained(<folder>)"))
            continue
        try:
            config_file = folder / "tokenizer_config.json"
            if config_file.is_file():
                json.loads(config_file.read_text())
            digest = sha256_of(candidate)
            if digest not in loaded:  # Instruct variants and best_acc/best_ppl mostly share one file
                Tokenizer.from_file(str(candidate))
                loaded[digest] = pair.label
        except Exception as error:  # tokenizers raises its own Exception type for malformed files
            findings.append(Finding("tokenizer", FAIL, f"{pair.label}: {folder} does not load "
                                    f"({str(error).splitlines()[0][:160]})", "save the tokenizer again with "
                                    "tokenizer.save_pretrained(<folder>)"))
            continue
        facts.tokenizers[pair] = candidate
        own += 1
    # A pickle carries its tokenizer inside; its tokens are counted with a sibling's of the same model.
    for pair in inside_pickle:
        sibling = next((path for other, path in facts.tokenizers.items() if other.model == pair.model), None) or \
            next((path for other, path in facts.tokenizers.items()
                  if other.model.removesuffix("-Instruct") == pair.model.removesuffix("-Instruct")), None)
        if sibling:
            facts.tokenizers[pair] = sibling
    if facts.checkpoints:
        inside = f"; {len(inside_pickle)} inside its pickle, loaded with it on the compute node" \
            f" ({', '.join(p.label for p in inside_pickle)})" if inside_pickle else ""
        findings.insert(0, Finding("tokenizers", OK if not any(f.status == FAIL for f in findings) else WARN,
                                   f"tokenizer.json loads for {own} "
                                   f"checkpoint(s) ({len(loaded)} distinct){inside}"))
    return findings


def check_training_data(config: StudyConfig, deep: bool, facts: StudyFacts) -> list[Finding]:
    path = Path(config.data.train_path)
    if not path.is_file():
        return [Finding("training data", FAIL, f"training data {path} does not exist",
                        "set data.train_path to an alpaca-format JSON/JSONL file (instruction, input, output)")]
    if not deep:
        return [Finding("training data", OK, f"{path} exists")]
    from workers.prompts import load_alpaca_examples  # light: json only (transformers only for type hints)
    try:
        facts.train_examples = load_alpaca_examples(path)
    except InputError as error:
        return [_from_error("training data", error)]
    with_input = sum(1 for example in facts.train_examples if example["input"])
    return [Finding("training data", OK, f"{path}: {len(facts.train_examples)} rows with instruction/output "
                    f"({with_input} with an input)")]


def check_eval_data(config: StudyConfig, deep: bool, facts: StudyFacts) -> list[Finding]:
    """Every evaluation dataset is where ``data.eval_source`` reads it, offline (``jobs/eval_data.py``); deep, and
    for local files, every row parses with the fields the workers read."""
    wanted = wanted_datasets(config.evaluate)
    missing = missing_eval_data(config.data, wanted)
    if missing:
        return [Finding("evaluation data", FAIL, f"evaluation data missing offline ({config.data.eval_source}): "
                        f"{'; '.join(missing)}", "put it there (README: Evaluation data) or set data.eval_source "
                        "/ data.eval_data_dir / data.hub_mirror_dir")]
    if not deep or config.data.eval_source != "local_files":
        how = "" if deep else " (rows not read)"
        return [Finding("evaluation data", OK, f"{len(wanted)} dataset(s) present offline ({config.data.eval_source})"
                        f"{how}")]
    findings = []
    for name in wanted:
        dataset = EVAL_DATASETS[name]
        path = location(config.data, dataset)
        try:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            findings.append(Finding("evaluation data", FAIL, f"{path} does not parse as JSON lines ({error})",
                                    "write one JSON object per line in the dataset's real schema"))
            continue
        bad = next((number for number, row in enumerate(rows, start=1)
                    if not isinstance(row, dict) or any(key not in row for key in dataset.fields)), None)
        if not rows or bad:
            where = f"row {bad} lacks" if bad else "no rows with"
            findings.append(Finding("evaluation data", FAIL, f"{path}: {where} field(s) of {', '.join(dataset.fields)}",
                                    f"convert it to the {dataset.description} schema (README: Evaluation data)"))
            continue
        facts.eval_rows[name] = rows
    if not findings:
        counts = ", ".join(f"{name} {len(facts.eval_rows[name])}" for name in wanted)
        findings.append(Finding("evaluation data", OK,
                                f"{len(wanted)} file(s) parse with their fields ({counts} rows)"))
    return findings


def check_batch_and_deepspeed(config: StudyConfig, plan: Plan, kind: str) -> list[Finding]:
    """The optimizer batch divides over the GPUs; a DeepSpeed config (if any) agrees with them."""
    if "finetune" not in workers_of(plan):
        return []
    tune, resources = config.finetune, config.resources.finetune
    world = resources.nodes * max(resources.gpus_per_node, 1) if kind == "slurm" else 1
    findings = []
    if tune.batch_size % (tune.micro_batch_size * world):
        findings.append(Finding(
            "batch", FAIL, f"finetune.batch_size {tune.batch_size} is not a multiple of micro_batch_size x ranks "
            f"({tune.micro_batch_size} x {world} = {tune.micro_batch_size * world})",
            "pick a batch size, micro batch or GPU count that divide"))
    else:
        accumulation = tune.batch_size // tune.micro_batch_size // world
        findings.append(Finding("batch", OK, f"{tune.batch_size} sequences per step = {tune.micro_batch_size} micro "
                                f"batch x {accumulation} accumulation x {world} rank(s)"))
    path, why = deepspeed_file(config, kind)
    if path is None:
        return findings + [Finding("deepspeed", SKIP, why)]
    try:
        settings = yaml.safe_load(path.read_text())  # YAML, or JSON (a subset of it)
    except OSError:
        return findings + [Finding("deepspeed", FAIL, f"DeepSpeed config {path} cannot be read",
                                   "set finetune.deepspeed to a name in configs/deepspeed/ or a readable file")]
    except yaml.YAMLError as error:
        return findings + [Finding("deepspeed", FAIL, f"{path}: malformed YAML/JSON ({str(error).splitlines()[0]})",
                                   "fix the syntax there")]
    problems = deepspeed_problems(settings if isinstance(settings, dict) else {}, config, world)
    if problems:
        return findings + [Finding("deepspeed", FAIL, f"{path}: {problem}", fix) for problem, fix in problems]
    stage = (settings.get("zero_optimization") or {}).get("stage", 0)
    return findings + [Finding("deepspeed", OK, f"{_shown(path)} ({why}): ZeRO stage {stage}, consistent with "
                               f"{world} rank(s) and the finetune batch")]


def deepspeed_file(config: StudyConfig, kind: str) -> tuple[Path | None, str]:
    """The DeepSpeed config the finetune will use, or None and why there is none.

    ``finetune.deepspeed`` names a file of ``configs/deepspeed/`` (``zero2``) or ``none``; ``auto`` is zero2
    on GPUs or with several ranks, as ``workers/distributed.py`` decides on the node. A local run is one
    process, on a GPU when this machine has one.
    """
    value = config.finetune.deepspeed  # validated by jobs/config.py: auto, none or a name in configs/deepspeed/
    resources = config.resources.finetune
    if value == "none":
        return None, "finetune.deepspeed is off: plain data parallel"
    if value == "auto":
        if kind == "slurm":
            on_gpu, ranks = resources.gpus_per_node > 0, resources.nodes * max(resources.gpus_per_node, 1)
        else:
            on_gpu, ranks = shutil.which("nvidia-smi") is not None, 1
        if not on_gpu and ranks == 1:
            return None, "finetune.deepspeed=auto, one CPU process: no DeepSpeed"
        value, why = "zero2", "finetune.deepspeed=auto"
    else:
        why = f"finetune.deepspeed={value}"
    return REPO_ROOT / "configs" / "deepspeed" / f"{value}.yaml", why


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def deepspeed_problems(settings: dict[str, Any], config: StudyConfig, world: int | None = None
                       ) -> list[tuple[str, str]]:
    """(problem, fix) for every way a DeepSpeed config disagrees with the study; "auto" always agrees.

    ``world``: the finetune's ranks (default: nodes x GPUs per node, as on SLURM).
    """
    tune, resources = config.finetune, config.resources.finetune
    problems = []
    world = world or resources.nodes * max(resources.gpus_per_node, 1)
    accumulation = max(1, tune.batch_size // tune.micro_batch_size // world)
    expected = {"train_micro_batch_size_per_gpu": tune.micro_batch_size, "gradient_accumulation_steps": accumulation,
                "train_batch_size": tune.micro_batch_size * accumulation * world}
    for key, value in expected.items():
        given = settings.get(key, "auto")
        if given != "auto" and given != value:
            problems.append((f"{key} is {given}, but the study runs {value} ({tune.micro_batch_size} micro batch x "
                             f"{accumulation} accumulation x {world} rank(s))", f'set {key} to "auto" in that file'))
    stage = (settings.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        problems.append((f"zero_optimization.stage {stage!r} is not 0-3", "use stage 2 (or 3 for models that do "
                                                                         "not fit one GPU)"))
    for precision, key in (("fp16", "fp16"), ("bf16", "bf16")):
        enabled = (settings.get(key) or {}).get("enabled", "auto")
        if enabled is True and tune.precision not in (precision, "auto"):
            problems.append((f"{key}.enabled is true, but finetune.precision is {tune.precision}",
                             f'set {key}.enabled to "auto" (or finetune.precision={precision})'))
    return problems


def check_template_secrets(config: StudyConfig) -> list[Finding]:
    """No token or password typed into the template: its setup lines are copied into every job's script in logs/."""
    names = inline_secrets(config)
    if not names:
        return []
    return [Finding("secrets", FAIL, f"{config.executor.slurm_template}: setup sets {', '.join(names)} to a literal "
                    "value, which would be copied into every job's submission script under logs/",
                    f"remove it there and export it in your shell before submitting (SLURM passes your environment "
                    f"on), or read it from a file: export {names[0]}=$(cat ~/.{names[0].lower()})")]


# ------------------------------------------------------------------------------------ running them


def collect_findings(config: StudyConfig, plan: Plan, kind: str, deep: bool, with_slurm: bool,
                     facts: StudyFacts | None = None) -> list[Finding]:
    facts = facts if facts is not None else StudyFacts()
    workers = workers_of(plan)
    findings = check_results_root(config, kind)
    findings += check_checkpoints(config, model_pairs(plan), facts)
    findings += check_adapters(config, plan, facts)
    if deep and facts.checkpoints:
        findings += check_tokenizers(facts)
    if "finetune" in workers:
        findings += check_training_data(config, deep, facts)
    if workers & {"evaluate_pruned", "evaluate_finetuned"}:
        findings += check_eval_data(config, deep, facts)
    findings += check_batch_and_deepspeed(config, plan, kind)
    if kind == "slurm" and plan.arrays:
        findings += check_template_secrets(config)
    if kind == "slurm" and with_slurm and plan.arrays:
        findings += check_slurm(config, plan, facts)
    elif kind != "slurm":
        findings.append(Finding("slurm", SKIP, "local executor: tasks run on this machine"))
    return findings


def require_ready(config: StudyConfig, plan: Plan, kind: str, dry_run: bool) -> None:
    """The quick checks every submission runs; the first failure is one InputError line (exit code 2)."""
    findings = collect_findings(config, plan, kind, deep=False, with_slurm=not dry_run)
    failures = [finding for finding in findings if finding.status == FAIL]
    if failures:
        more = f" (and {len(failures) - 1} more problem(s): see `python launch.py check`)" if len(failures) > 1 else ""
        raise InputError(failures[0].message() + more)


def render_checklist(findings: Iterable[Finding]) -> str:
    findings = list(findings)
    width = max(len(finding.check) for finding in findings)
    lines = [f"  {'status':<6}  {'check':<{width}}  detail"]
    for finding in findings:
        lines.append(f"  {finding.status:<6}  {finding.check:<{width}}  {finding.detail}")
        if finding.fix and finding.status in (FAIL, WARN):
            lines.append(f"  {'':<6}  {'':<{width}}  fix: {finding.fix}")
    return "\n".join(lines)


def check_study(config: StudyConfig, pairs: list[Pair], stage: str, executor: str) -> int:
    """``launch.py check``: the checklist and the cost estimate; exit code 2 when any check fails."""
    from jobs.cost import estimate, render_estimate

    kind = resolve_kind(executor)
    plan = build_plan(config, pairs, stage)
    facts = StudyFacts()
    findings = collect_findings(config, plan, kind, deep=True, with_slurm=True, facts=facts)
    estimates = estimate(config, plan, kind, facts) if plan.arrays else None
    if estimates:
        findings += estimates.findings
    print(f"check: {len(pairs)} pair(s), stage {stage}, {kind} executor, results in {config.study.results_root}"
          f"{', config ' + config.source if config.source else ''}")
    if not plan.arrays:
        print("  nothing to run: every selected pair is complete")
    print(render_checklist(findings))
    if estimates:
        print("\n" + render_estimate(estimates))
    counts = {status: sum(1 for finding in findings if finding.status == status) for status in (OK, WARN, SKIP, FAIL)}
    tally = ", ".join(f"{count} {status}" for status, count in counts.items() if count)
    if counts[FAIL]:
        print(f"\n{tally}: fix the FAIL rows, then run `python launch.py check` again", flush=True)
        return 2
    print(f"\n{tally}: ready to submit", flush=True)
    return 0

