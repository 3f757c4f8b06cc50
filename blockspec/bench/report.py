"""Benchmark outputs: results.json (configuration, environment, summary, per-prompt records), summary.md and
PNG plots (acceptance histogram per dataset, per-position acceptance, speedup per dataset)."""

from __future__ import annotations

import gzip
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from blockspec.errors import BlockspecError
from blockspec.files import atomic_write

if TYPE_CHECKING:
    import torch

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
SUMMARY_FILE = "summary.md"
PLOT_FILES = ("acceptance_histogram.png", "per_position_acceptance.png", "speedup.png")
REPO_ROOT = Path(__file__).resolve().parents[2]


# ---- environment ----------------------------------------------------------------------------------------------
def git_commit(root: Path = REPO_ROOT) -> str | None:
    """The checked-out commit, read from .git without running git; $BLOCKSPEC_GIT_COMMIT overrides it
    (for copies of the tree without .git)."""
    if os.environ.get("BLOCKSPEC_GIT_COMMIT"):
        return os.environ["BLOCKSPEC_GIT_COMMIT"]
    git = root / ".git"
    try:
        if git.is_file():  # a worktree or submodule: "gitdir: PATH"
            git = (root / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head or None
        ref = head[5:]
        common = git
        if (git / "commondir").is_file():
            common = (git / (git / "commondir").read_text().strip()).resolve()
        for base in (git, common):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref:
                    return parts[0]
    except (OSError, IndexError):
        return None
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def device_description(device: str | torch.device) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def environment(device: str | torch.device, devices: list[str] | None = None) -> dict:
    import torch

    from blockspec import __version__

    return {
        "device": device_description(device),
        "devices": devices or [device_description(device)],
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {"blockspec": __version__, "torch": torch.__version__, "cuda": torch.version.cuda,
                     **{p: _version(p) for p in ("transformers", "huggingface_hub", "safetensors", "tqdm",
                                                  "matplotlib")}},
        "git_commit": git_commit(),
    }


# ---- files ----------------------------------------------------------------------------------------------------
def _fmt(value, spec: str = ".2f", scale: float = 1.0, suffix: str = "") -> str:
    return "-" if value is None else f"{value * scale:{spec}}{suffix}"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def read_results(path: Path) -> dict:
    """A results.json, or the results.json.gz it is stored as in benchmarks/results/."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            results = json.load(f)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BlockspecError(f"cannot read bench results {str(path)!r} ({type(exc).__name__}): pass the "
                             f"results.json (or .json.gz) a `blockspec bench` run wrote") from None
    if not (isinstance(results, dict) and {"config", "environment", "summary"} <= set(results)):
        raise BlockspecError(f"{str(path)!r} is not a `blockspec bench` results.json (no config / environment / "
                             f"summary)")
    return results


def summary_markdown(results: dict) -> str:
    cfg, env, summary = results["config"], results["environment"], results["summary"]
    rows = list(summary["datasets"].items()) + [("overall", summary["overall"])]
    lines = [
        "# blockspec bench",
        "",
        f"- target: `{cfg['target']}`; draft: `{cfg['draft']}`" + ("" if cfg["draft_trained"] else " (UNTRAINED)"),
        f"- device: {env['device']} x{cfg['world_size']}; dtype {cfg['dtype']}; decoder {cfg['decoder']}",
        f"- temperature {cfg['sampling']['temperature']}; max_new_tokens {cfg['sampling']['max_new_tokens']}; "
        f"block size {cfg['block_size']}; thinking {'on' if cfg['sampling']['enable_thinking'] else 'off'}; "
        f"max samples {cfg['max_samples'] if cfg['max_samples'] is not None else 'all'}",
        f"- commit {env['git_commit'] or 'unknown'}; torch {env['versions']['torch']}; "
        f"blockspec {env['versions']['blockspec']}; {results['finished_at']}",
        f"- command: `{cfg['command']}`",
        "",
        "| dataset | samples | responses | tau | speedup | AR tok/s | spec tok/s | AR TPOT ms | spec TPOT ms "
        "| AR TTFT ms | spec TTFT ms | AR acc | spec acc | identical |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in rows:
        acc = s.get("accuracy") or {}
        lines.append(
            f"| {name} | {s['samples']} | {s['responses']} | {_fmt(s['spec']['tau'])} | "
            f"{_fmt(s['speedup'], suffix='x')} | {_fmt(s['ar']['tokens_per_s'], '.1f')} | "
            f"{_fmt(s['spec']['tokens_per_s'], '.1f')} | {_fmt(s['ar']['mean_tpot_s'], '.2f', 1e3)} | "
            f"{_fmt(s['spec']['mean_tpot_s'], '.2f', 1e3)} | {_fmt(s['ar']['mean_ttft_s'], '.1f', 1e3)} | "
            f"{_fmt(s['spec']['mean_ttft_s'], '.1f', 1e3)} | {_pct(acc.get('ar'))} | {_pct(acc.get('spec'))} | "
            f"{s['outputs_equal']}/{s['responses']} |")
    block = cfg["block_size"]
    lines += ["", f"Acceptance length histogram (fraction of steps with length 1..{block}) and per-position "
                  f"acceptance rate P(draft token k accepted), k = 1..{block - 1}:", "",
              "| dataset | steps | histogram | per-position |", "| --- | --- | --- | --- |"]
    for name, s in rows:
        hist = " ".join(f"{x:.2f}" for x in s["spec"]["acceptance_histogram_fraction"])
        pos = " ".join(f"{x:.2f}" for x in s["spec"]["per_position_acceptance"])
        lines.append(f"| {name} | {s['spec']['steps']} | {hist} | {pos} |")
    lines += ["", "tau = mean over responses of the mean acceptance length (bonus token included); speedup = mean "
                  "TPOT(AR) / mean TPOT(spec); accuracy = final answer (last \\boxed{}, else last number) equal to "
                  "the reference after normalisation (not a symbolic check); identical = responses whose "
                  "speculative tokens equal the AR tokens (expected for all under greedy decoding).", ""]
    return "\n".join(lines)


def write_plots(results: dict, out: Path) -> list[str]:
    """The PNG plots; [] (with a note on stderr) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("blockspec bench: matplotlib is not installed (pip install 'blockspec[plot]'); plots skipped",
              file=sys.stderr)
        return []
    summary, block = results["summary"], results["config"]["block_size"]
    names = list(summary["datasets"])
    title = f"{Path(str(results['config']['draft'])).name or results['config']['draft']}, block {block}"
    written = []

    fig, ax = plt.subplots(figsize=(max(6, block * 0.6), 4))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        frac = summary["datasets"][name]["spec"]["acceptance_histogram_fraction"]
        ax.bar([k + 1 - 0.4 + width * (i + 0.5) for k in range(block)], frac, width, label=name)
    ax.set_xticks(range(1, block + 1))
    ax.set_xlabel("acceptance length (tokens committed per step)")
    ax.set_ylabel("fraction of steps")
    ax.set_title(f"Acceptance length histogram ({title})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / PLOT_FILES[0], dpi=120)
    plt.close(fig)
    written.append(PLOT_FILES[0])

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names + ["overall"]:
        s = summary["overall"] if name == "overall" else summary["datasets"][name]
        rates = s["spec"]["per_position_acceptance"]
        ax.plot(range(1, block), rates, marker="o", label=name, linestyle="--" if name == "overall" else "-")
    ax.set_xlabel("draft position k")
    ax.set_ylabel("P(draft token k accepted)")
    ax.set_ylim(0, 1)
    ax.set_title(f"Per-position acceptance ({title})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / PLOT_FILES[1], dpi=120)
    plt.close(fig)
    written.append(PLOT_FILES[1])

    fig, ax = plt.subplots(figsize=(max(5, 1.2 * (len(names) + 1)), 4))
    labels = names + ["overall"]
    stats = [summary["datasets"][n] for n in names] + [summary["overall"]]
    speedups = [s["speedup"] or 0.0 for s in stats]
    bars = ax.bar(labels, speedups, color=["C0"] * len(names) + ["C3"])
    for bar, s in zip(bars, stats):
        tau = s["spec"]["tau"]
        ax.annotate(f"{bar.get_height():.2f}x\ntau {tau:.2f}" if tau is not None else f"{bar.get_height():.2f}x",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_ylabel("speedup (mean TPOT AR / spec)")
    ax.set_title(f"Speedup per dataset ({title})")
    ax.set_ylim(0, max(speedups + [1.0]) * 1.25)
    fig.tight_layout()
    fig.savefig(out / PLOT_FILES[2], dpi=120)
    plt.close(fig)
    written.append(PLOT_FILES[2])
    return written


def write_outputs(results: dict, out: Path) -> list[Path]:
    """results.json, summary.md and the plots under `out` (created); returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(results, out)
    results["files"] = [RESULTS_FILE, SUMMARY_FILE, *plots]
    text = json.dumps(results, indent=1, ensure_ascii=False) + "\n"
    atomic_write(out / RESULTS_FILE, lambda tmp: tmp.write_text(text))
    (out / SUMMARY_FILE).write_text(summary_markdown(results))
    return [out / name for name in results["files"]]
