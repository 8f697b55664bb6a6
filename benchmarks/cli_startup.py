"""How fast the CLI answers when no training runs: `tunelab --help` and a refused config (target: well under 0.5 s).

    .venv/bin/python benchmarks/cli_startup.py

Runs each command 10 times in a fresh interpreter and prints the median and worst wall time. Run it on a quiet
machine: a second busy process on 2 cores distorts every timing.
"""

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(args: list[str], runs: int = 10) -> tuple[float, float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times), max(times)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "cfg.yaml"
        config.write_text("model_name_or_path: m\ndo_train: true\ndataset: identity\noutput_dir: out\n")
        cases = {
            "tunelab --help": ["--help"],
            "tunelab train cfg.yaml learning_rte=1e-4 (refused)": ["train", str(config), "learning_rte=1e-4"],
        }
        print(f"python {sys.version.split()[0]}, {sys.executable}")
        for name, args in cases.items():
            median, worst = timed(args)
            print(f"{name:55} median {median * 1000:6.0f} ms   worst {worst * 1000:6.0f} ms")


if __name__ == "__main__":
    main()
