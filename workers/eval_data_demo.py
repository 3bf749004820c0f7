"""Small made-up evaluation files in the real datasets' layouts and schemas (demo study and tests).

Every sentence comes from the word lists and templates below, deterministically for a seed; no real
dataset text is copied. The layout is the one ``workers.perplexity`` and ``workers.zero_shot`` read:

    wikitext2/test.jsonl        {"text"}                       wikitext-2-raw-v1, test split
    wikitext_document_level/test.jsonl
                                {"page"}                       EleutherAI/wikitext_document_level, the same
                                                               text as one row per article (lm-eval's wikitext)
    ptb/validation.jsonl        {"sentence"}                   ptb_text_only/penn_treebank, validation
    boolq/validation.jsonl      {"question", "passage", "idx", "label": 0|1}
    piqa/validation.jsonl       {"goal", "sol1", "sol2", "label": 0|1}
    hellaswag/validation.jsonl  {"ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings",
                                 "source_id", "split", "split_type", "label": "0".."3"}
    winogrande/validation.jsonl {"sentence" (one "_"), "option1", "option2", "answer": "1"|"2"}
    arc_easy/test.jsonl, arc_challenge/test.jsonl
                                {"id", "question", "choices": {"text", "label"}, "answerKey"}
    openbookqa/test.jsonl       {"id", "question_stem", "choices": {"text", "label"}, "answerKey"}
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable

from jobs.state import atomic_write_text

NAMES = ["Anna", "Boris", "Clara", "David", "Elena", "Felix", "Greta", "Hugo", "Irene", "Jonas"]
NOUNS = ["river", "garden", "bridge", "market", "window", "letter", "engine", "forest", "village", "lamp",
         "kettle", "ladder", "basket", "mirror", "harbor", "tower", "bicycle", "blanket", "candle", "wagon"]
ADJECTIVES = ["old", "quiet", "bright", "heavy", "narrow", "warm", "small", "wooden", "green", "distant"]
VERBS = ["repairs", "paints", "visits", "carries", "builds", "cleans", "watches", "opens", "follows", "sells"]
PLACES = ["the north valley", "a small town", "the coast", "the old quarter", "the hills", "the island"]
TOOLS = ["a brush", "a rope", "a hammer", "a cloth", "a bucket", "a knife", "a spoon", "a towel"]
ACTIVITIES = ["Cooking dinner", "Washing a car", "Planting trees", "Painting a fence", "Fixing a bike",
              "Packing a bag", "Cleaning windows", "Baking bread"]


def _noun(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"


def _clause(rng: random.Random) -> str:
    return f"{rng.choice(NAMES)} {rng.choice(VERBS)} the {_noun(rng)} near {rng.choice(PLACES)}"


def _sentence(rng: random.Random) -> str:
    text = _clause(rng)
    if rng.random() < 0.4:
        text += f" , and {_clause(rng)}"
    if rng.random() < 0.3:
        text += f" in {rng.randint(1850, 2020)}"
    return text + " ."


def _wikitext_rows(rng: random.Random, lines: int) -> list[dict[str, Any]]:
    """Headings, blank lines and paragraphs, the shape of wikitext-2-raw's test split."""
    rows: list[dict[str, Any]] = []
    while len(rows) < lines:
        if rng.random() < 0.15:
            rows += [{"text": ""}, {"text": f" = The {_noun(rng).title()} = \n"}, {"text": ""}]
        rows.append({"text": " " + " ".join(_sentence(rng) for _ in range(rng.randint(2, 5))) + " \n"})
    return rows[:lines]


