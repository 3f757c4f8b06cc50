"""`blockspec serve`: load a target and draft (the README's default pair unless named) and serve them."""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys

from blockspec.cli_args import UNTRAINED_DRAFT, add_exact_arg, add_model_args, kernel_settings, load_pair
from blockspec.errors import BlockspecError
from blockspec.serve import DEFAULT_MAX_REQUEST_BYTES

# A verify of R rows reads the weights once and does 2 x parameters FLOPs per row, so it stays bound by that read
# up to about (dense bf16 FLOP/s) / (bytes/s) rows: ~300 on an H100 (990 TFLOP/s over 3.35 TB/s), fewer at the
# matmul rates really reached. Below that a bigger block is nearly free, above it every drafted token costs
# compute, so rows x block is capped there. A roofline estimate, to be measured. On a CPU the verify is bound by
# compute from about one block of rows on (a few cores' FLOP/s over their memory bandwidth is tens of rows), so
# the batch size does not move the best block: the budget stays off and --block-size is the knob.
CUDA_MAX_STEP_TOKENS = 256


def register(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, streaming, "
                                              "/metrics)")
    add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="default: 8000")
    serve.add_argument("--api-key", default=os.environ.get("BLOCKSPEC_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1 endpoints (default: $BLOCKSPEC_API_KEY)")
    serve.add_argument("--served-model-name", default=None, help="the model id clients send (default: --target)")
    serve.add_argument("--max-model-len", type=int, default=None,
                       help="limit on prompt + max_tokens (default: the target's context length, at most 4096; "
                            "each of the --max-num-seqs cache rows holds this many positions)")
    serve.add_argument("--max-num-seqs", type=int, default=8,
                       help="requests decoded together (continuous batching; default: 8)")
    serve.add_argument("--max-queue", type=int, default=64,
                       help="requests allowed to wait beside the --max-num-seqs running ones; more get 503 "
                            "(default: 64)")
    serve.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                       help=f"larger request bodies get 413 (default: {DEFAULT_MAX_REQUEST_BYTES})")
    serve.add_argument("--shutdown-timeout", type=float, default=20.0,
                       help="seconds that running requests get to finish after SIGTERM or Ctrl-C, while new ones "
                            "get 503; the rest then end with an error (default: 20)")
    serve.add_argument("--block-size", type=int, default=None,
                       help="default block per request (default: the draft's trained block size); a request "
                            "may ask for a smaller one with the extra field block_size")
    serve.add_argument("--max-step-tokens", type=int, default=None, metavar="N",
                       help=f"each step drafts the largest power-of-two block (at least 2; a request's own block "
                            f"still caps it) whose rows x block fits N, so the block shrinks as the batch grows; "
                            f"0: off (default: {CUDA_MAX_STEP_TOKENS} on CUDA, a roofline estimate of where a verify "
                            f"stops being bound by one read of the weights, to be measured; off on the CPU, where "
                            f"a verify is bound by compute at any batch size)")
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_exact_arg(serve)
    serve.set_defaults(handler=_serve)


def step_token_budget(flag: int | None, device_type: str) -> int | None:
    """BatchDecoder's max_step_tokens for --max-step-tokens `flag` (None: the device's default, 0: off)."""
    if flag is None:
        return CUDA_MAX_STEP_TOKENS if device_type == "cuda" else None
    return flag or None


def _listen(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a busy port fails fast with one line."""
    if not 0 <= port <= 65535:
        raise BlockspecError(f"--port {port} is not a TCP port (0..65535)")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise BlockspecError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): choose another --port "
                             f"or --host") from None


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from blockspec.serve.app import DrainingServer, create_app
    except ModuleNotFoundError as exc:
        raise BlockspecError(f"`blockspec serve` needs {exc.name}: pip install 'blockspec[serve]'") from None
    if args.max_step_tokens is not None and (args.max_step_tokens < 0 or args.max_step_tokens == 1):
        raise BlockspecError(f"--max-step-tokens must be 0 (off) or at least 2, got {args.max_step_tokens}")
    if args.api_key == "":  # every /v1 request would get 401: no client can send an empty bearer token
        raise BlockspecError("--api-key is empty (is $BLOCKSPEC_API_KEY set to ''?): give a key, or unset it to "
                             "serve without one")
    if not (math.isfinite(args.shutdown_timeout) and args.shutdown_timeout >= 0):  # inf: a drain never ends
        raise BlockspecError(f"--shutdown-timeout must be a finite number of seconds >= 0, got "
                             f"{args.shutdown_timeout}")
    # checked here, before the model loads, to name the flag (create_app's errors name its arguments)
    for flag, value in (("--max-num-seqs", args.max_num_seqs), ("--max-queue", args.max_queue),
                        ("--max-request-bytes", args.max_request_bytes), ("--max-model-len", args.max_model_len),
                        ("--block-size", args.block_size)):
        if value is not None and value < 1:
            raise BlockspecError(f"{flag} must be at least 1, got {value}")
    sock = _listen(args.host, args.port)
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach this port can use it",
              file=sys.stderr)
    try:
        target, draft, trained = load_pair(args.target, args.draft, args.device, args.dtype)
        context = target.model.config.max_position_embeddings
        if args.max_model_len is not None and args.max_model_len > context:
            raise BlockspecError(f"--max-model-len {args.max_model_len} exceeds the target's context of {context} "
                                 f"tokens")
        if args.block_size is not None and args.block_size > draft.block_size:
            raise BlockspecError(f"--block-size {args.block_size} exceeds the draft's trained block size "
                                 f"{draft.block_size}")
        if not trained:
            print("note: no trained draft for this target; serving with an UNTRAINED random draft (lossless, "
                  "but ~1 token per step: no speedup)", file=sys.stderr)
        app = create_app(target, draft, served_model_name=args.served_model_name or args.target,
                         api_key=args.api_key, max_queue=args.max_queue, max_model_len=args.max_model_len,
                         block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                         max_request_bytes=args.max_request_bytes,
                         max_step_tokens=step_token_budget(args.max_step_tokens, target.device.type),
                         kernel_settings=kernel_settings(args.exact, target))
        name = args.served_model_name or args.target
        host, port = sock.getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        print(f"blockspec: serving {name!r} (draft: {args.draft or ('shipped' if trained else UNTRAINED_DRAFT)}) "
              f"at http://{host}:{port}/v1", file=sys.stderr)
        # once drained, every response has its last event: uvicorn's own grace period only flushes them
        config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)
        try:
            DrainingServer(config, app.state.service, args.shutdown_timeout).run(sockets=[sock])
        except KeyboardInterrupt:  # a second Ctrl-C: uvicorn stops at once, then re-raises the signal
            pass
        print("blockspec: server stopped", file=sys.stderr)
    finally:
        sock.close()
    return 0
