"""Drafts shipped inside the package (trained by blockspec), and which target each one serves."""

from __future__ import annotations

from pathlib import Path

from blockspec.hub import DEFAULT_TARGET, SMOLLM2_GGUF, SMOLLM2_GGUF_BYTES

DRAFTS_DIR = Path(__file__).resolve().parent / "drafts"

# target name -> shipped draft folder under blockspec/drafts/ (the first one present is the default)
SHIPPED_DRAFTS: dict[str, tuple[str, ...]] = {
    # DFlash first: it measured the higher tau on held-out gsm8k (docs/performance.md)
    DEFAULT_TARGET: ("smollm2-135m-instruct-dflash", "smollm2-135m-instruct-dflare"),
}


def shipped_draft_dir(name: str) -> Path | None:
    path = DRAFTS_DIR / name
    return path if (path / "config.json").is_file() else None


def shipped_target_name(target_name: str) -> str:
    """The name SHIPPED_DRAFTS knows a target by: a copy of the default target's GGUF at another path (same
    file name and size, e.g. staged on a GPU machine) is the default target; anything else keeps its name."""
    path = Path(target_name).expanduser()
    if path.name == SMOLLM2_GGUF and path.is_file() and path.stat().st_size == SMOLLM2_GGUF_BYTES:
        return DEFAULT_TARGET
    return target_name


def default_draft_for(target_name: str) -> str | None:
    """The shipped draft directory for a target, or None when blockspec ships none (yet)."""
    for name in SHIPPED_DRAFTS.get(shipped_target_name(target_name), ()):
        if shipped_draft_dir(name) is not None:
            return str(DRAFTS_DIR / name)
    return None
