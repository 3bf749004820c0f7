#!/usr/bin/env python3
"""Wall time of the whole demo study (12 pairs: generate inputs, finetune, evaluate x2, compare).

    .venv/bin/python benchmarks/demo_wall_time.py            # fresh results root in a temp folder
    .venv/bin/python benchmarks/demo_wall_time.py --keep     # print where it wrote

Target (issue 2): <= 3 minutes on a 2-core machine without a GPU. Prints one line per phase; record
the result in benchmarks/RESULTS.md with the machine and commit.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="keep the results root")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="prunetune-demo-bench-"))
    started = time.monotonic()
    run = subprocess.run([sys.executable, "launch.py", "demo", f"study.results_root={root}"], cwd=REPO,
                         capture_output=True, text=True)
    first = time.monotonic() - started
    started = time.monotonic()
    rerun = subprocess.run([sys.executable, "launch.py", "demo", f"study.results_root={root}"], cwd=REPO,
                           capture_output=True, text=True)
    second = time.monotonic() - started
    output = run.stdout + run.stderr
    inputs = re.search(r"demo inputs ready in ([\d.]+)s", output)
    tasks = re.findall(r"\] COMPLETED .*\(([\d.]+)s\)", output)
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}")
    print(f"demo exit code: {run.returncode}; wall time {first:.1f} s "
          f"(inputs {inputs.group(1) if inputs else '?'} s; {len(tasks)} tasks completed)")
    print(f"re-run (everything complete, skipped): exit code {rerun.returncode}; wall time {second:.1f} s")
    print(f"target <= 180 s: {'met' if first <= 180 and run.returncode == 0 else 'NOT met'}")
    if run.returncode:
        print(output[-3000:])
    if args.keep:
        print(f"results: {root}")
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
