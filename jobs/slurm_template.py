"""The user-edited part of SLURM jobs (``slurm_templates/*.yaml``), read in one place.

A template has two keys, both optional:

    setup:       shell lines every job runs before the worker (module load, venv activation, exports)
    resources:   per-stage defaults (finetune, evaluate, compare) for the study's ``resources.<stage>``:
                 partition, account, qos, time_min, ... -- the cluster's presets

Precedence, lowest first: the defaults in ``jobs/config.py``, the template's ``resources``, the study
YAML, the ``key=value`` overrides. So one template serves every study on a cluster, and a study still
sets what is its own (e.g. a longer ``time_min``).
"""
from __future__ import annotations

import copy
import dataclasses
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from jobs.config import StageResources, StudyConfig
from jobs.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
STAGES = ("finetune", "evaluate", "compare")
DEFAULT_TEMPLATE = "slurm_templates/default.yaml"
# A setup line that assigns a literal to a secret-looking variable (export HF_TOKEN=hf_...): the line is copied
# into every job's submission script under logs/. ``export HF_TOKEN=$(cat ~/.hf_token)`` or ``="$HF_TOKEN"`` is fine.
ASSIGNMENT = re.compile(r"\b([A-Za-z_]\w*)=(?![\"']?\$)[^\s;]+")
SECRET_NAME = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY)(_|$)", re.IGNORECASE)


def template_path(name: str) -> Path:
    path = Path(name)
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    return path


def read_template(name: str) -> dict[str, Any]:
    """The template as a checked mapping; ConfigError names the file and what is wrong in it."""
    path = template_path(name)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError:
        raise ConfigError(f"executor.slurm_template: {path} cannot be read; copy slurm_templates/default.yaml "
                          "and point executor.slurm_template at it") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: malformed YAML ({str(error).splitlines()[0]}); fix the syntax there") from None
    if not isinstance(data, dict) or set(data) - {"setup", "resources"}:
        raise ConfigError(f"{path}: expected a mapping with the keys setup (shell lines) and resources "
                          "(per-stage presets)")
    lines = data.get("setup") or []
    if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
        raise ConfigError(f"{path}: setup must be a list of shell lines")
    resources = data.get("resources") or {}
    valid = [item.name for item in dataclasses.fields(StageResources)]
    if not isinstance(resources, dict):
        raise ConfigError(f"{path}: resources must map stages ({', '.join(STAGES)}) to settings")
    for stage, values in resources.items():
        if stage not in STAGES or not isinstance(values, dict) or set(values) - set(valid):
            raise ConfigError(f"{path}: resources.{stage} must be one of {', '.join(STAGES)} with keys from "
                              f"{', '.join(valid)}")
    return {"setup": lines, "resources": resources}


def with_template_resources(raw: dict[str, Any]) -> dict[str, Any]:
    """The raw study config with the template's per-stage presets underneath (the config's own values win)."""
    executor = raw.get("executor") if isinstance(raw.get("executor"), dict) else {}
    presets = read_template(str(executor.get("slurm_template") or DEFAULT_TEMPLATE))["resources"]
    if not presets:
        return raw
    merged = copy.deepcopy(raw)
    resources = merged.setdefault("resources", {})
    if not isinstance(resources, dict):
        return raw  # the config's own problem; load_config reports it
    for stage, values in presets.items():
        own = resources.setdefault(stage, {})
        if isinstance(own, dict):
            resources[stage] = {**values, **own}
    return merged


def setup_lines(config: StudyConfig) -> list[str]:
    """Shell lines run before the worker: the template's own, then this checkout on PYTHONPATH."""
    lines = read_template(config.executor.slurm_template)["setup"]
    return [*lines, f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"]


def inline_secrets(config: StudyConfig) -> list[str]:
    """Names of the variables the template's setup lines set to a literal secret (see SECRET_NAME)."""
    lines = read_template(config.executor.slurm_template)["setup"]
    return sorted({match.group(1) for line in lines for match in ASSIGNMENT.finditer(line)
                   if SECRET_NAME.search(match.group(1))})
