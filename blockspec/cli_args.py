"""What the `blockspec` subcommands share: the model and sampling flags, the device choice and the loading of a
target with its draft. Importing this module is cheap (no torch): every command's parser uses it."""

from __future__ import annotations

import argparse

from blockspec.errors import BlockspecError
from blockspec.hub import DEFAULT_TARGET

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


def load_pair(target_name: str, draft_name: str | None, device: str, dtype: str) -> tuple[object, object, bool]:
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
