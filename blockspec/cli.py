"""`blockspec` command line. User errors print one line and exit with code 2; never a traceback."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from blockspec.errors import BlockspecError
from blockspec.hub import DEFAULT_TARGET

if TYPE_CHECKING:
    from blockspec.kernels import KernelSettings

UNTRAINED_DRAFT = "untrained"


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=DEFAULT_TARGET,
                        help=f"HF model directory, .gguf file or model-hub id (default: {DEFAULT_TARGET})")
    parser.add_argument("--draft", default=None,
                        help="draft checkpoint directory, shipped draft name or hub id (default: the shipped "
                             f"draft for the default target; '{UNTRAINED_DRAFT}' = a seeded random draft)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16")


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    parser.add_argument("--block-size", type=int, default=None, help="default: the draft's trained block size")


def _add_exact_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--exact", action="store_true",
                        help="batch-invariant kernels on CUDA (bf16 or fp16): greedy speculative output identical "
                             "to plain decoding bit for bit, and a request's tokens independent of the batch; "
                             "slower by an amount not measured yet (no effect on the CPU)")


def kernel_settings(exact: bool, target: object) -> KernelSettings:
    """The kernel settings a command decodes under: with `exact` (--exact), batch-invariant kernels
    (KernelSettings.batch_invariant), refused where they cannot make the target's CUDA results exact."""
    from blockspec.kernels import KernelSettings

    if exact and target.device.type == "cuda":
        if target.model.config.hybrid:
            raise BlockspecError("--exact covers targets of attention layers only (Llama, Qwen2, Qwen3, Mistral): "
                                 "this target's Gated DeltaNet layers and zero-centred norms run torch ops whose "
                                 "rounding depends on the batch; drop --exact")
        if target.dtype.itemsize != 2:  # bf16, fp16
            raise BlockspecError(f"--exact covers bf16 and fp16 weights on CUDA, not {str(target.dtype)[6:]}: pass "
                                 f"--dtype bfloat16 or drop --exact")
    return KernelSettings(batch_invariant=exact)


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
    _add_model_args(gen)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="user message (or raw text with --no-chat-template)")
    source.add_argument("--messages", type=Path, help="JSON file: a list of {role, content} chat messages")
    gen.add_argument("--no-chat-template", action="store_true", help="feed --prompt as raw text")
    gen.add_argument("--enable-thinking", action="store_true", help="passed to chat templates that know it")
    _add_sampling_args(gen)
    gen.add_argument("--compare-ar", action="store_true",
                     help="also decode plainly (block size 1) and report speedup and token identity")
    gen.add_argument("--json", action="store_true", help="print one JSON record (text + stats) instead of text")
    _add_exact_arg(gen)
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


def load_pair(target_name: str, draft_name: str | None, device: str, dtype: str) -> tuple[object, object, bool]:
    """(target, draft, draft_is_trained): the draft defaults to the one shipped for the default target."""
    from blockspec.draft import load_draft, new_draft_for_target
    from blockspec.shipped import default_draft_for
    from blockspec.target import load_target, resolve_device

    device = resolve_device(device)
    target = load_target(target_name, device=device, dtype=dtype)
    if draft_name is None:
        draft_name = default_draft_for(target_name) or UNTRAINED_DRAFT
    if draft_name == UNTRAINED_DRAFT:
        draft = new_draft_for_target(target.model.config).to(device=device, dtype=target.dtype)
        return target, draft, False
    return target, load_draft(draft_name, device=device, dtype=target.dtype), True


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
        print(f"plain decoding ({kind}): {ar['stats']['tokens_per_s']:.1f} tok/s; speculative output is {verdict} "
              f"plain decoding", file=sys.stderr)
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
