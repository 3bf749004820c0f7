"""The help texts, the README and the shipped YAML files agree with the code."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import launch
from jobs import reference
from jobs.config import load_config
from jobs.slurm_template import read_template

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def run_help(*args: str) -> str:
    result = subprocess.run([sys.executable, str(REPO / "launch.py"), *args, "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_readme_reference_sections_match_the_code():
    assert reference.section(README, "config") == reference.config_reference(), \
        "README's config reference is stale: run python -m jobs.reference"
    assert reference.section(README, "commands") == reference.command_reference(), \
        "README's command reference is stale: run python -m jobs.reference"


def test_config_reference_lists_every_key():
    from jobs.config import iter_fields
    section = reference.section(README, "config")
    for key, _, _ in iter_fields():
        assert f"| `{key}` |" in section, key


def test_subcommands_in_help_and_readme_agree():
    top = run_help()
    in_help = set(re.findall(r"python launch\.py ([a-z]+)", top))
    assert in_help == set(launch.COMMANDS)
    prose = README.split("## Config reference")[0]  # the hand-written part
    in_readme = set(re.findall(r"launch\.py ([a-z]+)\b", prose))
    assert in_readme == set(launch.COMMANDS), in_readme ^ set(launch.COMMANDS)


@pytest.mark.parametrize("command", ["", *launch.COMMANDS])
def test_every_option_is_in_the_readme(command):
    parser = launch.command_parser(command)
    commands_section = reference.section(README, "commands")
    title = "launch.py (submit or run a study)" if not command else f"launch.py {command}"
    block = commands_section.split(f"#### `{title}`", 1)[1].split("#### `", 1)[0]
    for action in parser._actions:
        for option in action.option_strings:
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", block), (command, option)
    assert (parser.description or "").split()[0] in block


def test_top_level_help_is_fast_and_light():
    code = ("import sys, time; started = time.monotonic(); import launch\n"
            "try:\n    launch.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'lm_eval', 'deepspeed') if m in sys.modules]\n"
            "print('HEAVY', heavy, time.monotonic() - started)")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr
    assert time.monotonic() - started < 10


YAML_FILES = sorted([*(REPO / "configs").glob("*.yaml"), *(REPO / "configs" / "deepspeed").glob("*.yaml"),
                     *(REPO / "slurm_templates").glob("*.yaml")])


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda path: str(path.relative_to(REPO)))
def test_every_yaml_opens_with_the_command_that_uses_it(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Used by: python launch.py"), first


@pytest.mark.parametrize("path", sorted((REPO / "slurm_templates").glob("*.yaml")), ids=lambda path: path.name)
def test_every_slurm_template_loads_beneath_every_study_config(path):
    template = read_template(str(path))
    assert template["setup"]
    for config_file in sorted((REPO / "configs").glob("*.yaml")):
        own = (yaml.safe_load(config_file.read_text()).get("resources") or {})
        config = load_config(config_file, [f"executor.slurm_template={path}"])
        for stage, presets in template["resources"].items():
            for key, value in presets.items():
                expected = (own.get(stage) or {}).get(key, value)  # the study's own value wins
                assert getattr(getattr(config.resources, stage), key) == expected, (config_file.name, stage, key)


def test_reference_check_mode_agrees():
    result = subprocess.run([sys.executable, "-m", "jobs.reference", "--check"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
