"""The decoding engine: the single-sequence and batched speculative loops, sampling rules, streaming text and
per-call stats."""

from blockspec.engine.batch import BatchDecoder
from blockspec.engine.sampling import SamplingParams
from blockspec.engine.sequence import GenerationResult, StreamChunk
from blockspec.engine.speculative import SpeculativeDecoder
from blockspec.engine.stats import GenerationStats

__all__ = ["BatchDecoder", "GenerationResult", "GenerationStats", "SamplingParams", "SpeculativeDecoder",
           "StreamChunk"]
