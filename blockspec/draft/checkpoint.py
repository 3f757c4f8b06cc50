"""Load and save drafts in the published layout: `config.json` + `*.safetensors`, no name prefix.

Only safetensors are read (never pickle). Every way a checkpoint can fail to fit its target is refused with
a one-line BlockspecError that names the key or tensor at fault.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from blockspec.draft.config import DraftConfig
from blockspec.draft.model import MASK_EMBEDDING, DraftModel, new_draft
from blockspec.errors import BlockspecError
from blockspec.hub import download_from_hub, looks_like_hub_id, model_name, resolve_local
from blockspec.shipped import shipped_draft_dir
from blockspec.target.loading import resolve_device, resolve_dtype

# Tensors some exporters add that a draft does not own (it borrows the target's embedding and head).
IGNORED_TENSORS = ("rotary_emb.inv_freq", "embed_tokens.weight", "lm_head.weight")


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [directory / s for s in shards]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
        hint = (f" (found {pickles[0]}: blockspec never loads pickle files; convert it to safetensors)"
                if pickles else "")
        raise BlockspecError(f"draft directory {str(directory)!r} has no *.safetensors weights{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise BlockspecError(f"draft shard {file.name} listed in the index is missing from {directory}")
        try:
            tensors.update(load_file(str(file)))
        except Exception as exc:  # safetensors raises its own error type for truncated or corrupt files
            raise BlockspecError(f"draft weights {file} are unreadable ({str(exc).splitlines()[0][:120]}): "
                                 f"re-download or re-save the checkpoint") from None
    return tensors


def resolve_draft_dir(name: str) -> Path:
    """A local draft directory, a draft shipped inside blockspec, or a model-hub id."""
    shipped = shipped_draft_dir(name)
    if shipped is not None:
        return shipped
    if looks_like_hub_id(name):
        return download_from_hub(name, ["*.json", "*.safetensors"])
    path = resolve_local(name, "draft")
    if not path.is_dir():
        raise BlockspecError(f"draft {name!r} is not a directory: pass the folder holding config.json")
    return path


def load_draft(name: str | Path, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None) -> DraftModel:
    """Load a DFlash / DFlare draft checkpoint (local directory, shipped draft name, or model-hub id).

    `device` and `dtype` are read as load_target reads them (`dtype=None` keeps the checkpoint's dtype)."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device) if dtype is not None else None
    directory = resolve_draft_dir(model_name(name, "draft"))
    cfg = DraftConfig.load(directory)
    tensors = _read_tensors(directory)
    for ignored in IGNORED_TENSORS:
        tensors.pop(ignored, None)
    model = new_draft(cfg, mask_embedding=MASK_EMBEDDING in tensors)
    expected = model.state_dict()
    for key, meta in expected.items():
        if key not in tensors:
            raise BlockspecError(f"draft checkpoint {directory} is missing tensor {key!r} "
                                 f"(architecture {cfg.architecture}, {cfg.num_layers} layers)")
        if tuple(tensors[key].shape) != tuple(meta.shape):
            raise BlockspecError(f"draft tensor {key!r} has shape {list(tensors[key].shape)}, but config.json "
                                 f"implies {list(meta.shape)}")
        # greedy decoding would hide it (NaN drafts are merely rejected), but every sampled request would fail
        if not torch.isfinite(tensors[key]).all():
            raise BlockspecError(f"draft tensor {key!r} in {directory} holds values that are not finite (NaN or "
                                 f"inf): the checkpoint is corrupt; re-download or re-train it")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise BlockspecError(f"draft checkpoint has tensor {unexpected[0]!r} that {cfg.architecture} does not "
                             f"use: is 'architectures' in config.json right?")
    model.load_state_dict(tensors, assign=True)
    model = model.to(device)
    return model.to(dtype) if dtype is not None else model


def save_draft(model: DraftModel, directory: str | Path) -> None:
    """Write config.json + model.safetensors in the published layout (plus `mask_embedding` if owned)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


def new_draft_for_target(target_config: object, arch: str = "dflash", num_layers: int = 1,
                         block_size: int = 16, mask_token_id: int | None = None, seed: int = 0, std: float = 0.02,
                         **overrides: object) -> DraftModel:
    """A freshly initialised draft (`init_weights(seed, std)`), on the CPU, shaped for a target (its width, heads
    and MLP width by default).

    Without `mask_token_id` the draft owns a learned mask embedding, which works for any vocabulary.
    """
    c = target_config
    shape = dict(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_heads=c.num_heads,
                 num_kv_heads=c.num_kv_heads, head_dim=c.head_dim)
    shape.update(overrides)
    cfg = DraftConfig.create(arch, num_layers=num_layers, vocab_size=c.vocab_size, num_target_layers=c.num_layers,
                             block_size=block_size, mask_token_id=mask_token_id, rms_norm_eps=c.rms_norm_eps,
                             **shape)
    return new_draft(cfg, mask_embedding=mask_token_id is None).to_empty(device="cpu").init_weights(seed, std)


def check_draft_fits_target(draft: DraftModel, target_config: object, source: str = "draft") -> None:
    """Refuse a draft whose shapes, vocabulary, taps or mask token do not fit the target."""
    cfg = draft.config
    hidden, vocab, layers = target_config.hidden_size, target_config.vocab_size, target_config.num_layers
    if cfg.hidden_size != hidden:
        raise BlockspecError(f"{source}: 'hidden_size' is {cfg.hidden_size} but the target's is {hidden}; "
                             f"use a draft trained for this target")
    if cfg.vocab_size is not None and cfg.vocab_size != vocab:
        raise BlockspecError(f"{source}: 'vocab_size' is {cfg.vocab_size} but the target vocabulary has {vocab} "
                             f"ids; use a draft trained for this target")
    if cfg.num_target_layers is not None and cfg.num_target_layers != layers:
        raise BlockspecError(f"{source}: 'num_target_layers' is {cfg.num_target_layers} but the target has "
                             f"{layers} layers; use a draft trained for this target")
    bad = [i for i in cfg.target_layer_ids if not isinstance(i, int) or not 0 <= i < layers]
    if bad:
        raise BlockspecError(f"{source}: 'dflash_config.target_layer_ids' holds {bad[0]}, out of range for a "
                             f"{layers}-layer target (valid: 0..{layers - 1})")
    if draft.mask_embedding is None:
        mask = cfg.mask_token_id
        if not isinstance(mask, int) or not 0 <= mask < vocab:
            raise BlockspecError(f"{source}: 'dflash_config.mask_token_id' is {mask!r}, not an id of the "
                                 f"target's {vocab}-token vocabulary, and the checkpoint has no "
                                 f"{MASK_EMBEDDING!r} tensor")
