"""`blockspec bench`: autoregressive vs speculative decoding over the standard datasets (SPEC section 7).

    blockspec bench --dataset gsm8k,humaneval,mt-bench --max-samples 20 --max-new-tokens 256 --device cuda
    torchrun --nproc_per_node 2 -m blockspec.cli bench --device cuda ...   # prompts sharded over 2 GPUs

Writes OUTPUT/results.json, OUTPUT/summary.md and PNG plots (rank 0 only), and prints the summary table.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from blockspec.cli_args import (UNTRAINED_DRAFT, add_exact_arg, add_model_args, check_folder_arg, kernel_settings,
                                load_pair)
from blockspec.datasets import DATASET_NAMES, HUB
from blockspec.errors import BlockspecError, brief

DEFAULT_DATASETS = "gsm8k,math500,humaneval,mbpp,mt-bench"


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("bench", help="benchmark autoregressive vs speculative decoding on standard datasets",
                            description="Decode every prompt plainly (block size 1) and speculatively (block size "
                                        "B) in the same process and report tau, acceptance, TTFT/TPOT, speedup and "
                                        "answer accuracy. Under torchrun, prompts are sharded across ranks.")
    add_model_args(p, device="auto")
    p.add_argument("--dataset", default=DEFAULT_DATASETS,
                   help=f"comma-separated datasets (default: {DEFAULT_DATASETS}); valid: {', '.join(DATASET_NAMES)}")
    p.add_argument("--max-samples", type=int, default=None, help="first N prompts of each dataset (default: all)")
    p.add_argument("--shuffle-seed", type=int, default=None,
                   help="with --max-samples: a seeded random subset instead of the first N")
    p.add_argument("--max-new-tokens", type=int, default=2048, help="per response (default: 2048, as SPEC 7)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=0, help="base seed (sampling seeds are derived per prompt and turn)")
    p.add_argument("--block-size", type=int, default=None, help="default: the draft's trained block size")
    p.add_argument("--enable-thinking", action="store_true", help="chat templates that know it think (default: off)")
    p.add_argument("--data-dir", default=None,
                   help="folder holding the datasets (gsm8k/test.jsonl, ...; default: $BLOCKSPEC_DATA_DIR or "
                        "../shared/data next to the repository when it holds them, else the model hub); "
                        f"'{HUB}' = always the model hub")
    p.add_argument("--output", type=Path, default=None, help="output folder (default: bench-results/TIMESTAMP)")
    p.add_argument("--warmup-tokens", type=int, default=64, help="tokens per mode in the untimed warm-up")
    p.add_argument("--no-prompt-warmup", action="store_true",
                   help="skip the untimed prefill of each prompt before its timed decodes (then one-time kernel "
                        "compilation for a new prompt length lands in the TTFT of the first run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--report", type=Path, default=None, metavar="RESULTS",
                   help="only print the summary of a results.json (or .json.gz) written by an earlier run")
    add_exact_arg(p)
    p.set_defaults(handler=_bench)


def _command(args: argparse.Namespace, world_size: int = 1) -> str:
    """The command line that reproduces this run (defaults left out)."""
    launcher = ["torchrun", "--nproc_per_node", str(world_size), "-m", "blockspec.cli"] if world_size > 1 else \
        ["blockspec"]
    parts = [*launcher, "bench", "--target", args.target]
    if args.draft is not None:
        parts += ["--draft", args.draft]
    parts += ["--dataset", args.dataset]
    for flag, value, default in (("--max-samples", args.max_samples, None), ("--shuffle-seed", args.shuffle_seed, None),
                                 ("--max-new-tokens", args.max_new_tokens, None),
                                 ("--temperature", args.temperature, None), ("--top-p", args.top_p, 1.0),
                                 ("--top-k", args.top_k, 0), ("--seed", args.seed, 0),
                                 ("--block-size", args.block_size, None), ("--data-dir", args.data_dir, None),
                                 ("--output", args.output, None), ("--device", args.device, None),
                                 ("--dtype", args.dtype, "auto"), ("--warmup-tokens", args.warmup_tokens, 64)):
        if value is not None and value != default:
            parts += [flag, str(value)]
    if args.enable_thinking:
        parts.append("--enable-thinking")
    if args.no_prompt_warmup:
        parts.append("--no-prompt-warmup")
    if args.exact:
        parts.append("--exact")
    return shlex.join(parts)


def _check_args(args: argparse.Namespace) -> None:
    for flag, value, low in (("--max-samples", args.max_samples, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--block-size", args.block_size, 1), ("--warmup-tokens", args.warmup_tokens, 1)):
        if value is not None and value < low:
            raise BlockspecError(f"{flag} must be at least {low}, got {value}")
    if args.shuffle_seed is not None and args.max_samples is None:  # every prompt runs, in order: it would do nothing
        raise BlockspecError("--shuffle-seed picks which --max-samples prompts run: pass --max-samples N too, or "
                             "drop it")
    if args.output is not None:  # checked now: the results are written only after the whole run
        from blockspec.bench.report import RESULTS_FILE

        check_folder_arg("--output", args.output)
        if (args.output / RESULTS_FILE).exists():
            raise BlockspecError(f"--output {str(args.output)!r} already holds the {RESULTS_FILE} of an earlier run: "
                                 f"pass a new --output (or move that one away)")


def _bench(args: argparse.Namespace) -> int:
    if args.report is not None:
        from blockspec.bench.report import RESULTS_FILE, read_results, summary_markdown

        report = args.report
        if report.is_dir():  # a run's output folder: the results.json it wrote
            report = report / RESULTS_FILE
        try:
            markdown = summary_markdown(read_results(report))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:  # an edited or cut-down file
            raise BlockspecError(f"{str(report)!r} is not a complete `blockspec bench` results.json "
                                 f"({type(exc).__name__}: {brief(exc.args[0] if exc.args else '')}): pass the "
                                 f"file a run wrote") from None
        print(markdown, end="")
        return 0
    from blockspec.datasets import resolve_names

    datasets = resolve_names(args.dataset)  # a wrong name fails before anything is loaded
    _check_args(args)
    from blockspec import distributed
    from blockspec.target import resolve_device

    info, device = distributed.init_from_env(resolve_device(args.device))
    try:
        code = _run(args, datasets, device, info)
    except BaseException:
        distributed.shutdown()
        raise
    distributed.barrier()
    distributed.shutdown()
    return code


def _run(args: argparse.Namespace, datasets: list[str], device: str, info) -> int:
    import torch
    from tqdm import tqdm

    from blockspec import distributed
    from blockspec.bench import report, runner
    from blockspec.bench.metrics import summarize
    from blockspec.datasets import load_samples
    from blockspec.kernels import use_settings
    from blockspec.shipped import default_draft_for

    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    settings = runner.BenchSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                    top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                    enable_thinking=args.enable_thinking, warmup_tokens=args.warmup_tokens,
                                    prompt_warmup=not args.no_prompt_warmup)
    settings.params(seed=0)  # validates the sampling settings before any data is read or downloaded
    samples, data_info = load_samples(datasets, args.data_dir, args.max_samples, args.shuffle_seed)
    torch.manual_seed(args.seed)
    target, draft, trained = load_pair(args.target, args.draft, device, args.dtype)
    kernels = kernel_settings(args.exact, target)
    if not trained and info.main:
        print("blockspec bench: note: no trained draft for this target; using an UNTRAINED random draft (expect "
              "tau ~1 and no speedup)", file=sys.stderr)
    decoder, block = runner.build_decoder(target, draft, args.block_size, settings, samples)
    graded = {name for name in datasets if data_info[name]["graded"]}

    mine = info.shard(samples)
    with use_settings(kernels):  # every launch, and the CUDA graphs that hold them
        warm = runner.warm_up(decoder, target, mine[0], settings, block) if mine else None
    bar = tqdm(total=len(mine), unit="prompt", file=sys.stderr, dynamic_ncols=True,
               desc="bench" if info.world == 1 else f"bench rank 0/{info.world}",
               disable=args.no_progress or not info.main)
    taus: list[float] = []

    def done(record: dict) -> None:
        taus.extend(t["spec"]["tau"] for t in record["turns"] if t["spec"]["steps"])
        bar.set_postfix_str(f"{record['dataset']} tau={sum(taus) / max(1, len(taus)):.2f}", refresh=False)
        bar.update(1)

    try:
        with use_settings(kernels):
            records = runner.run_samples(decoder, target, mine, settings, block, graded, on_done=done)
    finally:
        bar.close()
    gathered = distributed.gather({"records": records, "device": report.device_description(device),
                                   "warmup": warm})
    if not info.main:
        return 0

    records = runner.sort_records([r for part in gathered for r in part["records"]], datasets)
    draft_name = args.draft or default_draft_for(args.target) or UNTRAINED_DRAFT
    results = {
        "schema_version": report.SCHEMA_VERSION,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - t0,
        "config": {
            "command": _command(args, info.world),
            "target": args.target,
            "draft": draft_name,
            "draft_trained": trained,
            "draft_architecture": draft.config.architecture,
            "draft_block_size": draft.block_size,
            "block_size": block,
            "datasets": datasets,
            "data": data_info,
            "max_samples": args.max_samples,
            "shuffle_seed": args.shuffle_seed,
            "sampling": settings.to_dict(),
            "device": str(target.device),
            "dtype": str(target.dtype).replace("torch.", ""),
            "exact": args.exact,
            "decoder": type(decoder).__name__,
            "world_size": info.world,
            "backend": info.backend,
            "warmup": [part["warmup"] for part in gathered],
            "timing": "each prompt decoded with block size 1 (AR) then block size B (spec) in this process; one "
                      "warm-up decode per mode per rank before timing, excluded"
                      + ("; each timed decode preceded by an untimed prefill of its prompt in the same mode"
                         if settings.prompt_warmup else ""),
        },
        "environment": report.environment(device, [part["device"] for part in gathered]),
        "summary": summarize(records, block, datasets),
        "records": records,
    }
    out = args.output or Path("bench-results") / started.strftime("%Y%m%d-%H%M%S")
    files = report.write_outputs(results, out)
    markdown = report.summary_markdown(results)
    print(markdown.split("\n\nAcceptance")[0].split("\n\n", 1)[-1])
    print(f"\nwrote {', '.join(str(f) for f in files)}", file=sys.stderr)
    return 0
