"""The draft `config.json`: a Qwen3 config plus `architectures`, `block_size`, `num_target_layers` and
`dflash_config: {mask_token_id, target_layer_ids}` (SPEC section 4).

`DraftConfig` keeps the whole original dict, so keys it does not model (training keys, `auto_map`,
`transformers_version`, either RoPE layout, ...) survive a load -> save round trip untouched.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

from blockspec.errors import BlockspecError

DFLASH_ARCHITECTURES = ("DFlashDraftModel", "QwenDFlashDraftModel")
DFLARE_ARCHITECTURES = ("QwenDFlareDraftModel",)
ARCHITECTURES = DFLASH_ARCHITECTURES + DFLARE_ARCHITECTURES
REQUIRED_KEYS = ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "block_size")


def default_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """SPEC: `[L//2]` for one draft layer, else `round(1 + i*(L-4)/(D-1))` (Python round, half to even)."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    span = num_target_layers - 4
    return [round(1 + i * span / (num_draft_layers - 1)) for i in range(num_draft_layers)]


@dataclass
class DraftConfig:
    raw: dict = field(repr=False)

    # ---- construction -------------------------------------------------------------------------------
    @staticmethod
    def from_dict(raw: dict, source: str = "config.json") -> "DraftConfig":
        raw = copy.deepcopy(raw)
        for key in REQUIRED_KEYS:
            if key not in raw or raw[key] is None:
                raise BlockspecError(f"draft config {source} is missing the required key {key!r}")
        if not isinstance(raw.get("dflash_config") or {}, dict):
            raise BlockspecError(f"draft config {source}: 'dflash_config' must be an object "
                                 f"{{mask_token_id, target_layer_ids}}, got {raw['dflash_config']!r}")
        arch = raw["architectures"]
        if not isinstance(arch, list) or len(arch) != 1 or arch[0] not in ARCHITECTURES:
            raise BlockspecError(f"draft config {source}: unknown 'architectures' {arch!r}; "
                                 f"expected one of {', '.join(ARCHITECTURES)}")
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "block_size"):
            if not isinstance(raw[key], int) or raw[key] < 1:
                raise BlockspecError(f"draft config {source}: {key!r} must be a positive integer, got {raw[key]!r}")
        if raw["block_size"] < 2:
            raise BlockspecError(f"draft config {source}: 'block_size' must be at least 2, got {raw['block_size']}")
        cfg = DraftConfig(raw)
        if cfg.hidden_size % cfg.num_attention_heads and "head_dim" not in raw:
            raise BlockspecError(f"draft config {source}: 'head_dim' is required when hidden_size is not a "
                                 f"multiple of num_attention_heads")
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise BlockspecError(f"draft config {source}: 'num_key_value_heads' must divide num_attention_heads")
        if not cfg.target_layer_ids:
            raise BlockspecError(f"draft config {source}: 'dflash_config.target_layer_ids' is empty and "
                                 f"'num_target_layers' is missing to derive it")
        return cfg

    @staticmethod
    def load(directory: str | Path) -> "DraftConfig":
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise BlockspecError(f"draft directory {str(directory)!r} has no config.json")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise BlockspecError(f"draft config {path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
        except (UnicodeDecodeError, OSError) as exc:
            raise BlockspecError(f"draft config {path} is unreadable ({type(exc).__name__}): it must be UTF-8 "
                                 f"JSON") from None
        if not isinstance(raw, dict):
            raise BlockspecError(f"draft config {path} must be a JSON object")
        return DraftConfig.from_dict(raw, str(path))

    @staticmethod
    def create(arch: str, *, hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int,
               num_kv_heads: int, head_dim: int, vocab_size: int, num_target_layers: int, block_size: int = 16,
               target_layer_ids: list[int] | None = None, mask_token_id: int | None = None,
               rms_norm_eps: float = 1e-6, rope_theta: float = 1e6, max_position_embeddings: int = 40960,
               **extra: object) -> "DraftConfig":
        """A new config in the published layout (what blockspec writes for drafts it trains)."""
        arch_name = {"dflash": "DFlashDraftModel", "dflare": "QwenDFlareDraftModel"}.get(arch, arch)
        ids = target_layer_ids or default_target_layer_ids(num_target_layers, num_layers)
        raw = {
            "architectures": [arch_name], "model_type": "qwen3", "attention_bias": False, "attention_dropout": 0.0,
            "hidden_act": "silu", "hidden_size": hidden_size, "intermediate_size": intermediate_size,
            "num_hidden_layers": num_layers, "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
            "head_dim": head_dim, "rms_norm_eps": rms_norm_eps, "rope_theta": rope_theta, "rope_scaling": None,
            "max_position_embeddings": max_position_embeddings, "vocab_size": vocab_size,
            "layer_types": ["full_attention"] * num_layers, "sliding_window": None, "use_sliding_window": False,
            "tie_word_embeddings": False, "block_size": block_size, "num_target_layers": num_target_layers,
            "dflash_config": {"mask_token_id": mask_token_id, "target_layer_ids": ids},
        }
        raw.update(extra)
        return DraftConfig.from_dict(raw, "new config")

    def to_dict(self) -> dict:
        return copy.deepcopy(self.raw)

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "config.json").write_text(json.dumps(self.raw, indent=2, sort_keys=True) + "\n")

    # ---- fields ---------------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        return self.raw["architectures"][0]

    @property
    def kind(self) -> str:
        """'dflash' or 'dflare'."""
        return "dflare" if self.architecture in DFLARE_ARCHITECTURES else "dflash"

    @property
    def hidden_size(self) -> int:
        return self.raw["hidden_size"]

    @property
    def intermediate_size(self) -> int:
        return self.raw["intermediate_size"]

    @property
    def num_layers(self) -> int:
        return self.raw["num_hidden_layers"]

    @property
    def num_attention_heads(self) -> int:
        return self.raw["num_attention_heads"]

    @property
    def num_key_value_heads(self) -> int:
        return self.raw.get("num_key_value_heads") or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.raw.get("head_dim") or self.hidden_size // self.num_attention_heads

    @property
    def rms_norm_eps(self) -> float:
        return self.raw.get("rms_norm_eps", 1e-6)

    @property
    def attention_bias(self) -> bool:
        return bool(self.raw.get("attention_bias", False))

    @property
    def vocab_size(self) -> int | None:
        return self.raw.get("vocab_size")

    @property
    def block_size(self) -> int:
        return self.raw["block_size"]

    @property
    def num_target_layers(self) -> int | None:
        return self.raw.get("num_target_layers")

    @property
    def mask_token_id(self) -> int | None:
        return (self.raw.get("dflash_config") or {}).get("mask_token_id")

    @property
    def target_layer_ids(self) -> list[int]:
        ids = (self.raw.get("dflash_config") or {}).get("target_layer_ids")
        if ids:
            return list(ids)
        if self.num_target_layers:
            return default_target_layer_ids(self.num_target_layers, self.num_layers)
        return []
