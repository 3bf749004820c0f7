"""The pure plan: arrays, per-index and any-end dependencies, skipping what is done."""
import pytest

from jobs.cache import CACHE_FIELD, EVALUATION_FIELD, baseline_key, evaluation_identity
from jobs.config import load_config
from jobs.errors import ConfigError
from jobs.plan import Dependency, build_plan, describe
from jobs.state import mark_done
from jobs.study import Pair, StudyPaths, select_pairs


@pytest.fixture
def config(tmp_path):
    return load_config(None, [f"study.results_root={tmp_path}"])


def mark(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text("{}")
    mark_done(folder, ["result.json"])


def mark_evaluated(config, folder):
    """A finetuned evaluation counts as done only when made with the current evaluation settings."""
    identity = evaluation_identity(config)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text("{}")
    mark_done(folder, ["result.json"], extra={EVALUATION_FIELD: {"digest": identity.digest, "files": identity.files}})


def mark_baseline(config, pair):
    """A cached baseline counts only with the current cache key, which needs the model's files."""
    model = StudyPaths(config).pruned_model(pair)
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    folder = StudyPaths(config).baseline_eval_dir(pair)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text("{}")
    mark_done(folder, ["result.json"], extra={CACHE_FIELD: baseline_key(config, pair).as_record()})


def test_all_stages_for_the_whole_study(config):
    pairs = select_pairs(config)
    plan = build_plan(config, pairs, "all")
    assert plan.names == ["finetune", "evaluate_pruned", "evaluate_finetuned", "compare"]
    assert plan.array("finetune").size == 12
    finetuned = plan.array("evaluate_finetuned")
    assert finetuned.depends_on == (Dependency("finetune", "aftercorr"),)
    assert finetuned.pairs == plan.array("finetune").pairs  # index i follows finetune index i
    assert plan.array("compare").size == 1
    assert set(plan.array("compare").depends_on) == {Dependency("evaluate_pruned", "afterany"),
                                                     Dependency("evaluate_finetuned", "afterany")}
    assert plan.array("evaluate_pruned").depends_on == ()


def test_single_pair_is_an_array_of_one(config):
    pairs = select_pairs(config, "Llama", "best_acc")
    plan = build_plan(config, pairs, "finetune")
    assert plan.names == ["finetune"]
    assert plan.array("finetune").pairs == (Pair("Llama", "best_acc"),)
    tasks = plan.array("finetune").tasks(config)
    assert [(task.index, task.pair) for task in tasks] == [(0, Pair("Llama", "best_acc"))]


def test_unknown_names_suggest(config):
    with pytest.raises(ConfigError, match='did you mean "Llama"'):
        select_pairs(config, "Lama", "best_acc")
    with pytest.raises(ConfigError, match='did you mean "best_acc"'):
        select_pairs(config, "Llama", "best-acc")


def test_done_pairs_are_skipped_and_cached_baselines_reused(config):
    paths = StudyPaths(config)
    done_pair, ready_pair = Pair("Qwen", "best_acc"), Pair("Qwen", "best_ppl")
    for pair in (done_pair, ready_pair):
        mark(paths.finetuned_dir(pair))
        mark_baseline(config, pair)
    mark_evaluated(config, paths.finetuned_eval_dir(done_pair))
    plan = build_plan(config, select_pairs(config), "all")
    assert done_pair not in plan.array("finetune").pairs and ready_pair not in plan.array("finetune").pairs
    assert plan.array("finetune").size == 10
    assert plan.array("evaluate_pruned").size == 10
    # finetuned but not yet evaluated: its own array, with no dependency on this submission's finetunes
    assert plan.array("evaluate_finetuned_ready").pairs == (ready_pair,)
    assert plan.array("evaluate_finetuned_ready").depends_on == ()
    assert "skipped finetune Qwen/best_acc: done" in describe(plan)


def test_evaluate_stage_alone_waits_for_adapters(config):
    plan = build_plan(config, select_pairs(config, "Mistral", "best_ppl"), "evaluate")
    assert plan.names == ["evaluate_pruned"]
    assert "no finished adapter yet" in describe(plan)


def test_compare_alone_has_no_dependencies(config):
    plan = build_plan(config, select_pairs(config), "compare")
    assert plan.names == ["compare"] and plan.array("compare").depends_on == ()


def test_finetuned_evaluation_with_other_settings_is_planned_again(config, tmp_path):
    paths = StudyPaths(config)
    pair = Pair("Mistral", "best_acc")
    mark(paths.finetuned_dir(pair))
    mark_evaluated(config, paths.finetuned_eval_dir(pair))
    assert "evaluate_finetuned_ready" not in build_plan(config, [pair], "evaluate").names
    changed = load_config(None, [f"study.results_root={tmp_path}", "evaluate.ppl_seq_len=2048"])
    assert build_plan(changed, [pair], "evaluate").array("evaluate_finetuned_ready").pairs == (pair,)
