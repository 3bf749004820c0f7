"""`launch.py select`: best_acc / best_ppl per model from a pruning search, materialised with their records;
bad input is one line, exit code 2, and nothing written."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.config import load_config
from jobs.errors import InputError
from jobs.select import read_search, select
from jobs.state import sha256_of
from tests.cli_helpers import assert_one_line_error

REPO = Path(__file__).resolve().parent.parent
MODELS = ["Llama", "Qwen"]
# model, candidate, acc, ppl, pruning ratio; Llama's r25 is a pickle (LLM-Pruner's own output format)
ROWS = [
    ("Llama", "Llama-r20", 0.5946, 15.82, 0.20),
    ("Llama", "Llama-r25", 0.5731, 13.39, 0.25),
    ("Llama", "Llama-r35", 0.5412, 19.05, 0.35),
    ("Qwen", "Qwen-r20", 0.6102, 11.20, 0.20),
    ("Qwen", "Qwen-r25", 0.6011, 10.87, 0.25),
    ("Qwen", "Qwen-r35", 0.5710, 12.90, 0.35),
]


def make_candidate(folder: Path, pickle: bool = False) -> None:
    folder.mkdir(parents=True)
    if pickle:
        (folder / "pytorch_model.bin").write_bytes(b"pickle stand-in")
        return
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    (folder / "tokenizer.json").write_text("{}")


@pytest.fixture
def search(tmp_path):
    """Candidates on disk and the same search as CSV, JSON lines and a folder of JSON files."""
    base = tmp_path / "prune_log"
    for model, name, *_ in ROWS:
        make_candidate(base / name, pickle=name == "Llama-r25")
    with (base / "search.csv").open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["model", "candidate", "acc", "ppl", "pruning_ratio", "pruner_type"])
        for model, name, acc, ppl, ratio in ROWS:
            writer.writerow([model, name, acc, ppl, ratio, "taylor"])
    rows = [{"model": model, "candidate": name, "path": name, "acc": acc, "ppl": ppl,
             "params": {"pruning_ratio": ratio, "pruner_type": "taylor"}} for model, name, acc, ppl, ratio in ROWS]
    (base / "search.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    per_candidate = tmp_path / "per_candidate"
    per_candidate.mkdir()
    for row in rows:
        record = {**row, "path": f"../prune_log/{row['path']}"}
        (per_candidate / f"{row['candidate']}.json").write_text(json.dumps(record))
    return tmp_path, base


def study(tmp_path, *extra):
    return load_config(REPO / "configs" / "study.yaml", [f"study.results_root={tmp_path / 'results'}",
                                                          f"study.models=[{', '.join(MODELS)}]", *extra])


def launch_select(tmp_path, *args):
    command = [sys.executable, str(REPO / "launch.py"), "select", f"study.results_root={tmp_path / 'results'}",
               f"study.models=[{', '.join(MODELS)}]", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)


def tree(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*")) if root.exists() else []


@pytest.mark.parametrize("source", ["prune_log/search.csv", "prune_log/search.jsonl", "per_candidate"])
def test_picks_best_acc_and_best_ppl_from_every_format(search, source, capsys):
    tmp_path, base = search
    config = study(tmp_path)
    assert select(config, tmp_path / source) == 0
    root = tmp_path / "results" / "for_finetuning"
    expected = {("Llama", "best_acc"): "Llama-r20", ("Llama", "best_ppl"): "Llama-r25",
                ("Qwen", "best_acc"): "Qwen-r20", ("Qwen", "best_ppl"): "Qwen-r25"}
    for (model, pruning_config), name in expected.items():
        info = json.loads((root / model / pruning_config / "selection_info.json").read_text())
        assert info["candidate"] == name
        assert info["params"]["pruning_ratio"] in (0.2, 0.25) and info["params"]["pruner_type"] == "taylor"
        assert info["search"]["sha256"] == read_search(tmp_path / source).sha256
        assert info["runner_up"]["candidate"] != name
        assert info["materialised_as"] == "symlink"
    llama_ppl = json.loads((root / "Llama" / "best_ppl" / "selection_info.json").read_text())
    assert (llama_ppl["acc"], llama_ppl["ppl"]) == (0.5731, 13.39)
    assert llama_ppl["runner_up"]["candidate"] == "Llama-r20" and llama_ppl["format"] == "llm-pruner pickle"
    link = root / "Llama" / "best_ppl" / "pytorch_model.bin"
    assert link.is_symlink() and link.resolve() == (base / "Llama-r25" / "pytorch_model.bin").resolve()
    assert (root / "Qwen" / "best_acc" / "model.safetensors").resolve() == (base / "Qwen-r20" / "model.safetensors")
    summary = (root / "SUMMARY.md").read_text()
    assert "best_acc/  # ACC: 0.5946, PPL: 15.82" in summary
    assert "| Qwen | best_ppl | Qwen-r25 | 0.6011 | 10.87 |" in summary
    assert summary in capsys.readouterr().out


def test_search_file_hash_and_rows_are_recorded(search):
    tmp_path, base = search
    select(study(tmp_path), base / "search.csv")
    info = json.loads((tmp_path / "results/for_finetuning/Qwen/best_ppl/selection_info.json").read_text())
    assert info["search"]["sha256"] == sha256_of(base / "search.csv")
    assert info["search"]["path"] == str((base / "search.csv").resolve())
    assert info["search"]["row"].endswith("search.csv row 6")
    assert info["criterion"].startswith("lowest ppl")


def test_tie_break_is_lower_ppl_then_smaller_id(tmp_path):
    base = tmp_path / "search"
    rows = [("Llama", "b", 0.60, 12.0), ("Llama", "a", 0.60, 12.0), ("Llama", "c", 0.60, 11.0),
            ("Llama", "d", 0.55, 11.0)]
    for _, name, *_ in rows:
        make_candidate(base / name)
    (base / "s.jsonl").write_text("".join(json.dumps({"model": m, "candidate": n, "acc": a, "ppl": p}) + "\n"
                                          for m, n, a, p in rows))
    config = load_config(None, [f"study.results_root={tmp_path / 'r'}", "study.models=[Llama]"])
    select(config, base / "s.jsonl")
    folder = tmp_path / "r" / "for_finetuning" / "Llama"
    picked = {name: json.loads((folder / name / "selection_info.json").read_text())["candidate"]
              for name in ("best_acc", "best_ppl")}
    assert picked == {"best_acc": "c", "best_ppl": "c"}  # acc tie -> lower ppl; ppl tie -> higher acc
    rows = [("Llama", "b", 0.60, 12.0), ("Llama", "a", 0.60, 12.0)]
    (base / "t.jsonl").write_text("".join(json.dumps({"model": m, "candidate": n, "acc": a, "ppl": p}) + "\n"
                                          for m, n, a, p in rows))
    config = load_config(None, [f"study.results_root={tmp_path / 'r2'}", "study.models=[Llama]"])
    select(config, base / "t.jsonl")
    info = json.loads((tmp_path / "r2/for_finetuning/Llama/best_acc/selection_info.json").read_text())
    assert info["candidate"] == "a"  # a full tie -> the smaller candidate id


def test_copy_mode_copies_and_rerun_is_a_no_op(search):
    tmp_path, base = search
    config = study(tmp_path)
    select(config, base / "search.csv", mode="copy")
    copied = tmp_path / "results/for_finetuning/Qwen/best_acc/model.safetensors"
    assert copied.is_file() and not copied.is_symlink()
    before = {path: path.stat().st_mtime_ns for path in (tmp_path / "results").rglob("selection_info.json")}
    assert select(config, base / "search.csv", mode="copy") == 0  # unchanged: left as it is
    assert before == {path: path.stat().st_mtime_ns for path in (tmp_path / "results").rglob("selection_info.json")}


def test_dry_run_writes_nothing(search):
    tmp_path, base = search
    select(study(tmp_path), base / "search.csv", dry_run=True)
    assert not (tmp_path / "results").exists()


def test_metrics_source_is_carried_into_records(tmp_path):
    base = tmp_path / "s"
    make_candidate(base / "x")
    (base / "s.jsonl").write_text(json.dumps({"model": "Llama", "candidate": "x", "acc": 0.5, "ppl": 9.0,
                                              "metrics_source": "synthetic stand-in; not measured"}) + "\n")
    config = load_config(None, [f"study.results_root={tmp_path / 'r'}", "study.models=[Llama]"])
    select(config, base / "s.jsonl")
    assert json.loads((tmp_path / "r/for_finetuning/Llama/best_acc/selection_info.json").read_text())[
        "metrics_source"] == "synthetic stand-in; not measured"
    assert "synthetic stand-in; not measured" in (tmp_path / "r/for_finetuning/SUMMARY.md").read_text()


def test_missing_columns(search):
    tmp_path, base = search
    bad = base / "bad.csv"
    bad.write_text("model,candidate,accuracy\nLlama,Llama-r20,0.5\n")
    assert_one_line_error(launch_select(tmp_path, "--search", str(bad)), "missing column(s) acc, ppl", "found: model")
    assert not (tmp_path / "results").exists()


def test_unknown_model_name(search):
    tmp_path, base = search
    text = (base / "search.csv").read_text().replace("Qwen,Qwen-r35", "Qwenn,Qwen-r35")
    (base / "bad.csv").write_text(text)
    assert_one_line_error(launch_select(tmp_path, "--search", str(base / "bad.csv")), "unknown model 'Qwenn'",
                    'did you mean "Qwen"', "bad.csv row 7")
    assert not (tmp_path / "results").exists()


def test_no_candidate_for_a_model(search):
    tmp_path, base = search
    lines = [line for line in (base / "search.jsonl").read_text().splitlines() if '"Qwen"' not in line]
    (base / "llama_only.jsonl").write_text("\n".join(lines) + "\n")
    assert_one_line_error(launch_select(tmp_path, "--search", str(base / "llama_only.jsonl")), "no candidate for Qwen")
    assert not (tmp_path / "results").exists()


def test_destination_with_different_content(search):
    tmp_path, base = search
    occupied = tmp_path / "results" / "for_finetuning" / "Qwen" / "best_ppl"
    make_candidate(occupied)  # a checkpoint someone put there by hand
    before = tree(tmp_path / "results")
    assert_one_line_error(launch_select(tmp_path, "--search", str(base / "search.csv")), "Qwen/best_ppl",
                    "already exists with different content")
    assert tree(tmp_path / "results") == before  # not even the other pairs were written


def test_selection_changes_are_refused(search):
    tmp_path, base = search
    select(study(tmp_path), base / "search.csv")
    text = (base / "search.csv").read_text().replace("Qwen,Qwen-r35,0.571", "Qwen,Qwen-r35,0.71")
    (base / "changed.csv").write_text(text)
    assert_one_line_error(launch_select(tmp_path, "--search", str(base / "changed.csv")),
                    "Qwen/best_acc", "holds candidate 'Qwen-r20', the search selects 'Qwen-r35'")


@pytest.mark.parametrize("row, fragment", [
    ({"model": "Llama", "candidate": "Llama-r20", "acc": 59.46, "ppl": 13.0}, "not a fraction in [0, 1]"),
    ({"model": "Llama", "candidate": "Llama-r20", "acc": "n/a", "ppl": 13.0}, "acc 'n/a' is not a number"),
    ({"model": "Llama", "candidate": "missing-folder", "acc": 0.9, "ppl": 1.0}, "does not exist"),
])
def test_bad_rows(search, row, fragment):
    tmp_path, base = search
    text = (base / "search.jsonl").read_text() + json.dumps(row) + "\n"
    (base / "bad.jsonl").write_text(text)
    assert_one_line_error(launch_select(tmp_path, "--search", str(base / "bad.jsonl")), fragment)
    assert not (tmp_path / "results").exists()


def test_malformed_and_missing_search(search):
    tmp_path, base = search
    (base / "broken.jsonl").write_text('{"model": "Llama",\n')
    assert_one_line_error(launch_select(tmp_path, "--search", str(base / "broken.jsonl")), "broken.jsonl line 1",
                    "malformed JSON")
    assert_one_line_error(launch_select(tmp_path, "--search", str(base / "nope.csv")), "does not exist")


def test_duplicate_candidate_ids(search):
    tmp_path, base = search
    text = (base / "search.jsonl").read_text()
    (base / "dup.jsonl").write_text(text + text.splitlines()[0] + "\n")
    with pytest.raises(InputError, match="appears twice"):
        read_search(base / "dup.jsonl")


def test_selected_pickle_is_linked_where_the_study_reads_it(search):
    tmp_path, base = search
    from jobs.checkpoints import find_checkpoint
    from jobs.study import Pair, StudyPaths
    config = study(tmp_path)
    select(config, base / "search.csv")
    kind, location = find_checkpoint(StudyPaths(config).pruned_model(Pair("Llama", "best_ppl")))
    assert kind == "pickle" and location.name == "pytorch_model.bin"
    assert os.path.realpath(location) == str((base / "Llama-r25" / "pytorch_model.bin").resolve())
