"""The decoding engine: the speculative loop, sampling rules, streaming text and per-call stats."""

from blockspec.engine.sampling import SamplingParams
from blockspec.engine.speculative import GenerationResult, SpeculativeDecoder, StreamChunk
from blockspec.engine.stats import GenerationStats

__all__ = ["GenerationResult", "GenerationStats", "SamplingParams", "SpeculativeDecoder", "StreamChunk"]
