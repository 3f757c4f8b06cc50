"""Export a trained draft: blockspec's published layout (SPEC section 4), or z-lab's DFlash layout.

Published layout: `config.json` (a Qwen3 config + architectures / block_size / num_target_layers /
dflash_config) and `model.safetensors`, no name prefix -- what `save_draft` writes and every loader of the
published checkpoints reads. A draft with a learned mask embedding carries the extra tensor
`mask_embedding` (blockspec reads it; the public reference loaders do not know it).

z-lab layout: the same files with `architectures: ["DFlashDraftModel"]` and
`auto_map: {"AutoModel": "dflash.DFlashDraftModel"}`, so `AutoModel.from_pretrained(dir,
trust_remote_code=True)` finds z-lab's `dflash.py` (not shipped by blockspec: copy it from a z-lab DFlash
repository next to config.json). z-lab's code embeds `mask_token_id` with the target's embedding, so only
DFlash drafts that use a vocabulary id as the mask can be exported this way.
"""

from __future__ import annotations

import copy
from pathlib import Path

from blockspec.draft import DraftConfig, DraftModel, load_draft
from blockspec.errors import BlockspecError
from blockspec.target.loading import DTYPES
from blockspec.train.trainer import atomic_save_draft

# no aliases (bf16, fp32): the export writes the name it is given as config.json's torch_dtype
EXPORT_DTYPES = ("bfloat16", "float32", "float16")


def check_export_dir(directory: str | Path) -> None:
    """Refuse a `directory` that exists and is not an empty folder: the export replaces the folder whole (an
    atomic swap), so a file there, or anything in it (other files, the dflash.py copied next to an earlier
    export), would be deleted."""
    directory = Path(directory)
    if directory.exists() and not (directory.is_dir() and not any(directory.iterdir())):
        raise BlockspecError(f"export folder {str(directory)!r} already exists and is not empty (the export would "
                             f"replace it whole): pass a new or empty folder")


def export_draft(draft: DraftModel | str | Path, directory: str | Path, layout: str = "blockspec",
                 dtype: str = "bfloat16") -> Path:
    """Write `draft` (a model or a draft directory) to `directory` in the given layout; returns the folder."""
    draft = load_draft(draft) if not isinstance(draft, DraftModel) else copy.deepcopy(draft)
    if dtype not in EXPORT_DTYPES:
        raise BlockspecError(f"unknown export dtype {dtype!r}: use {', '.join(EXPORT_DTYPES)}")
    if layout == "zlab":
        if draft.config.kind != "dflash":
            raise BlockspecError("the z-lab layout exists only for DFlash drafts (this one is DFlare)")
        if draft.mask_embedding is not None:
            raise BlockspecError("z-lab's DFlash code needs a vocabulary id as the mask token, but this draft has a "
                                 "learned mask embedding: train with --mask-token-id SPARE_ID to export it for z-lab")
        raw = draft.config.to_dict()
        raw["architectures"] = ["DFlashDraftModel"]
        raw["auto_map"] = {"AutoModel": "dflash.DFlashDraftModel"}
        raw["torch_dtype"] = dtype
        draft.config = DraftConfig.from_dict(raw, "export")
    elif layout == "blockspec":
        raw = draft.config.to_dict()
        raw["torch_dtype"] = dtype
        draft.config = DraftConfig.from_dict(raw, "export")
    else:
        raise BlockspecError(f"unknown export layout {layout!r}: use blockspec or zlab")
    directory = Path(directory)
    check_export_dir(directory)
    atomic_save_draft(draft, directory, DTYPES[dtype])
    return directory
