"""blockspec: lossless LLM acceleration by block-diffusion speculative decoding (DFlash / DFlare)."""

from blockspec.draft import DraftConfig, DraftModel, load_draft, save_draft
from blockspec.engine import BatchDecoder, GenerationResult, GenerationStats, SamplingParams, SpeculativeDecoder
from blockspec.errors import BlockspecError
from blockspec.target import Target, load_target

__version__ = "0.1.0"

__all__ = ["BatchDecoder", "BlockspecError", "DraftConfig", "DraftModel", "GenerationResult", "GenerationStats",
           "SamplingParams", "SpeculativeDecoder", "Target", "load_draft", "load_target", "save_draft"]
