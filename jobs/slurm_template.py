"""The user-edited part of SLURM jobs (``slurm_templates/*.yaml``), rendered in one place."""
from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from jobs.config import StudyConfig
from jobs.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent


def setup_lines(config: StudyConfig) -> list[str]:
    """Shell lines run before the worker: the template's own, then this checkout on PYTHONPATH."""
    path = Path(config.executor.slurm_template)
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError:
        raise ConfigError(f"executor.slurm_template: {path} cannot be read; copy slurm_templates/default.yaml "
                          "and point executor.slurm_template at it") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: malformed YAML ({error}); fix the syntax there") from None
    lines = data.get("setup") or []
    if not isinstance(data, dict) or set(data) - {"setup"} or not all(isinstance(line, str) for line in lines):
        raise ConfigError(f"{path}: expected a mapping with one key, setup: a list of shell lines")
    return [*lines, f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"]
