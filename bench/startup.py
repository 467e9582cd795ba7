"""`jmoshi --help` and `jmoshi doctor` wall time against the upstream commands, in one run.

    .venv/bin/python bench/startup.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import sys

from _common import BIN, timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    repeat = parser.parse_args().repeat
    rows = [
        ("jmoshi --help", [str(BIN / "jmoshi"), "--help"]),
        ("huggingface-cli --help", [str(BIN / "huggingface-cli"), "--help"]),
        ("python -m moshi.server --help", [sys.executable, "-m", "moshi.server", "--help"]),
        ("jmoshi doctor", [str(BIN / "jmoshi"), "doctor"]),
        ("jmoshi doctor --json", [str(BIN / "jmoshi"), "doctor", "--json"]),
    ]
    base = None
    print(f"median of {repeat} runs")
    for label, argv in rows:
        seconds, code = timed(argv, repeat=repeat)
        base = base or seconds
        print(f"{label:<34} {seconds * 1000:8.0f} ms  (exit {code})  x{seconds / base:.2f} of jmoshi --help")


if __name__ == "__main__":
    main()
