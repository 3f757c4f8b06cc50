"""What the `blockspec` subcommands share: the model and sampling flags, the device choice and the loading of a
target with its draft. Importing this module is cheap (no torch): every command's parser uses it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from blockspec.errors import BlockspecError
from blockspec.hub import DEFAULT_TARGET

if TYPE_CHECKING:
    from blockspec.draft import DraftModel
    from blockspec.kernels import KernelSettings
    from blockspec.target import Target

UNTRAINED_DRAFT = "untrained"


def add_model_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, device: str = "cpu",
                   draft: bool = True) -> None:
    """--target, --draft (unless `draft` is False), --device (default `device`) and --dtype."""
    parser.add_argument("--target", default=DEFAULT_TARGET,
                        help=f"HF model directory, .gguf file or model-hub id (default: {DEFAULT_TARGET})")
    if draft:
        parser.add_argument("--draft", default=None,
                            help="draft checkpoint directory, shipped draft name or hub id (default: the shipped "
                                 f"draft for the default target; '{UNTRAINED_DRAFT}' = a seeded random draft)")
    choices = "auto (cuda when available), cpu, cuda, cuda:1, ..." if device == "auto" else "cpu, cuda, cuda:1, ..."
    parser.add_argument("--device", default=device, help=f"{choices} (default: {device})")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    parser.add_argument("--block-size", type=int, default=None, help="default: the draft's trained block size")


def load_pair(target_name: str, draft_name: str | None, device: str, dtype: str) -> tuple[Target, DraftModel, bool]:
    """(target, draft, draft_is_trained): the draft defaults to the one shipped for the default target."""
    from blockspec.draft import load_draft, new_draft_for_target
    from blockspec.shipped import default_draft_for
    from blockspec.target import load_target, resolve_device

    target = load_target(target_name, device=resolve_device(device), dtype=dtype)
    if draft_name is None:
        draft_name = default_draft_for(target_name) or UNTRAINED_DRAFT
    if draft_name == UNTRAINED_DRAFT:
        draft = new_draft_for_target(target.model.config).to(device=target.device, dtype=target.dtype)
        return target, draft, False
    return target, load_draft(draft_name, device=target.device, dtype=target.dtype), True


def check_folder_arg(flag: str, path: Path | None) -> None:
    """A one-line error where `path` (a folder a command will write into), or its nearest existing parent, is a
    file: found before the run rather than when it writes there."""
    nearest = next((p for p in (path, *path.parents) if p.exists()), None) if path is not None else None
    if nearest is not None and not nearest.is_dir():
        raise BlockspecError(f"{flag} {str(path)!r}: {str(nearest)!r} is a file, not a folder; pass a folder")


def add_exact_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--exact", action="store_true",
                        help="batch-invariant kernels on CUDA (bf16 or fp16): greedy speculative output identical "
                             "to plain decoding bit for bit, and a request's tokens independent of the batch; "
                             "on an H100 a plain token costs 5-9%% more and a speculative step 1-2%% more (no effect "
                             "on the CPU)")


def kernel_settings(exact: bool, target: Target) -> KernelSettings:
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
