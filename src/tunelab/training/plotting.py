"""Loss curves as PNG files: `training_loss.png`, `training_eval_loss.png`, and one per other logged metric."""

import json
from pathlib import Path

from tunelab.training.callbacks import LOG_FILE


def smooth(values: list[float]) -> list[float]:
    """Exponential moving average spanning about a tenth of the curve, so short runs stay close to the raw values."""
    span = max(1.0, len(values) / 10)
    keep = 1 - 2 / (span + 1)
    smoothed: list[float] = []
    for value in values:
        smoothed.append(value if not smoothed else keep * smoothed[-1] + (1 - keep) * value)
    return smoothed


def plot_metrics(output_dir: str | Path, keys: tuple[str, ...] = ("loss", "eval_loss")) -> list[Path]:
    """Draw each key found in trainer_log.jsonl against the step; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    log_path = output_dir / LOG_FILE
    if not log_path.exists():
        return []
    records = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    written = []
    for key in keys:
        points = [(r["current_steps"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if not points:
            continue
        steps, values = zip(*points)
        plt.figure()
        plt.plot(steps, values, color="#1f77b4", alpha=0.4, label="original")
        plt.plot(steps, smooth(list(values)), color="#1f77b4", label="smoothed")
        plt.title(f"{key} of {output_dir.name}")
        plt.xlabel("step")
        plt.ylabel(key)
        plt.legend()
        path = output_dir / f"training_{key.replace('/', '_')}.png"
        plt.savefig(path, format="png", dpi=100)
        plt.close()
        written.append(path)
    return written
