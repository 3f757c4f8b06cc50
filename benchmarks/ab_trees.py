"""One benchmark in older commits beside the checkout, in a single device call, so that each ratio is measured side
by side on one warm machine.

`stage` (here, where git is) writes each commit's package, with HEAD's benchmarks (so that every tree takes today's
flags and reports alike), into .ab/COMMIT; git ignores .ab, so the device call must carry it. `run` (on the
device machine, whose copy has no .git) runs one benchmark module in each staged tree, in staging order, and then in
the checkout, each under its own timeout, its results in OUT/COMMIT and OUT/checkout and its commit recorded as the
tree's. The shipped drafts are left out of the staged trees (random-weight workloads need none). The first tree also
compiles every Triton kernel on a fresh machine (engine_limit --qwen35 ran past 120 and 150 s there and wrote
nothing, where the later trees took 50-70): give `--seconds` room for that.

    python -m benchmarks.ab_trees stage 6934400 78c14ce
    python -m benchmarks.ab_trees run --seconds 110 --out $OUT -- batch_throughput --workload qwen3_4b \\
        --concurrency 32 --blocks 8 --skip-check          # in the device call, with carry [".ab"]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER, CHECKOUT = "order", "checkout"  # files in the staging folder: the trees in staging order; the checkout's commit


def git(*args: str) -> bytes:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True).stdout


def stage(commits: list[str], folder: Path) -> list[str]:
    """Write each commit's blockspec (without its drafts) and HEAD's benchmarks into folder/COMMIT; returns the short
    commits in order."""
    names = [git("rev-parse", "--short", commit).decode().strip() for commit in commits]
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        tree = folder / name
        shutil.rmtree(tree, ignore_errors=True)  # nothing left from an earlier staging
        tree.mkdir()
        parts = ((name, "blockspec", "blockspec/drafts"), ("HEAD", "benchmarks", "benchmarks/results"))
        for commit, path, excluded in parts:
            archive = git("archive", commit, path, f":(exclude){excluded}")
            subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    head = git("rev-parse", "--short", "HEAD").decode().strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "blockspec"], cwd=ROOT).returncode != 0
    (folder / CHECKOUT).write_text(head + ("-dirty" if dirty else "") + "\n")
    (folder / ORDER).write_text("".join(f"{name}\n" for name in names))
    return names


def run(folder: Path, module: str, args: list[str], out: Path, seconds: float) -> dict[str, int | None]:
    """`python -m benchmarks.MODULE ARGS --out OUT/NAME` in each staged tree and then the checkout; returns each
    tree's exit status (None: stopped at its timeout)."""
    trees = [(name, folder / name) for name in (folder / ORDER).read_text().split()]
    trees.append((CHECKOUT, ROOT))
    # the call's own label where it sets one: the working tree carried may be newer than the staging
    checkout_commit = os.environ.get("BLOCKSPEC_GIT_COMMIT") or (folder / CHECKOUT).read_text().strip()
    status: dict[str, int | None] = {}
    for name, tree in trees:
        commit = checkout_commit if name == CHECKOUT else name
        env = dict(os.environ, BLOCKSPEC_GIT_COMMIT=commit,
                   PYTHONPATH=os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH")) if p))
        print(f"== {module} at {commit}", flush=True)
        command = [sys.executable, "-m", f"benchmarks.{module}", *args, "--out", str(out / name)]
        try:
            status[name] = subprocess.run(command, cwd=tree, env=env, timeout=seconds).returncode
        except subprocess.TimeoutExpired:
            status[name] = None
            print(f"== {module} at {commit}: stopped after {seconds:.0f} s", flush=True)
    return status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=ROOT / ".ab")
    sub = parser.add_subparsers(dest="action", required=True)
    staging = sub.add_parser("stage", help="write the commits' trees (on a machine with git)")
    staging.add_argument("commits", nargs="+")
    running = sub.add_parser("run", help="run a benchmark in each staged tree, then the checkout")
    running.add_argument("--out", type=Path, required=True)
    running.add_argument("--seconds", type=float, default=600.0, help="each tree's timeout")
    running.add_argument("module", help="a benchmarks module, e.g. batch_throughput")
    running.add_argument("args", nargs=argparse.REMAINDER, help="its arguments (after --)")
    args = parser.parse_args()
    if args.action == "stage":
        print("staged", " ".join(stage(args.commits, args.folder)), "in", args.folder)
        return
    module_args = args.args[1:] if args.args[:1] == ["--"] else args.args
    status = run(args.folder, args.module, module_args, args.out, args.seconds)
    sys.exit(0 if all(code == 0 for code in status.values()) else 1)


if __name__ == "__main__":
    main()
