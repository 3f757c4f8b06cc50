"""Drafts shipped inside the package (trained by blockspec), and which target each one serves."""

from __future__ import annotations

from pathlib import Path

from blockspec.hub import DEFAULT_TARGET

DRAFTS_DIR = Path(__file__).resolve().parent / "drafts"

# target name -> shipped draft folder under blockspec/drafts/ (the first one present is the default)
SHIPPED_DRAFTS: dict[str, tuple[str, ...]] = {
    # DFlash first: it measured the higher tau on held-out gsm8k (docs/benchmarks.md)
    DEFAULT_TARGET: ("smollm2-135m-instruct-dflash", "smollm2-135m-instruct-dflare"),
}


def shipped_draft_dir(name: str) -> Path | None:
    path = DRAFTS_DIR / name
    return path if (path / "config.json").is_file() else None


def default_draft_for(target_name: str) -> str | None:
    """The shipped draft directory for a target, or None when blockspec ships none (yet)."""
    for name in SHIPPED_DRAFTS.get(target_name, ()):
        if shipped_draft_dir(name) is not None:
            return str(DRAFTS_DIR / name)
    return None
