"""How fast `bd3` answers when it has nothing to compute: help, a completion, usage errors.

    python benchmarks/startup.py              # 9 rounds
    python benchmarks/startup.py --rounds 21

Each command runs as a fresh process (``python -m bd3 ...``, what the ``bd3`` script runs),
in rounds that take every command once in turn, so a change in the machine's load hits all
of them alike. The table gives the median and the range of the wall times, beside the
floors: ``python -c pass``, ``python -c "import typer"`` and ``python -c "import torch"``.
The load average before and after is printed: on a shared machine, the other jobs count.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
COMPLETE = {"_BD3_COMPLETE": "complete_bash", "COMP_WORDS": "bd3 pretrain --bl", "COMP_CWORD": "2"}

COMMANDS = [
    ("python -c pass", [PY, "-c", "pass"], {}),
    ('python -c "import typer"', [PY, "-c", "import typer"], {}),
    ('python -c "import torch"', [PY, "-c", "import torch"], {}),
    ("bd3 --help", [PY, "-m", "bd3", "--help"], {}),
    ("bd3 pretrain --help", [PY, "-m", "bd3", "pretrain", "--help"], {}),
    ("completion: bd3 pretrain --bl<Tab>", [PY, "-m", "bd3"], COMPLETE),
    ("usage error: bd3 sampel", [PY, "-m", "bd3", "sampel"], {}),
    ("usage error: bd3 pretrain --lr inf", [PY, "-m", "bd3", "pretrain", "--lr", "inf"], {}),
    ("usage error: bd3 eval --threads 0", [PY, "-m", "bd3", "eval", "--threads", "0"], {}),
]


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    times: dict[str, list[float]] = {name: [] for name, _, _ in COMMANDS}
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average before: {loadavg()}")
    for _ in range(args.rounds):
        for name, argv, extra in COMMANDS:
            start = time.perf_counter()
            subprocess.run(argv, env={**env, **extra}, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - start)
    typer_floor = statistics.median(times['python -c "import typer"'])
    print(f"load average after: {loadavg()}")
    print("| command | median wall time (s) | min-max (s) | / import typer |")
    print("|---|---|---|---|")
    for name, _, _ in COMMANDS:
        t = sorted(times[name])
        print(f"| `{name}` | {statistics.median(t):.3f} | {t[0]:.3f}-{t[-1]:.3f} | {statistics.median(t) / typer_floor:.1f}x |")


if __name__ == "__main__":
    main()
