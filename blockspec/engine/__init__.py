"""The decoding engine: one batched speculative step (batch.py) driven per request, proposers that draft for it,
the acceptance rule, sampling settings, streaming text and per-call stats."""

from blockspec.engine.batch import BatchDecoder
from blockspec.engine.proposer import DraftProposer, Proposer
from blockspec.engine.sampling import SamplingParams
from blockspec.engine.sequence import GenerationResult, StreamChunk
from blockspec.engine.speculative import SpeculativeDecoder
from blockspec.engine.stats import GenerationStats

__all__ = ["BatchDecoder", "DraftProposer", "GenerationResult", "GenerationStats", "Proposer", "SamplingParams",
           "SpeculativeDecoder", "StreamChunk"]
