"""FSDP2 on GPUs (issue 4): `--parallel fsdp` under torchrun with NCCL, against one process, at the same global
batch; and a stop + resume across the two. The CPU tests check the same with gloo in fp32; on GPUs training
runs flex_attention and bf16 autocast, so the losses agree to bf16 rounding, not to 1e-6.

One call on a 2-GPU machine (kind nvidia-h200-x2; nothing to stage, the target is harness.bigram_target, the
training tests' tiny bigram Llama, whose draft really learns):

    python -m benchmarks.fsdp_check --out $OUT          # 1 process, then torchrun 2 x FSDP, then a report

Runs (each a subprocess; this process never touches the GPU):
  single   1 process, `--steps` steps straight
  fsdp     torchrun --nproc-per-node 2, parallel="fsdp": stopped after half the steps (checkpoint: the full
           state gathered by name), then resumed from that checkpoint to the end
The report: per-step losses of both, their largest relative difference, the exported drafts' largest
difference, median step times, and whether FSDP logged its sharding and the resume.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from benchmarks.harness import bigram_target, parser_with_common_flags, random_prompts, run_and_report, run_header


def train_config(args, **overrides):
    from blockspec.train.trainer import TrainConfig

    base = dict(arch="dflash", num_layers=2, block_size=8, intermediate_size=256, batch_size=16, num_anchors=16,
                seq_len=128, steps=args.steps, lr=2e-3, log_every=1, progress=False, export_dtype="float32")
    base.update(overrides)
    return TrainConfig(**base)


def worker(args) -> None:
    """One process of a run: the bigram target on this process's GPU, the shared dataset, train."""
    from blockspec.target.loading import target_from_hf
    from blockspec import distributed
    from blockspec.train.data import SequenceDataset
    from blockspec.train.trainer import train

    info, device = distributed.init_from_env(args.device)
    _, _, hf = bigram_target(vocab=args.vocab, hidden=args.hidden, layers=3)
    target = target_from_hf(hf.to(device), name="tiny-bigram")
    data = SequenceDataset.load(args.data)
    out = Path(args.run_dir)
    logs: list[str] = []
    cfg = train_config(args, parallel="fsdp" if info.world > 1 else "auto")
    losses: list[float] = []
    if args.stop_after:  # stop there (checkpoint written), then resume from it below
        losses += train(target, data, replace(cfg, stop_after_steps=args.stop_after), out, log=logs.append).losses
        distributed.barrier()
    losses += train(target, data, cfg, out, resume=bool(args.stop_after), log=logs.append).losses
    if info.main:
        (out / "losses.json").write_text(json.dumps(losses))
        (out / "log.txt").write_text("\n".join(logs))
    distributed.shutdown()


def make_data(args, path: Path) -> None:
    """Greedy bigram chains from random prompts (the target's own answers), as the tests build them."""
    from blockspec.train.data import DataConfig, build_dataset

    target, _, _ = bigram_target(vocab=args.vocab, hidden=args.hidden, layers=3)
    data = build_dataset(target, random_prompts(args.vocab, args.sequences, seed=1),
                         DataConfig(max_new_tokens=96, max_seq_len=128, gen_batch_size=256), log=lambda m: None)
    data.save(path)


def launch(args, run_dir: Path, processes: int, stop_after: int) -> float:
    cmd = [sys.executable, "-m", "benchmarks.fsdp_check", "--worker", "--data", str(args.work / "data.safetensors"),
           "--run-dir", str(run_dir), "--steps", str(args.steps), "--stop-after", str(stop_after),
           "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--device", args.device]
    if processes > 1:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
               "--master-addr", "127.0.0.1", "--master-port", str(port), *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout, cwd=ROOT)
    (args.work / f"{run_dir.name}.stderr.txt").write_text(proc.stderr[-20000:])
    if proc.returncode != 0:
        raise SystemExit(f"{run_dir.name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start


def step_times(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["step_s"] for r in rows if "step_s" in r]


def run(args) -> dict:
    import torch

    from blockspec.draft import load_draft

    args.work.mkdir(parents=True, exist_ok=True)
    make_data(args, args.work / "data.safetensors")
    single_dir, fsdp_dir = args.work / "single", args.work / "fsdp"
    walls = {"single": launch(args, single_dir, 1, 0),
             "fsdp": launch(args, fsdp_dir, args.processes, args.steps // 2)}
    single = json.loads((single_dir / "losses.json").read_text())
    fsdp = json.loads((fsdp_dir / "losses.json").read_text())
    log = (fsdp_dir / "log.txt").read_text()
    rel = [abs(a - b) / abs(b) for a, b in zip(fsdp, single)]
    a, b = load_draft(fsdp_dir / "draft").state_dict(), load_draft(single_dir / "draft").state_dict()
    weight_diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in b)
    weight_scale = max(float(b[k].float().abs().max()) for k in b)
    times = {name: step_times(d) for name, d in (("single", single_dir), ("fsdp", fsdp_dir))}
    return {
        **run_header(args),
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "processes": args.processes, "steps": args.steps, "resumed_at": args.steps // 2,
        "losses": {"single": single, "fsdp": fsdp},
        "loss_first_last": {"single": [single[0], single[-1]], "fsdp": [fsdp[0], fsdp[-1]]},
        "max_rel_loss_diff": max(rel), "median_rel_loss_diff": statistics.median(rel),
        "max_weight_diff": weight_diff, "max_weight": weight_scale,
        "fsdp_logged": "FSDP" in log, "resume_logged": "resumed from" in log,
        "median_step_s": {k: statistics.median(v[3:]) if len(v) > 3 else None for k, v in times.items()},
        "wall_s": walls,
    }


def report(path: str) -> str:
    result = json.loads(Path(path).read_text())
    lines = [f"Device {result['device']}, {result['gpus']} GPU(s), torch {result['torch']}, commit "
             f"{result['commit']}, {result['date']}.", "",
             "| run | first loss | last loss | median step s | wall s |", "| --- | --- | --- | --- | --- |"]
    for name in ("single", "fsdp"):
        first, last = result["loss_first_last"][name]
        lines.append(f"| {name} | {first:.4f} | {last:.4f} | {result['median_step_s'][name]} | "
                     f"{result['wall_s'][name]:.1f} |")
    lines += ["", f"FSDP ({result['processes']} processes, stopped at step {result['resumed_at']} and resumed) "
                  f"against 1 process: loss relative difference max {result['max_rel_loss_diff']:.2e}, median "
                  f"{result['median_rel_loss_diff']:.2e}; exported draft max |diff| {result['max_weight_diff']:.2e} "
                  f"(largest weight {result['max_weight']:.2f}); FSDP logged: {result['fsdp_logged']}, resume "
                  f"logged: {result['resume_logged']}."]
    return "\n".join(lines)


def main() -> int:
    p = parser_with_common_flags(__doc__)
    p.add_argument("--work", type=Path, default=Path("/tmp/fsdp_check"))
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--sequences", type=int, default=512)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--timeout", type=int, default=240, help="seconds per run")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--stop-after", type=int, default=0, help=argparse.SUPPRESS)
    args, _ = p.parse_known_args()
    if args.worker:
        worker(args)
    else:
        run_and_report(p, run, report, "fsdp_check")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