def _wikitext_pages(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same lines regrouped as EleutherAI/wikitext_document_level does: one "page" per top-level article.

    A top-level heading is a line " = Title = " (sub-headings have more "="); its article runs to the next one.
    """
    pages: list[list[str]] = []
    for row in rows:
        line = row["text"]
        stripped = line.strip()
        heading = stripped.startswith("= ") and stripped.endswith(" =") and not stripped.startswith("= =")
        if heading or not pages:
            pages.append([])
        pages[-1].append(line)
    return [{"page": "".join(lines)} for lines in pages if "".join(lines).strip()]


def _ptb_rows(rng: random.Random, lines: int) -> list[dict[str, Any]]:
    """Lower-case sentences with <unk> and N, like ptb_text_only."""
    rows = []
    for _ in range(lines):
        words = _sentence(rng).lower().rstrip(" .").replace(",", "").split()
        words = ["N" if word.isdigit() else "<unk>" if rng.random() < 0.05 else word for word in words]
        rows.append({"sentence": " ".join(words)})
    return rows


def _boolq(rng: random.Random, index: int) -> dict[str, Any]:
    name, verb, noun = rng.choice(NAMES), rng.choice(VERBS), _noun(rng)
    passage = f"{name} {verb} the {noun} every week . " + " ".join(_sentence(rng) for _ in range(2))
    label = rng.randint(0, 1)
    asked_verb = verb if label else rng.choice([v for v in VERBS if v != verb])
    return {"question": f"does {name.lower()} {asked_verb.rstrip('s')} the {noun}", "passage": passage,
            "idx": index, "label": label}


def _piqa(rng: random.Random, index: int) -> dict[str, Any]:
    noun = _noun(rng)
    sol1, sol2 = (f"Rub the {noun} with {tool} and let it dry." for tool in rng.sample(TOOLS, 2))
    return {"goal": f"How do you clean the {noun}?", "sol1": sol1, "sol2": sol2, "label": rng.randint(0, 1)}


def _hellaswag(rng: random.Random, index: int) -> dict[str, Any]:
    activity, name = rng.choice(ACTIVITIES), rng.choice(NAMES)
    ctx_a = f"{name} stands in {rng.choice(PLACES)} with {rng.choice(TOOLS)}."
    ctx_b = f"then {name.lower()}"
    endings = [f"{rng.choice(VERBS)} the {_noun(rng)} with care." for _ in range(4)]
    split_type = rng.choice(["indomain", "zeroshot"])
    return {"ind": 10 * index + 4, "activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b,
            "ctx": f"{ctx_a} {ctx_b}", "endings": endings, "source_id": f"demo~{index:05d}", "split": "val",
            "split_type": split_type, "label": str(rng.randint(0, 3))}


def _winogrande(rng: random.Random, index: int) -> dict[str, Any]:
    first, second = rng.sample(NAMES, 2)
    sentence = f"{first} gave the {_noun(rng)} to {second} because _ had no room for it."
    return {"sentence": sentence, "option1": first, "option2": second, "answer": rng.choice(["1", "2"])}


def _arc(rng: random.Random, index: int, prefix: str) -> dict[str, Any]:
    # Most ARC questions label their choices A-D; some use 1-4, and a few have 3 or 5 choices.
    count = rng.choice([4, 4, 4, 3, 5])
    labels = list("12345"[:count]) if rng.random() < 0.1 else list("ABCDE"[:count])
    texts = [f"the {_noun(rng)}" for _ in range(count)]
    return {"id": f"{prefix}_{index:05d}", "question": f"Which object does {rng.choice(NAMES)} use to reach "
            f"{rng.choice(PLACES)}?", "choices": {"text": texts, "label": labels},
            "answerKey": rng.choice(labels)}


def _openbookqa(rng: random.Random, index: int) -> dict[str, Any]:
    labels = ["A", "B", "C", "D"]
    return {"id": f"{index}-{rng.randint(100, 999)}", "question_stem": f"A {_noun(rng)} is most useful for",
            "choices": {"text": [f"holding {rng.choice(TOOLS)}" for _ in labels], "label": labels},
            "answerKey": rng.choice(labels)}


TASK_FILES: dict[str, tuple[str, Callable[[random.Random, int], dict[str, Any]]]] = {
    "boolq/validation.jsonl": ("boolq", _boolq),
    "piqa/validation.jsonl": ("piqa", _piqa),
    "hellaswag/validation.jsonl": ("hellaswag", _hellaswag),
    "winogrande/validation.jsonl": ("winogrande", _winogrande),
    "arc_easy/test.jsonl": ("arc_easy", lambda rng, i: _arc(rng, i, "DemoEasy")),
    "arc_challenge/test.jsonl": ("arc_challenge", lambda rng, i: _arc(rng, i, "DemoChallenge")),
    "openbookqa/test.jsonl": ("openbookqa", _openbookqa),
}


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def write_demo_eval_data(out_dir: Path, seed: int = 0, docs_per_task: int = 40, ppl_text_lines: int = 300) -> None:
    """Write every file of the layout above under ``out_dir`` (overwriting), deterministic for ``seed``."""
    out_dir = Path(out_dir)
    wikitext = _wikitext_rows(random.Random(f"{seed}-wikitext2"), ppl_text_lines)
    _write_jsonl(out_dir / "wikitext2" / "test.jsonl", wikitext)
    _write_jsonl(out_dir / "wikitext_document_level" / "test.jsonl", _wikitext_pages(wikitext))
    _write_jsonl(out_dir / "ptb" / "validation.jsonl", _ptb_rows(random.Random(f"{seed}-ptb"), ppl_text_lines))
    for relative, (name, make) in TASK_FILES.items():
        rng = random.Random(f"{seed}-{name}")
        _write_jsonl(out_dir / relative, [make(rng, index) for index in range(docs_per_task)])
