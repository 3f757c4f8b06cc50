"""The speculative loop (SPEC section 5): draft a block, verify it in one target pass, keep the longest
prefix the target agrees with plus one bonus token.

With no draft, or block size 1, the same loop is plain autoregressive decoding through the same forward
code -- the baseline every speedup is measured against, and the reference for losslessness.

Tensors carry a batch dimension and per-row positions all the way down (the models and caches are
ragged-ready); this loop drives one sequence.
"""

from __future__ import annotations

from typing import Iterator

import torch

from blockspec.draft import DraftModel
from blockspec.engine.sampling import SamplingParams, accept_greedy, accept_sampled, sample, warped_probs
from blockspec.engine.sequence import (GenerationResult, OutputTracker, StreamChunk, check_block_size, check_pair,
                                       check_request, new_generator)
from blockspec.engine.stats import GenerationStats
from blockspec.target import Target

__all__ = ["GenerationResult", "SpeculativeDecoder", "StreamChunk"]


class SpeculativeDecoder:
    """Decodes with `target`, drafting with `draft` (None: autoregressive)."""

    def __init__(self, target: Target, draft: DraftModel | None = None, block_size: int | None = None) -> None:
        check_pair(target, draft)
        self.target = target
        self.draft = draft
        self.trained_block = draft.block_size if draft is not None else 1
        self.block_size = check_block_size(block_size, self.trained_block)
        self.tap_ids = tuple(draft.config.target_layer_ids) if draft is not None else ()

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
        params = check_request(self.target, prompt_ids, params)
        block = self.block_size if block_size is None else check_block_size(block_size, self.trained_block)
        output = OutputTracker(self.target, params, block, len(prompt_ids))
        for step_tokens in self._steps(prompt_ids, params, block, output.stats):
            chunk = output.commit(step_tokens)
            yield chunk
            if output.done:
                return

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
        generator = new_generator(params, device)
        target_cache = target.new_cache(1, max_len, block)
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
            target_cache.commit(torch.tensor([accepted + 1], device=device))  # recurrent state: the kept prefix
            if use_draft:
                features = verify_features[:, :accepted + 1]
                ctx_positions = block_positions[:, :accepted + 1]
            start += accepted + 1
            yield new_tokens
