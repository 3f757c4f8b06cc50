"""The speculative loop (SPEC section 5): draft a block, verify it in one target pass, keep the longest
prefix the target agrees with plus one bonus token.

With no draft, or block size 1, the same loop is plain autoregressive decoding through the same forward
code -- the baseline every speedup is measured against, and the reference for losslessness.

Tensors carry a batch dimension and per-row positions all the way down (the models and caches are
ragged-ready); this loop drives one sequence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from blockspec.draft import DraftModel, check_draft_fits_target
from blockspec.engine.sampling import SamplingParams, accept_greedy, accept_sampled, sample, warped_probs
from blockspec.engine.stats import GenerationStats
from blockspec.engine.text import TextStream
from blockspec.errors import BlockspecError
from blockspec.target import Target


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens (a stop token that ended generation included)
    text: str
    finish_reason: str  # "stop" (stop token or string) | "length"
    stats: GenerationStats


@dataclass
class StreamChunk:
    token_ids: list[int]  # tokens committed by this step
    text: str  # text released by this step
    result: GenerationResult | None = field(default=None)  # set on the last chunk only


class SpeculativeDecoder:
    """Decodes with `target`, drafting with `draft` (None: autoregressive)."""

    def __init__(self, target: Target, draft: DraftModel | None = None, block_size: int | None = None) -> None:
        self.target = target
        self.draft = draft
        if draft is not None:
            check_draft_fits_target(draft, target.model.config)
            if draft.norm.weight.device != target.device:
                raise BlockspecError(f"draft is on {draft.norm.weight.device} but the target on {target.device}")
        self.block_size = self._check_block_size(block_size)
        self.tap_ids = tuple(draft.config.target_layer_ids) if draft is not None else ()

    def _check_block_size(self, block_size: int | None) -> int:
        trained = self.draft.block_size if self.draft is not None else 1
        block_size = trained if block_size is None else block_size
        if not isinstance(block_size, int) or block_size < 1:
            raise BlockspecError(f"block size must be a positive integer, got {block_size!r}")
        if block_size > trained:
            raise BlockspecError(f"block size {block_size} exceeds the draft's trained block_size {trained}")
        return block_size

    # ---- public API -------------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[int], params: SamplingParams | None = None,
                 block_size: int | None = None) -> GenerationResult:
        result = None
        for chunk in self.stream(prompt_ids, params, block_size):
            result = chunk.result
        assert result is not None
        return result

    @torch.inference_mode()
    def stream(self, prompt_ids: list[int], params: SamplingParams | None = None,
               block_size: int | None = None) -> Iterator[StreamChunk]:
        """Yield committed tokens and released text step by step; the last chunk carries the result."""
        params = (params or SamplingParams()).validate()
        block = self.block_size if block_size is None else self._check_block_size(block_size)
        if not prompt_ids:
            raise BlockspecError("the prompt is empty")
        vocab = self.target.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise BlockspecError(f"prompt holds a token id outside the target vocabulary (0..{vocab - 1})")
        stop_ids = set(self.target.eos_token_ids if params.stop_token_ids is None else params.stop_token_ids)
        if params.ignore_eos:
            stop_ids = set(params.stop_token_ids or ())
        text = TextStream(self.target.tokenizer, params.stop_strings) if self.target.tokenizer else None
        if params.stop_strings and text is None:
            raise BlockspecError("stop strings need a target with a tokenizer")
        stats = GenerationStats(block_size=block, prompt_tokens=len(prompt_ids))
        generated: list[int] = []
        finish = "length"
        t0 = time.perf_counter()
        for step_tokens in self._steps(prompt_ids, params, block, stats):
            committed: list[int] = []
            for token in step_tokens:
                committed.append(token)
                generated.append(token)
                hit_stop_string = text.add(token) if text is not None else False
                if token in stop_ids or hit_stop_string:
                    finish = "stop"
                    break
                if len(generated) == params.max_new_tokens:
                    break
            if not stats.ttft_s:
                stats.ttft_s = time.perf_counter() - t0
            done = finish == "stop" or len(generated) >= params.max_new_tokens
            if done:
                stats.generated_tokens = len(generated)
                stats.total_s = time.perf_counter() - t0
                final_text = (text.text if text is not None else "")
                delta = text.release(final=True) if text is not None else ""
                result = GenerationResult(generated, final_text, finish, stats)
                yield StreamChunk(committed, delta, result)
                return
            yield StreamChunk(committed, text.release() if text is not None else "")

    def propose(self, first: torch.Tensor, block_positions: torch.Tensor, features: torch.Tensor,
                ctx_positions: torch.Tensor, draft_cache: object, params: SamplingParams,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One draft pass: the B-1 proposed tokens [B-1] and, when sampling, their distributions [B-1, V].

        `features` at `ctx_positions` are the target taps the draft has not seen yet; the draft's context is
        every slot before the block start. Subclasses may override this (oracle drafts in tests/benchmarks).
        """
        target = self.target.model
        embeds = self.draft.embed_block(first, target.embed_tokens, block_positions.shape[1])
        draft_hidden = self.draft(embeds, block_positions, features, ctx_positions, draft_cache)
        draft_logits = target.logits(draft_hidden[0, 1:])
        if params.greedy:
            return draft_logits.argmax(-1), None
        draft_probs = warped_probs(draft_logits, params)
        return sample(draft_probs, generator), draft_probs

    # ---- the loop ---------------------------------------------------------------------------------------
    def _steps(self, prompt_ids: list[int], params: SamplingParams, block: int,
               stats: GenerationStats) -> Iterator[list[int]]:
        """Infinite generator of committed token lists (the caller stops it); records acceptance lengths."""
        target, draft, device = self.target.model, self.draft, self.target.device
        use_draft = draft is not None and block > 1
        taps = self.tap_ids if use_draft else ()
        n_prompt = len(prompt_ids)
        max_len = n_prompt + params.max_new_tokens + 2 * block
        limit = target.config.max_position_embeddings
        if n_prompt + params.max_new_tokens > limit:
            raise BlockspecError(f"prompt ({n_prompt} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                                 f"the target's context of {limit} tokens")
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=device)
            if params.seed is None:
                generator.seed()  # fresh entropy for this generator only; torch's global RNG is left alone
            else:
                generator.manual_seed(params.seed)
        target_cache = target.new_cache(1, max_len)
        draft_cache = draft.new_cache(1, max_len) if use_draft else None

        # 1. prefill
        ids = torch.tensor([prompt_ids], device=device)
        positions = torch.arange(n_prompt, device=device)[None]
        hidden, features = target(ids, positions, target_cache, taps)
        last_logits = target.logits(hidden[0, -1:])
        token = int(last_logits.argmax(-1)) if params.greedy else int(sample(warped_probs(last_logits, params),
                                                                              generator))
        yield [token]
        start = n_prompt  # position of the newest committed token (not yet in the target cache)
        ctx_positions = positions
        offsets = torch.arange(block, device=device)
        while True:
            block_positions = (start + offsets)[None]
            # 2. draft
            first = torch.tensor([token], device=device)
            draft_probs = None
            if use_draft:
                draft_tokens, draft_probs = self.propose(first, block_positions, features, ctx_positions,
                                                         draft_cache, params, generator)
                block_ids = torch.cat([first, draft_tokens])[None]
            else:
                draft_tokens = first[:0]
                block_ids = first[None]
            # 3. verify
            hidden, verify_features = target(block_ids, block_positions, target_cache, taps, kv_len=start + block)
            verify_logits = target.logits(hidden[0])
            # 4. accept
            if params.greedy:
                host = accept_greedy(draft_tokens, verify_logits).tolist()  # the one device->host read
                accepted, token = host[0], host[1 + host[0]]
                new_tokens = host[1:1 + accepted] + [token]
            else:
                target_probs = warped_probs(verify_logits, params)
                accepted, token = accept_sampled(draft_tokens, draft_probs, target_probs, generator)
                new_tokens = draft_tokens[:accepted].tolist() + [token]
            stats.acceptance_lengths.append(accepted + 1)
            if use_draft:
                features = verify_features[:, :accepted + 1]
                ctx_positions = block_positions[:, :accepted + 1]
            start += accepted + 1
            yield new_tokens
