"""The pairs of a study and where each pair's inputs and outputs live (one slug per pair everywhere)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from jobs.config import MODEL_NAMES, PRUNING_CONFIG_NAMES, StudyConfig, did_you_mean
from jobs.errors import ConfigError

# Names become folder names, job names and log names: nothing a shell or a path could misread.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True, order=True)
class Pair:
    """One pruned checkpoint of the study: a model and the pruning config it was selected by."""

    model: str
    config: str

    @property
    def slug(self) -> str:
        return f"{self.model}__{self.config}"

    @property
    def label(self) -> str:
        return f"{self.model}/{self.config}"

    @classmethod
    def from_slug(cls, slug: str) -> "Pair":
        model, _, config = slug.partition("__")
        return cls(model, config)


def select_pairs(config: StudyConfig, model: str | None = None, pruning_config: str | None = None) -> list[Pair]:
    """All pairs of the study, or the single pair asked for (an array of one)."""
    models = list(config.study.models)
    configs = list(config.study.pruning_configs)
    for name, given, valid, flag in (("model", model, models, "--model"),
                                     ("pruning config", pruning_config, configs, "--config")):
        if given is None:
            continue
        if not SAFE_NAME.match(given):
            raise ConfigError(f"{flag} {given!r}: not a valid {name} name (letters, digits and . _ - only, since it "
                              f"becomes folder, log and job names); use one of {', '.join(valid)}")
        known = MODEL_NAMES if flag == "--model" else PRUNING_CONFIG_NAMES
        if given not in valid and given in known:
            setting = "study.models" if flag == "--model" else "study.pruning_configs"
            raise ConfigError(f"{flag} {given!r}: not in this study's {setting} ({', '.join(valid)}); add it there "
                              f"or pick one of those")
        if given not in valid:
            hint = did_you_mean(given, valid) or did_you_mean(given, known)
            raise ConfigError(f"{flag} {given!r}: unknown {name}{hint} (valid: {', '.join(valid)})")
    if (model is None) != (pruning_config is None):
        raise ConfigError("a single pair needs both --model and --config (or use --batch-all)")
    if model is not None:
        return [Pair(model, pruning_config)]
    return [Pair(m, c) for m in models for c in configs]


def pickle_allowed(config: StudyConfig, pair: Pair) -> bool:
    allowed = set(config.study.allow_pickle)
    return bool({"*", pair.model, pair.label} & allowed)


class StudyPaths:
    """The results tree of one study (see README: "Results tree")."""

    def __init__(self, config: StudyConfig) -> None:
        self.config = config
        self.root = Path(config.study.results_root)

    def pruned_model(self, pair: Pair) -> Path:
        return Path(self.config.study.pruned_model_path.format(
            results_root=self.root, model=pair.model, config=pair.config))

    def baseline_eval_dir(self, pair: Pair) -> Path:
        """Pre-finetune results, cached beside the pruned model and reused by later studies."""
        model = self.pruned_model(pair)
        return (model.parent if model.is_file() else model) / "baseline_evaluation"

    def finetuned_dir(self, pair: Pair) -> Path:
        return self.root / "finetuned" / pair.model / f"{pair.config}_finetuned"

    def finetuned_eval_dir(self, pair: Pair) -> Path:
        return self.root / "finetuned_evaluation" / pair.model / f"{pair.config}_finetuned"

    def logs_dir(self) -> Path:
        return self.root / "logs"

    def task_log(self, array_name: str, pair: Pair | None) -> Path:
        return self.logs_dir() / array_name / f"{pair.slug if pair else 'study'}.log"

    def study_summary(self) -> Path:
        return self.root / "SUMMARY.md"
