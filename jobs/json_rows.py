"""Rows of a JSON list or JSON lines file, each with where it stands, for one-line error messages."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jobs.errors import InputError


def json_rows(path: Path, text: str, hint: str) -> list[tuple[str, Any]]:
    """(where, row) pairs: "row N" (1-based) of a JSON list, or "line N" of JSON lines (blank lines skipped).

    Malformed JSON raises InputError naming the file and line, followed by ``hint`` (how to fix it).
    """
    if text.lstrip().startswith("["):
        try:
            return [(f"row {number}", row) for number, row in enumerate(json.loads(text), start=1)]
        except json.JSONDecodeError as error:
            raise InputError(f"{path} line {error.lineno}: malformed JSON ({error.msg}); {hint}") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as error:
            raise InputError(f"{path} line {number}: malformed JSON ({error.msg}); {hint}") from None
    return rows
