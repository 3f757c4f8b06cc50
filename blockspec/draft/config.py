"""The draft `config.json`: a Qwen3 config plus `architectures`, `block_size`, `num_target_layers` and
`dflash_config: {mask_token_id, target_layer_ids}` (SPEC section 4). Newer z-lab configs keep `block_size` in
`dflash_config` too; as in z-lab's loader, a key there wins over the same key at the top level.

Attention per layer (`layer_types`, as z-lab's reference reads them, docs/design-notes.md): a `full_attention`
layer sees the whole context and the whole block; a `sliding_attention` layer is causal inside the block and a
query at position p sees positions > p - `sliding_window` (when `use_sliding_window` is set, as transformers'
Qwen3Config requires). A top-level `is_causal` makes every layer causal (true) or bidirectional (false).

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
TARGET_ARCHITECTURE_SUFFIXES = ("ForCausalLM", "ForConditionalGeneration")
REQUIRED_KEYS = ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads")
LAYER_TYPES = ("full_attention", "sliding_attention")
# dflash_config keys of newer z-lab drafts that change the draft's output; blockspec implements their defaults
OUTPUT_KEYS = {"input_embedding_scale": 1.0, "output_multiplier": 1.0, "final_logit_softcapping": None}


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
            # a target's folder given as the draft names its causal LM class here (and lacks block_size)
            hint = (" (a target model's config, not a DFlash/DFlare draft: pass it as the target)"
                    if isinstance(arch, list) and any(str(a).endswith(TARGET_ARCHITECTURE_SUFFIXES) for a in arch)
                    else "")
            raise BlockspecError(f"draft config {source}: unknown 'architectures' {arch!r}{hint}; "
                                 f"expected one of {', '.join(ARCHITECTURES)}")
        dflash = raw.get("dflash_config") or {}
        block_size = dflash.get("block_size", raw.get("block_size"))
        if block_size is None:
            raise BlockspecError(f"draft config {source} is missing the required key 'block_size' (at the top level "
                                 f"or in dflash_config)")
        for key, default in OUTPUT_KEYS.items():
            if dflash.get(key, default) != default:
                raise BlockspecError(f"draft config {source}: dflash_config.{key} = {dflash[key]!r} is not "
                                     f"implemented (blockspec runs drafts with {key} = {default})")
        sizes = {key: raw[key] for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads")}
        sizes["block_size"] = block_size
        for key, value in sizes.items():
            if not isinstance(value, int) or value < 1:
                raise BlockspecError(f"draft config {source}: {key!r} must be a positive integer, got {value!r}")
        if block_size < 2:
            raise BlockspecError(f"draft config {source}: 'block_size' must be at least 2, got {block_size}")
        cfg = DraftConfig(raw)
        if cfg.hidden_size % cfg.num_attention_heads and "head_dim" not in raw:
            raise BlockspecError(f"draft config {source}: 'head_dim' is required when hidden_size is not a "
                                 f"multiple of num_attention_heads")
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise BlockspecError(f"draft config {source}: 'num_key_value_heads' must divide num_attention_heads")
        if not cfg.target_layer_ids:
            raise BlockspecError(f"draft config {source}: 'dflash_config.target_layer_ids' is empty and "
                                 f"'num_target_layers' is missing to derive it")
        cfg._check_layer_types(source)
        return cfg

    def _check_layer_types(self, source: str) -> None:
        types = self.raw.get("layer_types")
        if types is not None and (not isinstance(types, list) or len(types) != self.num_layers):
            raise BlockspecError(f"draft config {source}: 'layer_types' must list one type per layer "
                                 f"({self.num_layers}), got {types!r}")
        unknown = [t for t in self.layer_types if t not in LAYER_TYPES]
        if unknown:
            raise BlockspecError(f"draft config {source}: layer type {unknown[0]!r} is not implemented by blockspec; "
                                 f"supported: {', '.join(LAYER_TYPES)}")
        window = self.sliding_window
        if "sliding_attention" in self.layer_types and window is not None:
            if not isinstance(window, int) or window < 1:
                raise BlockspecError(f"draft config {source}: 'sliding_window' must be a positive integer, "
                                     f"got {window!r}")
            if self.raw.get("is_causal") is False:
                raise BlockspecError(f"draft config {source}: 'is_causal': false with sliding-window layers (a "
                                     f"window reaching ahead of the query) is not implemented; drop 'is_causal' to "
                                     f"run sliding layers causal inside the block as z-lab's reference does")

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
        return self._dflash_value("block_size")

    @property
    def num_target_layers(self) -> int | None:
        return self.raw.get("num_target_layers")

    def _dflash_value(self, key: str) -> object:
        """`dflash_config[key]`, else the top-level key (z-lab's loader reads them in this order)."""
        return (self.raw.get("dflash_config") or {}).get(key, self.raw.get(key))

    @property
    def mask_token_id(self) -> int | None:
        return self._dflash_value("mask_token_id")

    @property
    def target_layer_ids(self) -> list[int]:
        ids = self._dflash_value("target_layer_ids")
        if ids:
            return list(ids)
        if self.num_target_layers:
            return default_target_layer_ids(self.num_target_layers, self.num_layers)
        return []

    @property
    def layer_types(self) -> list[str]:
        return list(self.raw.get("layer_types") or ["full_attention"] * self.num_layers)

    @property
    def sliding_window(self) -> int | None:
        """The window of sliding layers; None without `use_sliding_window` (transformers' Qwen3Config drops it)."""
        return self.raw.get("sliding_window") if self.raw.get("use_sliding_window") else None

    def layer_attention(self, index: int) -> tuple[bool, int | None]:
        """(causal inside the block, window or None) of draft layer `index`."""
        sliding = self.layer_types[index] == "sliding_attention"
        causal = self.raw.get("is_causal")
        return (sliding if causal is None else bool(causal)), (self.sliding_window if sliding else None)
