"""Batched autoregressive generation over blockspec's own TargetModel (for regenerating training data).

Why not Hugging Face `generate`: `load_target` keeps only blockspec's forward (the HF module is dropped after
its weights are shared), and training data must be what THIS forward produces -- the same numerics the
served target has, taps and all. The static cache makes batching simple: slot index == position, per row.
Prompts are right-padded and every row keeps its own positions, so a row's pad tokens sit on slots its
generated tokens overwrite before any query of that row can see them (queries see slots <= their position);
a hybrid target's recurrent state cannot skip pads, so there each prompt is prefilled on its own.
Rows finish independently (their later tokens are computed but ignored); a batch stops when every row has
hit a stop id or the token limit. Prompts are grouped by length so a batch carries little padding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from blockspec.target import TargetModel


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    temperature: float = 0.0
    max_new_tokens: int = 256


def _choose(logits: torch.Tensor, temperature: torch.Tensor, top_k: int,
            generator: torch.Generator | None) -> torch.Tensor:
    """Per-row choice: argmax where temperature == 0, else a sample at that temperature (optional top-k)."""
    greedy = logits.argmax(-1)
    if not bool((temperature > 0).any()):
        return greedy
    scaled = logits.float() / temperature.clamp_min(1e-6)[:, None]
    if top_k and top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    sampled = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return torch.where(temperature > 0, sampled, greedy)


@torch.inference_mode()
def generate_batch(model: TargetModel, prompts: list[list[int]], temperatures: list[float], max_new_tokens: int,
                   stop_ids: set[int] | tuple[int, ...], generator: torch.Generator | None = None,
                   top_k: int = 0, pad_id: int = 0, check_every: int = 8) -> list[list[int]]:
    """Continue each prompt; returns the generated ids per row, cut after the first stop id (kept)."""
    device = model.embed_tokens.weight.device
    b = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max())
    ids = torch.full((b, width), pad_id, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    cache = model.new_cache(b, width + max_new_tokens + 1)
    positions = torch.arange(width, device=device)[None].expand(b, width)
    if model.config.gdn_layers:  # a recurrent state would run through the pads: each row's prompt alone
        last = torch.cat([model(ids[r:r + 1, :n], positions[r:r + 1, :n], cache.rows(r, r + 1), kv_len=n)[0][:, -1]
                          for r, n in enumerate(len(p) for p in prompts)])
    else:
        hidden, _ = model(ids, positions, cache, kv_len=width)
        last = hidden[torch.arange(b, device=device), lengths - 1]
    logits = model.logits(last)
    temps = torch.tensor(temperatures, dtype=torch.float32, device=device)
    stops = torch.tensor(sorted(stop_ids) or [-1], device=device)
    out = torch.zeros(b, max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    pos = lengths.clone()
    steps = 0
    for step in range(max_new_tokens):
        token = _choose(logits, temps, top_k, generator)
        out[:, step] = token
        steps = step + 1
        done |= torch.isin(token, stops)
        if step + 1 == max_new_tokens or ((step + 1) % check_every == 0 and bool(done.all())):
            break
        hidden, _ = model(token[:, None], pos[:, None], cache, kv_len=width + step + 1)
        logits = model.logits(hidden[:, -1])
        pos += 1
    host = out[:, :steps].tolist()
    stop_set = set(stop_ids)
    results = []
    for row in host:
        cut = next((i + 1 for i, t in enumerate(row) if t in stop_set), len(row))
        results.append(row[:cut])
    return results


def generate_all(model: TargetModel, requests: list[GenerationRequest], stop_ids: tuple[int, ...],
                 batch_size: int, seed: int = 0, top_k: int = 0, pad_id: int = 0,
                 progress: bool = False) -> tuple[list[list[int]], dict]:
    """Generate every request (batched by prompt length, results in request order) and report throughput."""
    device = model.embed_tokens.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    order = sorted(range(len(requests)), key=lambda i: (len(requests[i].prompt_ids), i))
    results: list[list[int] | None] = [None] * len(requests)
    started = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(requests), desc="generate", unit="seq", mininterval=5)
    # requests with different token limits go in different batches
    for limit in sorted({r.max_new_tokens for r in requests}):
        group = [i for i in order if requests[i].max_new_tokens == limit]
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            outs = generate_batch(model, [requests[i].prompt_ids for i in chunk],
                                  [requests[i].temperature for i in chunk], limit, stop_ids, generator,
                                  top_k=top_k, pad_id=pad_id)
            for i, o in zip(chunk, outs):
                results[i] = o
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - started
    tokens = sum(len(r) for r in results)
    return results, {"sequences": len(requests), "generated_tokens": tokens, "seconds": round(seconds, 2),
                     "tokens_per_s": round(tokens / seconds, 1) if seconds else None}
