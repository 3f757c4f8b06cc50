"""What one request asks for and what it has produced, shared by the single-sequence and the batched loop:
request validation, and the bookkeeping of committed tokens (stop ids, stop strings, the length limit,
released text, stats)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import repeat

import torch

from blockspec.draft import DraftModel, check_draft_fits_target
from blockspec.engine.sampling import SamplingParams, TokenLogprob
from blockspec.engine.stats import GenerationStats
from blockspec.engine.text import TextStream
from blockspec.errors import BlockspecError, brief
from blockspec.target import Target


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens (a stop token that ended generation included)
    text: str  # without a stop string's text
    finish_reason: str  # "stop" (stop token or string) | "length"
    stats: GenerationStats
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked for them


@dataclass
class StreamChunk:
    token_ids: list[int]  # tokens committed by this step
    text: str  # text released by this step
    result: GenerationResult | None = field(default=None)  # set on the last chunk only
    error: str | None = None  # set when this request failed and left the batch (its result stays None)
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when the request asked for them


def check_pair(target: Target, draft: object) -> None:
    """A BlockspecError unless `target` is a Target and `draft` (None: plain decoding; a DraftModel; or any
    Proposer, which is trusted) fits it and lives on its device, in its dtype."""
    if not isinstance(target, Target):  # e.g. a path: the decoders take loaded models
        raise BlockspecError(f"the target must be a blockspec Target (from load_target), got {brief(target)}")
    if draft is None or (not isinstance(draft, DraftModel) and hasattr(draft, "propose_greedy")):
        return
    if not isinstance(draft, DraftModel):
        raise BlockspecError(f"the draft must be a DraftModel (from load_draft), a Proposer or None, got "
                             f"{brief(draft)}")
    check_draft_fits_target(draft, target.model.config)
    if draft.norm.weight.device != target.device:
        raise BlockspecError(f"draft is on {draft.norm.weight.device} but the target on {target.device}")
    if draft.norm.weight.dtype != target.dtype:  # the draft reads the target's features and embedding as they are
        raise BlockspecError(f"draft is in {draft.norm.weight.dtype} but the target in {target.dtype}: load it with "
                             f"load_draft(..., dtype=target.dtype)")


def check_block_size(block_size: int | None, trained: int) -> int:
    """The block size to use: `block_size`, or the draft's `trained` one when None (1 without a draft)."""
    block_size = trained if block_size is None else block_size
    if not isinstance(block_size, int) or block_size < 1:
        raise BlockspecError(f"block size must be a positive integer, got {brief(block_size)}")
    if block_size > trained:
        raise BlockspecError(f"block size {brief(block_size)} exceeds the draft's trained block_size {trained}")
    return block_size


def check_request(target: Target, prompt_ids: list[int], params: SamplingParams | None) -> SamplingParams:
    """Validated sampling settings for `prompt_ids`, or a BlockspecError naming what is wrong."""
    if params is not None and not isinstance(params, SamplingParams):
        raise BlockspecError(f"sampling settings must be a SamplingParams, got {type(params).__name__}")
    params = (params or SamplingParams()).validate()
    # map and min / max run in C: a 512-token prompt in ~20 us instead of ~36 (32 joining prompts wait on them)
    if not isinstance(prompt_ids, (list, tuple)) or not all(map(isinstance, prompt_ids, repeat(int))):
        hint = {str: ": encode text with target.encode(text)", torch.Tensor: ": pass ids.tolist()"}.get(
            type(prompt_ids), "")
        raise BlockspecError(f"the prompt must be a list of token ids (ints), got {brief(prompt_ids)}{hint}")
    if not prompt_ids:
        raise BlockspecError("the prompt is empty")
    vocab = target.model.config.vocab_size
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
        raise BlockspecError(f"prompt holds a token id outside the target vocabulary (0..{vocab - 1})")
    if params.stop_strings and target.tokenizer is None:
        raise BlockspecError("stop strings need a target with a tokenizer")
    limit = target.model.config.max_position_embeddings
    if len(prompt_ids) + params.max_new_tokens > limit:
        raise BlockspecError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                             f"the target's context of {limit} tokens")
    return params


def new_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The request's own random stream (None when greedy); torch's global RNG is never touched."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


class OutputTracker:
    """Commits a request's tokens step by step and says when it is done."""

    def __init__(self, target: Target, params: SamplingParams, block_size: int, prompt_tokens: int) -> None:
        self.params = params
        if params.ignore_eos:
            self.stop_ids = set(params.stop_token_ids or ())
        else:
            self.stop_ids = set(target.eos_token_ids if params.stop_token_ids is None else params.stop_token_ids)
        self.text = TextStream(target.tokenizer, params.stop_strings) if target.tokenizer is not None else None
        self.stats = GenerationStats(block_size=block_size, prompt_tokens=prompt_tokens)
        self.generated: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.started_s = time.perf_counter()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def commit(self, tokens: list[int], logprobs: list[TokenLogprob] | None = None) -> StreamChunk:
        """Append one step's tokens (and their log-probabilities, when asked for), stopping at a stop token or
        string or the length limit. The returned chunk holds the tokens actually committed and the text they
        release; the last one carries the result."""
        committed: list[int] = []
        for token in tokens:
            committed.append(token)
            self.generated.append(token)
            # a stop token's text stays (vLLM's too: only a special token's, such as EOS, decodes to nothing)
            hit_stop_string = self.text.add(token) if self.text is not None else False
            if token in self.stop_ids or hit_stop_string:
                self.finish_reason = "stop"
                break
            if len(self.generated) >= self.params.max_new_tokens:
                self.finish_reason = "length"
                break
        kept = logprobs[:len(committed)] if logprobs is not None and self.logprobs is not None else None
        if kept is not None:
            self.logprobs += kept
        now = time.perf_counter()
        if not self.stats.ttft_s:
            self.stats.ttft_s = now - self.started_s
        if not self.done:
            return StreamChunk(committed, self.text.release() if self.text is not None else "", logprobs=kept)
        self.stats.generated_tokens = len(self.generated)
        self.stats.total_s = now - self.started_s
        text = self.text.text if self.text is not None else ""
        delta = self.text.release(final=True) if self.text is not None else ""
        result = GenerationResult(self.generated, text, self.finish_reason, self.stats, self.logprobs)
        return StreamChunk(committed, delta, result, logprobs=kept)
