"""`blockspec` command line. User errors print one line and exit with code 2; never a traceback."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

from blockspec.cli_args import (UNTRAINED_DRAFT, add_exact_arg, add_model_args, add_sampling_args, kernel_settings,
                                load_pair)
from blockspec.errors import BlockspecError


# Subcommands living in their own packages; each module has `register(subparsers)`, which adds its parser
# with `set_defaults(handler=...)` (a function taking the parsed args and returning an exit code).
COMMAND_MODULES = ("blockspec.train.cli", "blockspec.bench.cli", "blockspec.serve.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blockspec", description="Lossless block-diffusion speculative decoding")
    commands = parser.add_subparsers(dest="command", required=True)
    register_generate(commands)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue  # that command's package is not part of this install
            raise
        module.register(commands)
    return parser


def register_generate(commands: argparse._SubParsersAction) -> None:
    gen = commands.add_parser("generate", help="speculative generation of one prompt, streamed")
    add_model_args(gen)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="user message (or raw text with --no-chat-template)")
    source.add_argument("--messages", type=Path, help="JSON file: a list of {role, content} chat messages")
    gen.add_argument("--no-chat-template", action="store_true", help="feed --prompt as raw text")
    gen.add_argument("--enable-thinking", action="store_true", help="passed to chat templates that know it")
    add_sampling_args(gen)
    gen.add_argument("--compare-ar", action="store_true",
                     help="also decode plainly (block size 1) and report speedup and token identity")
    gen.add_argument("--json", action="store_true", help="print one JSON record (text + stats) instead of text")
    add_exact_arg(gen)
    gen.set_defaults(handler=_generate)


def _read_messages(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BlockspecError(f"messages file {str(path)!r} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BlockspecError(f"cannot read messages file {str(path)!r} ({type(exc).__name__}): pass a UTF-8 "
                             f"JSON file") from None
    except json.JSONDecodeError as exc:
        raise BlockspecError(f"messages file {str(path)!r} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if isinstance(data, dict):
        data = data.get("messages")
    if not isinstance(data, list) or not data or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in data):
        raise BlockspecError(f"messages file {str(path)!r} must hold a non-empty list of "
                             f'{{"role": str, "content": str}} objects')
    return data


def _generate(args: argparse.Namespace) -> int:
    from blockspec.engine import SamplingParams, SpeculativeDecoder
    from blockspec.kernels import use_settings

    messages = _read_messages(args.messages) if args.messages else None
    target, draft, trained = load_pair(args.target, args.draft, args.device, args.dtype)
    settings = kernel_settings(args.exact, target)
    if not trained:
        print("note: no trained draft for this target; using an UNTRAINED random draft, so expect ~1 token per "
              "step and no speedup. The output is checked against plain greedy decoding (losslessness).",
              file=sys.stderr)
    decoder = SpeculativeDecoder(target, draft, block_size=args.block_size)
    prompt = messages if messages is not None else args.prompt
    prompt_ids = target.encode(prompt, chat=not args.no_chat_template, enable_thinking=args.enable_thinking or None)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop_strings=tuple(args.stop))
    compare = args.compare_ar or (not trained and params.greedy)
    result = None
    with use_settings(settings):  # every launch, and the CUDA graphs that hold them
        for chunk in decoder.stream(prompt_ids, params):
            if not args.json:
                print(chunk.text, end="", flush=True)
            result = chunk.result
        plain = decoder.generate(prompt_ids, params, block_size=1) if compare else None
    record: dict = {"target": args.target, "draft": args.draft or ("shipped" if trained else UNTRAINED_DRAFT),
                    "draft_trained": trained, "prompt_tokens": len(prompt_ids), "text": result.text,
                    "token_ids": result.token_ids, "finish_reason": result.finish_reason,
                    "stats": result.stats.to_dict(), "exact": args.exact}
    if compare:
        record["ar"] = {"token_ids_equal": plain.token_ids == result.token_ids, "stats": plain.stats.to_dict(),
                        "speedup_tpot": plain.stats.tpot_s / result.stats.tpot_s if result.stats.tpot_s else None}
    if args.json:
        print(json.dumps(record))
        return 0
    s = result.stats
    print(f"\n\n[{s.generated_tokens} tokens, finish={result.finish_reason}] tau={s.mean_acceptance_length:.2f} "
          f"over {s.steps} steps (block {s.block_size}), TTFT {s.ttft_s * 1e3:.0f} ms, TPOT {s.tpot_s * 1e3:.1f} ms, "
          f"{s.tokens_per_s:.1f} tok/s", file=sys.stderr)
    print(f"acceptance histogram (lengths 1..{s.block_size}): {s.acceptance_histogram}", file=sys.stderr)
    if compare:
        ar = record["ar"]
        verdict = "IDENTICAL to" if ar["token_ids_equal"] else "DIFFERENT from"
        kind = "greedy" if params.greedy else "seeded sampling (equal only in distribution)"
        # the speedup that --help promises (mean TPOT plain / speculative, as `bench` defines it)
        speedup = "-" if ar["speedup_tpot"] is None else f"{ar['speedup_tpot']:.2f}x"
        print(f"plain decoding ({kind}): {ar['stats']['tokens_per_s']:.1f} tok/s, speedup {speedup} (TPOT); "
              f"speculative output is {verdict} plain decoding", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        return args.handler(args)
    except BlockspecError as exc:
        print(f"blockspec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nblockspec: interrupted after {time.perf_counter() - started:.1f} s", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
