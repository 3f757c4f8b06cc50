"""Training metrics: one JSON record per line, and a PNG of loss / accuracy / tau curves (matplotlib, Agg)."""

from __future__ import annotations

import json
from pathlib import Path

from blockspec.files import atomic_write


class MetricsLog:
    """Appends JSON records to `path`. On resume, records at or after the resumed step are dropped first,
    so the file reads exactly as an uninterrupted run's would."""

    def __init__(self, path: str | Path, resume_step: int | None = None, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path: str | Path, png_path: str | Path, title: str = "") -> bool:
    """Loss, accuracy and acceptance length (training estimate and measured tau) against steps.
    Returns False (and writes nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = read_metrics(metrics_path)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_tau" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train], lw=1)
    axes[0].set_title("loss (gamma-weighted CE)")
    axes[0].set_yscale("log")
    axes[1].plot(steps, [r["acc"] for r in train], lw=1, label="mean top-1 (slots 1..B-1)")
    if train and "acc_k" in train[0]:
        axes[1].plot(steps, [r["acc_k"][0] for r in train], lw=1, label="slot 1")
        axes[1].plot(steps, [r["acc_k"][-1] for r in train], lw=1, label=f"slot {len(train[0]['acc_k'])}")
    axes[1].set_title("draft accuracy")
    axes[1].legend()
    axes[2].plot(steps, [r["accept_len"] for r in train], lw=1, label="training estimate")
    if evals:
        axes[2].plot([r["step"] for r in evals], [r["eval_tau"] for r in evals], "o-", label="tau (speculative loop)")
    axes[2].set_title("acceptance length")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    # the format is named: the temporary file's name does not end in .png
    atomic_write(Path(png_path), lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
    return True
