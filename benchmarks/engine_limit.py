"""How close does blockspec's fast CUDA path get to the memory-bandwidth floor? (issue 3)

One run measures, side by side on one GPU:
  - the device copy bandwidth (the floor's denominator);
  - a Qwen3-4B-shaped target with random bf16 weights, a 5-layer DFlash and a 7-layer DFlare draft
    (SPEC shapes), at each context: blockspec AR ms/token and speculative ms/step, their floors
    (bytes that must be read per step / copy bandwidth), the peers (HF transformers eager decoding, and
    a reference-style eager speculative loop with a dynamic cache and host syncs), tokens/s and speedup
    at forced acceptance lengths (oracle acceptance, benchmarks/oracle.py: the real draft pass every step, its
    tokens replaced so that a chosen number is accepted; the target then chooses token 0 everywhere, which
    changes no step's work);
  - a check that fast-path greedy tokens equal the eager path's for 256 tokens;
  - a kernel-time profile of one speculative step, and each part of the step (draft pass, verify pass,
    lm_head, the verify's GEMMs alone) timed as a CUDA graph of its own beside its floor (where the time goes);
  - optionally SmolLM2-135M with real weights (--smollm2 PATH.gguf).

--ab runs only this instead: the graphed AR token and DFlash / DFlare steps under each setting of AB_SETTINGS
(programmatic dependent launch off / on, the source's skinny-GEMM table / one just swept, the weight
prefetch before the PDL wait, the one-deep step pipeline, the RoPE-table kernel), in turn, in one run, each
with graphs captured under it; the floors; and checks that every setting's graphed greedy tokens equal the
eager path's under the same table.

--qwen35 runs only issue 25's row instead: the Qwen3.5-4B-shaped hybrid target (Gated DeltaNet + gated attention,
random bf16 weights) with the 6-layer sliding-window draft shape of Qwen3.5-4B-DFlash at each context: AR and the
block-16 and block-8 steps against floors that count the recurrent and conv state, HF transformers eager on the same
shape (with flash-linear-attention where it imports), oracle tokens/s at the model card's acceptance lengths, and
those beside SGLang's B200 figures scaled by the bandwidth ratio, each goal met or missed.

    python -m benchmarks.engine_limit --out DIR          # on a CUDA machine
    python -m benchmarks.engine_limit --tiny --device cpu  # logic check on small shapes
    python -m benchmarks.engine_limit --ab --out DIR       # launch settings side by side (Hopper)
    python -m benchmarks.engine_limit --timeline --out DIR  # profile of graph-replayed steps
    python -m benchmarks.engine_limit --sweep-attention --out DIR  # 16-query attention settings in graphed steps
    python -m benchmarks.engine_limit --qwen35 --contexts 512 4096 16384 --out DIR  # issue 25's hybrid row
    python -m benchmarks.engine_limit --qwen35 --timeline --out DIR  # where the hybrid steps' time goes
    python -m benchmarks.engine_limit --report FILE.json   # markdown tables for docs/performance.md
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Iterator

import torch

from benchmarks import roofline
from benchmarks.harness import (copy_bandwidth, gdn_kernels, graph_ms, make_draft, parser_with_common_flags,
                                qwen3_4b_config, qwen35_4b_config, qwen35_4b_hf_config, qwen35_draft, run_and_report,
                                run_header, step_ms, sync, target_pass, weight_gemms)
from benchmarks.oracle import OracleProposer, constant_choice, tau_schedule
from benchmarks.roofline import kv_bytes_per_token, param_bytes
from blockspec.cache import DEFAULT_ROLLBACK, ROLLBACKS
from blockspec.draft import DraftModel
from blockspec.engine import DraftProposer, SamplingParams, SpeculativeDecoder
from blockspec.kernels import KernelSettings, current_settings, device_tables, use_settings
from blockspec.target import Target, TargetConfig, TargetModel

TAUS = (3.0, 5.0, 6.5, 8.0)
CHECK_TOKENS_TINY = 32  # the graphed-equals-eager checks on tiny shapes (a logic check): a few blocks' worth


def floors(target: TargetModel, draft: DraftModel | None, ctx: int, block: int) -> float:
    """Bytes one step must move (benchmarks/roofline.py): every weight once (the lm_head twice when drafting:
    draft logits, then verify logits), the visible K/V of target (and draft), the new K/V written (and a hybrid
    target's recurrent state)."""
    return roofline.step(target, draft, [ctx], block).bytes


def oracle_decoder(target: Target, draft: DraftModel | None, max_len: int, rollback: str = DEFAULT_ROLLBACK
                   ) -> SpeculativeDecoder:
    """A decoder on a fixed cache row whose draft (if any) is wrapped in an OracleProposer, passing the draft's
    tokens through (schedule -1) until `forced` sets one; for a target made `constant_choice`."""
    if draft is None:
        return SpeculativeDecoder(target, None, max_len=max_len)
    oracle = OracleProposer(DraftProposer(draft, target.model), torch.zeros(max_len, dtype=torch.long), [-1, -1],
                            target.model.config.vocab_size, target.device)
    return SpeculativeDecoder(target, oracle, max_len=max_len, rollback=rollback)


@contextlib.contextmanager
def forced(decoder: SpeculativeDecoder, schedule: list[int]) -> Iterator[None]:
    """Accepted drafts per step cycling through `schedule` (at every block) while inside; the draft's own tokens
    after. Plain decoding needs nothing forced."""
    oracle = decoder.draft
    if oracle is None:
        yield
        return
    oracle.set_schedule(schedule)
    try:
        yield
    finally:
        oracle.set_schedule([-1, -1])


@contextlib.contextmanager
def eager(decoder: SpeculativeDecoder) -> Iterator[None]:
    """The decoder's engine steps without CUDA graphs (the same kernels, launched one by one) while inside."""
    engine = decoder.engine
    saved = engine.use_graphs, engine.pad_rows, engine.pipeline
    engine.use_graphs = engine.pad_rows = engine.pipeline = False
    try:
        yield
    finally:
        engine.use_graphs, engine.pad_rows, engine.pipeline = saved


def timed_steps(decoder: SpeculativeDecoder, prompt: list[int], block: int, steps: int, device: str) -> float:
    """Median wall time of one graph-replayed step (replay + the host read), in seconds. Acceptance is
    forced to 0 so every step commits one token; the work per step does not depend on acceptance."""
    params = SamplingParams(max_new_tokens=steps + 4, ignore_eos=True)
    times: list[float] = []
    last = time.perf_counter()
    with forced(decoder, [0, 0]):
        for i, _ in enumerate(decoder.stream(prompt, params, block_size=block)):
            now = time.perf_counter()
            if i >= 3:  # prefill, the eager first step and graph capture excluded
                times.append(now - last)
            last = now
    return statistics.median(times)


def oracle_rate(decoder: SpeculativeDecoder, prompt: list[int], tau: float, new_tokens: int, block: int = 16) -> dict:
    """Tokens/s after the prefill with acceptance forced to average `tau` (oracle.tau_schedule), at `block`
    (whose graphs `timed_steps` captured)."""
    with forced(decoder, tau_schedule(tau)):
        result = decoder.generate(prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True), block)
    s = result.stats
    return {"tau_forced": tau, "tau_measured": s.mean_acceptance_length,
            "tokens_per_s": (s.generated_tokens - 1) / (s.total_s - s.ttft_s)}


@functools.lru_cache(maxsize=1)
def hf_model(cfg: TargetConfig, device: str, tiny: bool) -> torch.nn.Module:
    """The same shape as a transformers Qwen3ForCausalLM (random weights: timing does not depend on them)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hcfg = Qwen3Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                       num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, tie_word_embeddings=True,
                       max_position_embeddings=cfg.max_position_embeddings)
    dtype = torch.float32 if tiny else torch.bfloat16
    with torch.device(device):
        return Qwen3ForCausalLM(hcfg).to(dtype).eval()


@functools.lru_cache(maxsize=1)
def hf_qwen35(device: str, tiny: bool) -> torch.nn.Module:
    """A transformers Qwen3_5ForCausalLM of the Qwen3.5-4B shape (random weights)."""
    from transformers import Qwen3_5ForCausalLM

    with torch.device(device):
        return Qwen3_5ForCausalLM(qwen35_4b_hf_config(tiny)).to(torch.float32 if tiny else torch.bfloat16).eval()


def hf_peer(model: torch.nn.Module, vocab_size: int, device: str, ctx: int, tokens: int) -> float:
    """HF transformers eager decoding ms/token (dynamic cache, one token per forward)."""
    ids = torch.randint(0, vocab_size, (1, ctx), device=device)
    times = []
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for i in range(tokens + 3):
            sync(device)
            t = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            int(token)  # the host sync a decoding loop makes every token
            if i >= 3:
                times.append(time.perf_counter() - t)
    return statistics.median(times)


def reference_style_step(cfg: TargetConfig, draft: DraftModel, device: str, ctx: int, steps: int,
                         tiny: bool) -> float:
    """The public implementations' loop shape: HF target with a dynamic cache and all hidden states
    materialised each verify, an eager draft, host syncs every step, cache crop after acceptance."""
    from transformers import DynamicCache

    model = hf_model(cfg, device, tiny)
    taps = [i + 1 for i in draft.config.target_layer_ids]
    block = draft.block_size
    draft_cache = draft.new_cache(1, ctx + (steps + 4) * block + 16)
    ids = torch.randint(0, cfg.vocab_size, (1, ctx), device=device)
    times = []
    with torch.inference_mode():
        cache = DynamicCache()
        out = model(ids, past_key_values=cache, use_cache=True, output_hidden_states=True)
        feat = torch.cat([out.hidden_states[i] for i in taps], -1)
        ctx_pos = torch.arange(ctx, device=device)[None]
        token, start = int(out.logits[0, -1].argmax()), ctx
        for i in range(steps + 3):
            sync(device)
            t = time.perf_counter()
            block_pos = (start + torch.arange(block, device=device))[None]
            first = torch.tensor([token], device=device)
            emb = draft.embed_block(first, model.model.embed_tokens)
            hidden = draft(emb, block_pos, feat, ctx_pos, draft_cache)
            proposal = model.lm_head(hidden[0, 1:]).argmax(-1)
            block_ids = torch.cat([first, proposal])[None]
            out = model(block_ids, past_key_values=cache, use_cache=True, output_hidden_states=True,
                        position_ids=block_pos)
            post = out.logits[0].argmax(-1)
            accepted = int((proposal == post[:-1]).long().cumprod(0).sum())  # host sync
            token = int(post[accepted])
            feat = torch.cat([out.hidden_states[i] for i in taps], -1)[:, :accepted + 1]
            ctx_pos = block_pos[:, :accepted + 1]
            start += accepted + 1
            # transformers 5 refuses crop(n > 0) (SPEC section 8): remove the rejected tail by count
            rejected = cache.get_seq_length() - start
            if rejected > 0:
                cache.crop(-rejected)
            sync(device)
            if i >= 3:
                times.append(time.perf_counter() - t)
    return statistics.median(times)


def profile_step(decoder: SpeculativeDecoder, prompt: list[int], device: str) -> list[dict]:
    """Kernel time of the eager step function (same kernels as the graph), grouped by kernel name."""
    from torch.profiler import ProfilerActivity, profile

    with eager(decoder):
        decoder.generate(prompt, SamplingParams(max_new_tokens=40, ignore_eos=True))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            result = decoder.generate(prompt, SamplingParams(max_new_tokens=17, ignore_eos=True))
    steps = max(1, result.stats.steps - 1)
    rows = []
    for evt in prof.key_averages():
        cuda_us = getattr(evt, "self_device_time_total", 0) or getattr(evt, "self_cuda_time_total", 0)
        if cuda_us > 0:
            rows.append({"kernel": evt.key[:90], "us_per_step": cuda_us / steps, "calls_per_step": evt.count / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows[:25]


@contextlib.contextmanager
def live_row(decoder: SpeculativeDecoder, prompt: list[int], device: str) -> Iterator[int]:
    """Row 0 of the decoder's engine holding a live sequence about `len(prompt)` long (prefill and two steps, each
    committing one token), for capturing parts of its step; yields the block size."""
    block = 16 if decoder.draft is not None else 1
    chunks = decoder.stream(prompt, SamplingParams(max_new_tokens=16, ignore_eos=True), block_size=block)
    with forced(decoder, [0, 0]):
        try:
            for _ in range(3):
                next(chunks)
            sync(device)
            yield block
        finally:
            chunks.close()


def phase_times(decoder: SpeculativeDecoder, prompt: list[int], bandwidth: float, device: str) -> dict:
    """Where a step's time goes: each part of the graphed step captured as a CUDA graph of its own and timed
    alone, beside its floor (its bytes / the run's copy bandwidth). Parts: the draft pass without and with its
    greedy tokens (lm_head and argmax); the target's pass (the verify block's 16 tokens with taps, or AR's one
    token) without and with them; the lm_head alone, followed by torch's argmax of its logits, and with the
    argmax fused (what the step runs); the target's weight GEMMs alone on the pass's rows (the engine's GEMM
    kernels, nothing else); and the whole step (`step_ms`)."""
    engine = decoder.engine
    draft = engine.proposer.inner.draft if engine.proposer is not None else None
    model = decoder.target.model
    cfg, item = model.config, model.embed_tokens.weight.element_size()
    with live_row(decoder, prompt, device) as block:
        ctx = int(engine.start[0])
        block_pos = engine.start[:1, None] + engine.offsets[None, :block]
        kv_len = engine.max_len
        dtype = model.embed_tokens.weight.dtype
        target_hidden = target_pass(engine, 1, block)
        hidden = torch.randn(1, block, cfg.hidden_size, device=block_pos.device, dtype=dtype)
        target_gemms, gemm_bytes, _ = weight_gemms(model, block)
        lm_head = model.lm_head.weight.numel() * item
        kv = kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, item) * (ctx + block)
        layer_bytes = sum(param_bytes(layer) for layer in model.layers)
        parts: dict = {}
        if draft is not None:
            dc = draft.config
            draft_bytes = param_bytes(draft) + kv_bytes_per_token(dc.num_layers, dc.num_key_value_heads, dc.head_dim,
                                                                  item) * (ctx + block)
            pending = engine.proposer.inner
            feat, feat_pos, cache = pending.feat[:1], pending.feat_pos[:1], pending.cache.rows(0, 1)

            def draft_hidden() -> torch.Tensor:
                embeds = draft.embed_block(engine.last_token[:1], model.embed_tokens, block)
                return draft(embeds, block_pos, feat, feat_pos, cache, kv_len=kv_len)

            parts["draft pass, lm_head excluded"] = (draft_hidden, draft_bytes)
            parts[f"draft pass with its greedy tokens ({block - 1} rows)"] = (
                lambda: model.greedy_tokens(draft_hidden()[:, 1:]), draft_bytes + lm_head)
        parts[f"target pass ({cfg.num_layers} layers), lm_head excluded"] = (target_hidden, layer_bytes + kv)
        parts["target pass with its greedy tokens"] = (lambda: model.greedy_tokens(target_hidden()),
                                                       layer_bytes + kv + lm_head)
        parts["lm_head alone"] = (lambda: model.logits(hidden), lm_head)
        parts["lm_head, then argmax of its logits"] = (lambda: model.logits(hidden).argmax(-1), lm_head)
        parts["lm_head with the argmax fused (the step's)"] = (lambda: model.greedy_tokens(hidden), lm_head)
        parts[f"the target's {4 * cfg.num_layers} weight GEMMs alone"] = (target_gemms, gemm_bytes)
        out: dict = {"context": ctx, "parts": {}}

        def record(name: str, ms: float, floor_ms: float) -> None:
            out["parts"][name] = {"ms": ms, "floor_ms": floor_ms, "x_floor": ms / floor_ms}

        with torch.inference_mode():  # as the engine runs its steps
            for name, (fn, nbytes) in parts.items():
                record(name, graph_ms(fn, device), nbytes / bandwidth * 1e3)
        record("whole step (graph, no host read)", step_ms(engine, 1, block, device),
               floors(model, draft, ctx, block) / bandwidth * 1e3)
        return out


# kernel-name fragments of the engine's kernels, for graph_timeline's groups (anything else: "other")
KERNEL_GROUPS = (("skinny GEMMs", "_skinny_linear"), ("cuBLAS GEMMs", "nvjet"),
                 ("decode attention", "_attention_splits"), ("attention combine", "_combine_splits"),
                 ("add+RMSNorm", "_add_rms_norm"), ("RMSNorm", "_rms_norm"), ("q/k norm+RoPE+store", "_qkv_rope_store"),
                 ("silu*mul", "_silu_mul"), ("split-K sums", "_sum_splits"), ("GDN conv+gates", "_gdn_inputs"),
                 ("GDN recurrence+norm", "_gdn_steps"), ("GDN replay", "_gdn_replay"))


def graph_timeline(decoder: SpeculativeDecoder, prompt: list[int], block: int, steps: int = 10) -> dict:
    """Where a graph-replayed step's time goes: the device activity of `steps` consecutive steps (after
    warm-up; acceptance forced to 0), per step: the span from the first kernel to the last, the time at least
    one kernel ran (overlaps from PDL counted once), and per kernel group the summed durations and launches.
    On the CPU (a logic check) the CPU ops stand in for kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = decoder.target.device.type == "cuda"
    activity, device_type = (ProfilerActivity.CUDA, DeviceType.CUDA) if cuda else (ProfilerActivity.CPU, DeviceType.CPU)
    chunks = decoder.stream(prompt, SamplingParams(max_new_tokens=steps + 8, ignore_eos=True), block_size=block)
    with forced(decoder, [0, 0]):
        try:
            for _ in range(4):  # prefill, first steps, capture
                next(chunks)
            sync(decoder.target.device.type)
            with profile(activities=[activity]) as prof:
                for _ in range(steps):
                    next(chunks)
                sync(decoder.target.device.type)
        finally:
            chunks.close()
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == device_type and e.time_range.end > e.time_range.start)
    busy, reach, gaps = 0.0, spans[0][0], []
    for start, end, _ in spans:  # union of the intervals, and the idle gaps between them
        if start > reach:
            gaps.append(start - reach)
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    gaps.sort(reverse=True)
    groups: dict = {}
    for start, end, name in spans:
        group = next((g for g, fragment in KERNEL_GROUPS if fragment in name), "other")
        entry = groups.setdefault(group, {"us": 0.0, "launches": 0})
        entry["us"] += (end - start) / steps
        entry["launches"] += 1 / steps
    return {"steps": steps, "span_us": (spans[-1][1] - spans[0][0]) / steps, "busy_us": busy / steps,
            # the steps - 1 longest gaps are the host's turn between two replays (read, bookkeeping, launch)
            "between_steps_us": sum(gaps[:steps - 1]) / steps, "within_steps_gaps_us": sum(gaps[steps - 1:]) / steps,
            "within_steps_gap_count": len(gaps[steps - 1:]) / steps,
            "kernel_sum_us": sum((end - start) for start, end, _ in spans) / steps,
            "groups": dict(sorted(groups.items(), key=lambda kv: -kv[1]["us"]))}


# decode-attention launch settings for blocks of 16 queries (a launch table's attention["wide"]) that
# --sweep-attention times inside graphed steps: key splits per (row, KV head), keys per tile, warps
ATTENTION_SWEEP = [{"splits": s, "block_n": n, "num_warps": w}
                   for s in (4, 8, 16, 32) for n in (32, 64) for w in (4, 8)]


def attention_sweep(decoder: SpeculativeDecoder, contexts: list[int], device: str) -> list[dict]:
    """Each ATTENTION_SWEEP setting for the speculative step's 16-query attention (the draft's and the verify's),
    timed where it runs: the whole graphed step and its target pass, each captured under the setting, at each
    context. (Timed alone, a launch of this kernel costs more than its work, so only graphs tell settings
    apart.)"""
    # (on the CPU, a logic check of the loop, the attention has no launch settings: the table goes unread)
    source = device_tables(torch.device(device)).attention
    cfg = decoder.target.model.config
    rows = []
    for ctx in contexts:
        prompt = torch.randint(0, cfg.vocab_size, (ctx,)).tolist()
        with live_row(decoder, prompt, device) as block:
            for setting in ATTENTION_SWEEP:
                with use_settings(attention_table={**source, "wide": setting}), torch.inference_mode():
                    target_ms = graph_ms(target_pass(decoder.engine, 1, block), device)
                    ms = step_ms(decoder.engine, 1, block, device)
                rows.append({"context": ctx, **setting, "source": setting == source["wide"], "step_ms": ms,
                             "target_pass_ms": target_ms})
    for ctx in contexts:
        best = min((r for r in rows if r["context"] == ctx), key=lambda r: r["step_ms"])
        print("attention best", best, flush=True)
    return rows


# --ab: settings compared side by side. pdl: programmatic dependent launch (`KernelSettings.pdl`); table: the
# skinny-GEMM table, the device's (blockspec/kernels/tables) or the one --skinny-table loaded (swept in the same
# call, so under the same PDL default), settings needing it are left out without one; prefetch: weight tiles each
# skinny-GEMM program asks L2 for before its PDL wait (`KernelSettings.prefetch_tiles`); pipeline: each step
# launched before the previous one's tokens are read (`BatchDecoder.pipeline`); rope: RoPE tables in one kernel
# (`KernelSettings.fused_rope`) instead of the torch ops; exact: batch-invariant kernels (`--exact`,
# `KernelSettings.batch_invariant`), whose cost decides whether they become the default. "default" is the source's
# defaults.
_OFF = {"pdl": False, "table": "source", "prefetch": 0, "pipeline": False, "rope": False, "exact": False}
_DEFAULT = {**_OFF, "pdl": True, "prefetch": 2, "pipeline": True, "rope": True}
AB_SETTINGS = {
    "base": _OFF,
    "pdl": {**_OFF, "pdl": True},
    "pdl+swept": {**_OFF, "pdl": True, "table": "swept"},
    "pdl+prefetch1": {**_OFF, "pdl": True, "prefetch": 1},
    "pdl+prefetch2": {**_OFF, "pdl": True, "prefetch": 2},
    "pdl+prefetch4": {**_OFF, "pdl": True, "prefetch": 4},
    "pipeline": {**_OFF, "pipeline": True},
    "default": _DEFAULT,
    "default+swept": {**_DEFAULT, "table": "swept"},
    "default-rope": {**_DEFAULT, "rope": False},
    "default+exact": {**_DEFAULT, "exact": True},
}


def skinny_tables(args: argparse.Namespace) -> dict:
    """The skinny-GEMM tables a setting may pick: "source" (the device's), and "swept" when --skinny-table loaded
    one (the harness runs the benchmark under it)."""
    tables = {"source": device_tables(torch.device(args.device)).skinny}
    if args.skinny_table:
        tables["swept"] = current_settings().skinny_table
    return tables


def kernel_settings(setting: dict, tables: dict) -> KernelSettings:
    """The kernel settings of an AB_SETTINGS entry (its pipeline is the decoders' own)."""
    return KernelSettings(pdl=setting["pdl"], prefetch_tiles=setting["prefetch"], fused_rope=setting["rope"],
                          skinny_table=tables[setting["table"]], batch_invariant=setting["exact"])


def settings_ab(args: argparse.Namespace, target: Target, drafts: dict[str, DraftModel], bandwidth: float,
                max_len: int) -> dict:
    """Each of AB_SETTINGS side by side: fresh decoders per setting whose graphs are captured under it (a
    graph keeps the launches it was captured with), timed in turn (every setting, then again) at each
    context; the median of each setting's repeats. Graphed greedy tokens must equal the eager path's under
    the same table (PDL and the prefetch change when kernels start and what sits in L2, never what they
    compute; a table's split-K may change rounding, and so does exact, so each table and exact have their own
    eager reference); the checks run first, with the drafts' own tokens, then the target is made constant_choice
    for the timed steps."""
    cfg, model = target.model.config, target.model
    tables = skinny_tables(args)
    names = [n for n in args.ab_settings or AB_SETTINGS if AB_SETTINGS[n]["table"] in tables]
    out: dict = {"settings": {n: AB_SETTINGS[n] for n in names}, "check": {}, "contexts": {}}
    prompt = torch.randint(0, cfg.vocab_size, (min(args.contexts),)).tolist()
    params = SamplingParams(max_new_tokens=256, ignore_eos=True)
    eager: dict = {}
    decoders: dict = {}
    for setting in names:
        with use_settings(kernel_settings(AB_SETTINGS[setting], tables)):
            reference = AB_SETTINGS[setting]["table"], AB_SETTINGS[setting]["exact"]
            paths = (("ar", None), *drafts.items())
            if reference not in eager:
                eager[reference] = {name: SpeculativeDecoder(target, d, use_graphs=False).generate(prompt, params)
                                    .token_ids for name, d in paths}
            decoders[setting] = {name: oracle_decoder(target, d, max_len) for name, d in paths}
            for name, decoder in decoders[setting].items():
                decoder.engine.pipeline = AB_SETTINGS[setting]["pipeline"]
                decoder.engine.capture_graphs(modes=("greedy",))
                out["check"][f"{setting}_{name}_graph_equals_eager"] = (
                    decoder.generate(prompt, params).token_ids == eager[reference][name])
    print("check", out["check"], flush=True)
    constant_choice(model)
    for ctx in args.contexts:
        prompt = torch.randint(0, cfg.vocab_size, (ctx,)).tolist()
        times: dict = {s: {name: [] for name in decoders[s]} for s in names}
        for _ in range(2):
            for setting in names:
                with use_settings(kernel_settings(AB_SETTINGS[setting], tables)):  # (its prefill, too)
                    for name, decoder in decoders[setting].items():
                        times[setting][name].append(timed_steps(decoder, prompt, 1 if name == "ar" else 16,
                                                                args.steps, args.device))
        row: dict = {}
        for name in decoders[names[0]]:
            draft = drafts.get(name)
            floor_s = floors(model, draft, ctx, 1 if draft is None else 16) / bandwidth
            base = statistics.median(times[names[0]][name])
            row[name] = {"floor_ms": floor_s * 1e3, **{
                setting: {"ms": statistics.median(times[setting][name]) * 1e3,
                          "x_floor": statistics.median(times[setting][name]) / floor_s,
                          "speedup": base / statistics.median(times[setting][name])} for setting in names}}
        out["contexts"][str(ctx)] = row
        print(json.dumps({ctx: row}), flush=True)
    return out


def run(args: argparse.Namespace) -> dict:
    device, tiny = args.device, args.tiny
    dtype = torch.float32 if tiny else torch.bfloat16
    torch.manual_seed(0)
    record: dict = {**run_header(args), "dtype": str(dtype), "tiny": tiny, "contexts": {}}
    bandwidth = copy_bandwidth(device, 0.05 if tiny else 2.0)
    record["copy_bandwidth_GBps"] = bandwidth / 1e9
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    if args.smollm2_only:
        record["smollm2"] = smollm2(args.smollm2, device, args.steps)
        return record
    if args.qwen35 and args.timeline:
        record["timeline"] = qwen35_timeline(args, bandwidth)
        return record
    if args.qwen35:
        record["qwen35"] = qwen35(args, bandwidth)
        return record
    cfg = qwen3_4b_config(tiny)
    model = TargetModel.random(cfg, device=device, dtype=dtype, seed=0, std=0.02)
    target = Target(model=model, tokenizer=None, name="qwen3-4b-shaped-random", eos_token_ids=())
    drafts = {kind: make_draft(kind, cfg, device, dtype, tiny) for kind in ("dflash", "dflare")}
    record["params"] = {"target": param_bytes(model) // item(model), **{k: param_bytes(d) // item(d)
                                                                        for k, d in drafts.items()}}
    max_ctx = max(args.contexts)
    max_len = max_ctx + max(args.new_tokens, 256) + 64
    if args.ab:
        record["ab"] = settings_ab(args, target, drafts, bandwidth, max_len)
        return record
    if args.timeline:
        ctx = min(args.contexts)
        prompt = torch.randint(0, cfg.vocab_size, (ctx,)).tolist()
        constant_choice(model)
        record["timeline"] = {"context": ctx, **{
            name: {"floor_us": floors(model, d, ctx, 1 if d is None else 16) / bandwidth * 1e6,
                   **graph_timeline(oracle_decoder(target, d, max_len), prompt, 1 if d is None else 16)}
            for name, d in (("ar", None), *drafts.items())}}
        return record
    if args.sweep_attention:
        constant_choice(model)
        record["attention_sweep"] = attention_sweep(oracle_decoder(target, drafts["dflash"], max_len), args.contexts,
                                                    device)
        return record
    ar = oracle_decoder(target, None, max_len)
    ar_per_op = oracle_decoder(target, None, max_len)  # its graphs captured with the flow kernel off
    spec = {kind: oracle_decoder(target, d, max_len) for kind, d in drafts.items()}

    # losslessness of the fast path: graphed greedy tokens == eager step tokens, 256 tokens (the drafts' own)
    prompt = torch.randint(0, cfg.vocab_size, (min(args.contexts),)).tolist()
    check_params = SamplingParams(max_new_tokens=CHECK_TOKENS_TINY if tiny else 256, ignore_eos=True)
    eager_ar = SpeculativeDecoder(target, None, use_graphs=False).generate(prompt, check_params).token_ids
    record["check"] = {"ar_graph_equals_eager": ar.generate(prompt, check_params).token_ids == eager_ar}
    with per_op_kernels():
        eager_per_op = SpeculativeDecoder(target, None, use_graphs=False).generate(prompt, check_params).token_ids
        record["check"]["ar_per_op_graph_equals_eager"] = (
            ar_per_op.generate(prompt, check_params).token_ids == eager_per_op)
    record["check"]["ar_flow_equals_per_op"] = eager_ar == eager_per_op
    record["check"]["flow_accuracy"] = [flow_accuracy(cfg, device, ctx) for ctx in args.contexts]
    for kind, decoder in spec.items():
        eager = SpeculativeDecoder(target, drafts[kind], use_graphs=False).generate(prompt, check_params).token_ids
        fast = decoder.generate(prompt, check_params).token_ids
        record["check"][f"{kind}_graph_equals_eager"] = fast == eager
        record["check"][f"{kind}_equals_ar"] = fast == eager_ar
    print("check", record["check"], flush=True)
    constant_choice(model)  # the timed steps accept as the oracle says

    for ctx in args.contexts:
        prompt = torch.randint(0, cfg.vocab_size, (ctx,)).tolist()
        row: dict = {}
        ar_floor = floors(model, None, ctx, 1) / bandwidth
        ar_times, per_op_times = [], []
        for _ in range(2):  # interleaved, for drift
            ar_times.append(timed_steps(ar, prompt, 1, args.steps, device))
            with per_op_kernels():
                per_op_times.append(timed_steps(ar_per_op, prompt, 1, args.steps, device))
        ar_s, per_op_s = statistics.median(ar_times), statistics.median(per_op_times)
        row["ar"] = {"ms_per_token": ar_s * 1e3, "floor_ms": ar_floor * 1e3, "x_floor": ar_s / ar_floor,
                     "flow_kernel": model._flow is not None}
        row["ar_per_op"] = {"ms_per_token": per_op_s * 1e3, "floor_ms": ar_floor * 1e3, "x_floor": per_op_s / ar_floor}
        row["ar"]["phases"] = phase_times(ar, prompt, bandwidth, device)
        for kind, decoder in spec.items():
            step_s = timed_steps(decoder, prompt, 16, args.steps, device)
            floor_s = floors(model, drafts[kind], ctx, 16) / bandwidth
            oracle = [oracle_rate(decoder, prompt, tau, args.new_tokens) for tau in TAUS]
            for o in oracle:
                o["speedup_vs_blockspec_ar"] = o["tokens_per_s"] * ar_s
            row[kind] = {"ms_per_step": step_s * 1e3, "floor_ms": floor_s * 1e3, "x_floor": step_s / floor_s,
                         "oracle": oracle}
            row[kind]["phases"] = phase_times(decoder, prompt, bandwidth, device)
        row["hf_eager_ms_per_token"] = hf_peer(hf_model(cfg, device, tiny), cfg.vocab_size, device, ctx,
                                               args.peer_steps) * 1e3
        row["reference_loop_ms_per_step"] = {
            kind: reference_style_step(cfg, d, device, ctx, args.peer_steps, tiny) * 1e3 for kind, d in drafts.items()}
        record["contexts"][str(ctx)] = row
        print(json.dumps({ctx: row}), flush=True)
    if device.startswith("cuda"):
        prompt = torch.randint(0, cfg.vocab_size, (min(args.contexts),)).tolist()
        record["profile_ar_ctx%d" % min(args.contexts)] = profile_step(ar, prompt, device)
        record["profile_dflash_ctx%d" % min(args.contexts)] = profile_step(spec["dflash"], prompt, device)
    if args.smollm2:
        record["smollm2"] = smollm2(args.smollm2, device, args.steps)
    return record


def per_op_kernels() -> contextlib.AbstractContextManager:
    """Batch-1 decode tokens through the per-op kernels instead of the flow kernel (graphs keep the path they were
    captured with)."""
    return use_settings(flow_decode=False)


@torch.inference_mode()
def flow_accuracy(cfg: TargetConfig, device: str, context: int, layers: int = 4) -> dict:
    """One decode token after `context` random tokens, on the first `layers` layers of the target's shape (random
    bf16 weights): the final-normed hidden state through the flow kernel and through the per-op kernels, each
    against the same model in fp32 (relative norm of the difference), so that an error of the kernel's own would
    stand out from the two paths' rounding (the flow kernel scales by the RMSNorm after its GEMVs)."""
    cfg = dataclasses.replace(cfg, num_layers=layers, vocab_size=1024, sliding_windows=(None,) * layers)
    model = TargetModel.random(cfg, device=device, dtype=torch.bfloat16, seed=5, std=0.02)
    exact = TargetModel.random(cfg, device=device, dtype=torch.float32, seed=5, std=0.02)
    exact.load_state_dict(model.state_dict())
    prompt = torch.randint(0, cfg.vocab_size, (1, context), device=device)
    token, position = prompt[:, -1:], torch.full((1, 1), context, device=device)
    hidden = {}
    model.prepare_fast_path()
    for name, net, flow in (("fp32", exact, False), ("per_op", model, False), ("flow", model, True)):
        cache = net.new_cache(1, context + 1)
        net(prompt, torch.arange(context, device=device)[None], cache)
        with use_settings(flow_decode=flow):
            hidden[name] = net(token, position, cache)[0].double()

    def rel_err(a: str, b: str) -> float:
        return ((hidden[a] - hidden[b]).norm() / hidden[b].norm()).item()

    return {"layers": layers, "context": context, "flow_kernel": model._flow is not None,
            "flow_vs_fp32": rel_err("flow", "fp32"), "per_op_vs_fp32": rel_err("per_op", "fp32"),
            "flow_vs_per_op": rel_err("flow", "per_op")}


def item(module: torch.nn.Module) -> int:
    return next(module.parameters()).element_size()


def smollm2(gguf: str, device: str, steps: int) -> dict:
    """Real SmolLM2-135M weights: AR ms/token and speculative ms/step (untrained draft: timing only), with
    programmatic dependent launch on (the default) and, side by side, off; graphs captured under each."""
    from blockspec.draft import new_draft_for_target
    from blockspec.target import load_target

    target = load_target(gguf, device=device, dtype="auto")
    constant_choice(target.model)  # timing only: the oracle forces acceptance
    draft = new_draft_for_target(target.model.config, "dflash", num_layers=2).to(device=device, dtype=target.dtype)
    prompt = target.encode("Write a short story about a robot who learns to paint.")
    decoders = {}
    for pdl in (True, False):
        with use_settings(pdl=pdl):
            decoders[pdl] = {"ar": oracle_decoder(target, None, 2048), "spec": oracle_decoder(target, draft, 2048)}
            for decoder in decoders[pdl].values():
                decoder.engine.capture_graphs(modes=("greedy",))
    times: dict = {(pdl, name): [] for pdl in (True, False) for name in ("ar", "spec")}
    for _ in range(2):
        for pdl in (True, False):
            with use_settings(pdl=pdl):
                for name, decoder in decoders[pdl].items():
                    times[pdl, name].append(timed_steps(decoder, prompt, 1 if name == "ar" else 16, steps, device))
    ms = {key: statistics.median(t) * 1e3 for key, t in times.items()}
    return {"prompt_tokens": len(prompt), "dtype": str(target.dtype),
            "ar_ms_per_token": ms[True, "ar"], "spec_ms_per_step": ms[True, "spec"],
            "pdl_off": {"ar_ms_per_token": ms[False, "ar"], "spec_ms_per_step": ms[False, "spec"]}}


# --qwen35 (issue 25): the Qwen3.5-4B-DFlash card's acceptance lengths per block and dataset, and SGLang's tokens/s
# at concurrency 1 with block 16 on a B200 (the same card), set beside ours scaled by the bandwidth ratio
QWEN35_CARD = {16: {"gsm8k": 6.75, "math500": 7.48, "humaneval": 7.72, "mbpp": 6.53, "mt-bench": 5.93},
               8: {"gsm8k": 5.30, "math500": 5.65, "humaneval": 5.68, "mbpp": 5.24, "mt-bench": 4.70}}
SGLANG_B200_BLOCK16 = {"gsm8k": 1387, "math500": 1636, "humaneval": 1635, "mbpp": 1495, "mt-bench": 1211}
B200_BANDWIDTH = 8e12  # bytes/s, the datasheet's
GOALS = {"ar_x_floor": 1.2, "step_x_floor": 1.3, "over_sglang": 1.5}


def qwen35_pair(args: argparse.Namespace) -> tuple[Target, DraftModel]:
    """The Qwen3.5-4B-shaped target (random weights; bf16, or fp32 on tiny shapes) and the draft's shape."""
    dtype = torch.float32 if args.tiny else torch.bfloat16
    cfg = qwen35_4b_config(args.tiny)
    model = TargetModel.random(cfg, device=args.device, dtype=dtype, seed=0, std=0.02, rope_theta=1e7)
    target = Target(model=model, tokenizer=None, name="qwen3.5-4b-shaped-random", eos_token_ids=())
    return target, qwen35_draft(cfg, args.device, dtype, args.tiny)


def qwen35(args: argparse.Namespace, bandwidth: float) -> dict:
    """Issue 25's row: the Qwen3.5-4B-shaped hybrid target (random weights) with the 6-layer sliding-window draft
    shape at each context: AR ms/token and the speculative step at blocks 16 and 8 against floors that count the
    recurrent and conv state (roofline.py), HF transformers eager on the same shape, and oracle tokens/s at the
    card's acceptance lengths. Checks first, with the draft's own tokens: graphed greedy tokens equal eager ones
    on every path. A context that fails (out of memory, say) records its error; the others still run."""
    device, tiny = args.device, args.tiny
    target, draft = qwen35_pair(args)
    model, cfg = target.model, target.model.config
    max_len = max(args.contexts) + max(args.new_tokens, 256) + 64
    other = next(r for r in ROLLBACKS if r != DEFAULT_ROLLBACK)  # timed beside the default
    ar, spec = oracle_decoder(target, None, max_len), oracle_decoder(target, draft, max_len)
    beside = oracle_decoder(target, draft, max_len, rollback=other)
    out: dict = {"params": {"target": param_bytes(model) // item(model), "draft": param_bytes(draft) // item(draft)},
                 "rollback": DEFAULT_ROLLBACK, "other_rollback": other, "hf_gdn_kernels": gdn_kernels(device),
                 "check": {}, "contexts": {}}
    prompt = torch.randint(0, cfg.vocab_size, (min(args.contexts),)).tolist()
    check_params = SamplingParams(max_new_tokens=CHECK_TOKENS_TINY if tiny else 128, ignore_eos=True)
    eager_ar = SpeculativeDecoder(target, None, use_graphs=False).generate(prompt, check_params).token_ids
    out["check"]["ar_graph_equals_eager"] = ar.generate(prompt, check_params).token_ids == eager_ar
    for block in QWEN35_CARD:
        eager = SpeculativeDecoder(target, draft, use_graphs=False).generate(prompt, check_params, block).token_ids
        out["check"][f"block{block}_graph_equals_eager"] = spec.generate(prompt, check_params, block).token_ids == eager
        out["check"][f"block{block}_{other}_graph_equals_eager"] = (
            beside.generate(prompt, check_params, block).token_ids == eager)
    print("check", out["check"], flush=True)
    out["parts"] = qwen35_parts(model, max(QWEN35_CARD), bandwidth, device)
    print("parts", json.dumps(out["parts"]), flush=True)
    constant_choice(model)  # the timed steps accept as the oracle says
    for ctx in args.contexts:
        prompt = torch.randint(0, cfg.vocab_size, (ctx,)).tolist()
        row: dict = {}
        try:
            ar_s = timed_steps(ar, prompt, 1, args.steps, device)
            floor_s = floors(model, None, ctx, 1) / bandwidth
            row["ar"] = {"ms_per_token": ar_s * 1e3, "floor_ms": floor_s * 1e3, "x_floor": ar_s / floor_s}
            for block, taus in QWEN35_CARD.items():
                step_s = timed_steps(spec, prompt, block, args.steps, device)
                other_s = timed_steps(beside, prompt, block, args.steps, device)
                floor_s = floors(model, draft, ctx, block) / bandwidth
                oracle = {name: oracle_rate(spec, prompt, tau, args.new_tokens, block) for name, tau in taus.items()}
                row[f"block{block}"] = {"ms_per_step": step_s * 1e3, "floor_ms": floor_s * 1e3,
                                        "x_floor": step_s / floor_s, "other_ms_per_step": other_s * 1e3,
                                        "oracle": oracle}
            row["hf_eager_ms_per_token"] = hf_peer(hf_qwen35(device, tiny), cfg.vocab_size, device, ctx,
                                                   args.peer_steps) * 1e3
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        out["contexts"][str(ctx)] = row
        print(json.dumps({ctx: row}), flush=True)
    return out


def qwen35_timeline(args: argparse.Namespace, bandwidth: float) -> dict:
    """--qwen35 --timeline: graph_timeline's profile of the Qwen3.5-4B shape's AR token and block-8 and block-16
    steps at the smallest context, each beside its floor (10 steps profiled; 2 on tiny shapes, a logic check)."""
    target, draft = qwen35_pair(args)
    model, cfg = target.model, target.model.config
    ctx = min(args.contexts)
    max_len = ctx + max(args.new_tokens, 256) + 64
    prompt = torch.randint(0, cfg.vocab_size, (ctx,)).tolist()
    constant_choice(model)
    ar, spec = oracle_decoder(target, None, max_len), oracle_decoder(target, draft, max_len)
    out: dict = {"context": ctx}
    for name, decoder, block in (("ar", ar, 1), *((f"block{b}", spec, b) for b in sorted(QWEN35_CARD))):
        out[name] = {"floor_us": floors(model, None if block == 1 else draft, ctx, block) / bandwidth * 1e6,
                     **graph_timeline(decoder, prompt, block, steps=2 if args.tiny else 10)}
    return out


def qwen35_parts(model: TargetModel, block: int, bandwidth: float, device: str) -> dict:
    """The parts of a Qwen3.5 pass that the GEMM kernels alone decide, at one row (AR) and a block's rows: every
    layer's weight GEMMs, and the lm_head with its argmax fused, each a CUDA graph of its own beside its floor."""
    out = {}
    item = model.embed_tokens.weight.element_size()
    with torch.inference_mode():
        for rows in (1, block):
            gemms, gemm_bytes, _ = weight_gemms(model, rows)
            hidden = torch.randn(1, rows, model.config.hidden_size, device=device,
                                 dtype=model.embed_tokens.weight.dtype)
            for name, fn, nbytes in (("weight GEMMs", gemms, gemm_bytes),
                                     ("lm_head + argmax", lambda: model.greedy_tokens(hidden),
                                      model.lm_head.weight.numel() * item)):
                ms, floor_ms = graph_ms(fn, device), nbytes / bandwidth * 1e3
                out[f"{name}, {rows} rows"] = {"ms": ms, "floor_ms": floor_ms, "x_floor": ms / floor_ms}
    return out


def report(path: str) -> str:
    r = json.loads(Path(path).read_text())
    if "ab" in r:
        return report_ab(r)
    if "timeline" in r:
        return report_timeline(r)
    if "attention_sweep" in r:
        return report_attention_sweep(r)
    if "qwen35" in r:
        return report_qwen35(r)
    if not r["contexts"]:
        return report_smollm2(r)
    lines = [f"Device {r['device']}, torch {r['torch']}, {r['dtype']}, commit {r['commit']}, {r['date']}; "
             f"copy bandwidth {r['copy_bandwidth_GBps']:.0f} GB/s (read + write).", "", report_checks(r["check"]), "",
             "| context | path | ms/step | floor ms | x floor | HF eager ms/token | reference loop ms/step |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for ctx, row in r["contexts"].items():
        ar_label = "AR (blockspec, flow kernel)" if row["ar"].get("flow_kernel") else "AR (blockspec)"
        lines.append(f"| {ctx} | {ar_label} | {row['ar']['ms_per_token']:.2f} | {row['ar']['floor_ms']:.2f} | "
                     f"{row['ar']['x_floor']:.2f} | {row['hf_eager_ms_per_token']:.1f} | |")
        if "ar_per_op" in row:
            per_op = row["ar_per_op"]
            lines.append(f"| {ctx} | AR (blockspec, per-op kernels) | {per_op['ms_per_token']:.2f} | "
                         f"{per_op['floor_ms']:.2f} | {per_op['x_floor']:.2f} | | |")
        for kind in ("dflash", "dflare"):
            k = row[kind]
            lines.append(f"| {ctx} | {kind} step | {k['ms_per_step']:.2f} | {k['floor_ms']:.2f} | {k['x_floor']:.2f} | "
                         f"| {row['reference_loop_ms_per_step'][kind]:.1f} |")
    lines += ["", "Oracle acceptance (forced tau; real per-step work): tokens/s and speedup over blockspec AR", "",
              "| context | draft | " + " | ".join(f"tau {t}" for t in TAUS) + " |",
              "| --- | --- | " + " | ".join("---" for _ in TAUS) + " |"]
    for ctx, row in r["contexts"].items():
        for kind in ("dflash", "dflare"):
            cells = [f"{o['tokens_per_s']:.0f} tok/s ({o['speedup_vs_blockspec_ar']:.2f}x)"
                     for o in row[kind]["oracle"]]
            lines.append(f"| {ctx} | {kind} | " + " | ".join(cells) + " |")
    for ctx, row in r["contexts"].items():
        if any("phases" in row[p] for p in ("ar", "dflash", "dflare")):
            lines += ["", report_phases(ctx, row)]
    if "smollm2" in r:
        lines += ["", report_smollm2(r, header=False)]
    return "\n".join(lines)


def report_qwen35(r: dict) -> str:
    q, bandwidth = r["qwen35"], r["copy_bandwidth_GBps"] * 1e9
    checks = ", ".join(f"{name.removesuffix('_graph_equals_eager')} {'yes' if ok else 'NO'}"
                       for name, ok in q["check"].items())
    main, other = q.get("rollback", "states"), q.get("other_rollback", "replay")  # older records name neither
    lines = [f"Device {r['device']}, torch {r['torch']}, {r['dtype']}, commit {r['commit']}, {r['date']}; copy "
             f"bandwidth {bandwidth / 1e9:.0f} GB/s (read + write). Qwen3.5-4B-shaped target "
             f"({q['params']['target']:,} parameters, random weights) and the 6-layer sliding-window draft shape "
             f"({q['params']['draft']:,}). "
             f"Floors: weights, visible K/V, and each Gated DeltaNet layer's recurrent and conv state "
             f"(benchmarks/roofline.py at the run's commit). Steps roll back by {main}. HF eager's Gated DeltaNet ran "
             f"on: {q['hf_gdn_kernels']}.", "",
             f"Checks: graphed greedy tokens equal the eager path's: {checks}.", "",
             f"| context | path | ms/step | floor ms | x floor | goal | rollback by {other}, ms | HF eager ms/token |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for ctx, row in q["contexts"].items():
        if "error" in row:
            lines.append(f"| {ctx} | failed: {row['error'][:100]} | | | | | | |")
            continue
        ar = row["ar"]
        lines.append(f"| {ctx} | AR | {ar['ms_per_token']:.2f} | {ar['floor_ms']:.2f} | {ar['x_floor']:.2f} | "
                     f"<= {GOALS['ar_x_floor']}x: {goal(ar['x_floor'], GOALS['ar_x_floor'])} | | "
                     f"{row['hf_eager_ms_per_token']:.1f} |")
        for block in QWEN35_CARD:
            k = row[f"block{block}"]
            beside = k.get("other_ms_per_step", k.get("replay_ms_per_step"))  # older records: replay beside states
            beside = f"{beside:.2f}" if beside is not None else ""
            lines.append(f"| {ctx} | step, block {block} | {k['ms_per_step']:.2f} | {k['floor_ms']:.2f} | "
                         f"{k['x_floor']:.2f} | <= {GOALS['step_x_floor']}x: "
                         f"{goal(k['x_floor'], GOALS['step_x_floor'])} | {beside} | |")
    if "parts" in q:
        lines += ["", "Parts that the GEMM kernels alone decide, each a CUDA graph of its own: " + "; ".join(
            f"{name} {p['ms']:.3f} ms ({p['x_floor']:.2f}x its floor)" for name, p in q["parts"].items()) + "."]
    names = list(SGLANG_B200_BLOCK16)
    lines += ["", "Oracle tokens/s at the card's acceptance lengths (tau in brackets; the real per-step work):", "",
              "| context | block | " + " | ".join(names) + " |",
              "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
    for ctx, row in q["contexts"].items():
        for block in QWEN35_CARD:
            if f"block{block}" in row:
                oracle = row[f"block{block}"]["oracle"]
                lines.append(f"| {ctx} | {block} | " + " | ".join(
                    f"{oracle[n]['tokens_per_s']:.0f} ({oracle[n]['tau_measured']:.2f})" for n in names) + " |")
    ctx, row = next(iter(q["contexts"].items()))
    if "block16" in row:
        scale = bandwidth / B200_BANDWIDTH
        lines += ["", f"Against SGLang on a B200 (concurrency 1, block 16, the model card), scaled by this GPU's copy "
                      f"bandwidth over the B200's {B200_BANDWIDTH / 1e12:.0f} TB/s (x{scale:.3f}; datasheet to "
                      f"datasheet, 3.35 / 8 TB/s for an H100, it would be x{3.35 / 8:.3f}); ours at context {ctx}:", "",
                  "| | " + " | ".join(names) + " |", "| --- | " + " | ".join("---" for _ in names) + " |",
                  "| SGLang B200 tok/s | " + " | ".join(str(SGLANG_B200_BLOCK16[n]) for n in names) + " |",
                  "| scaled to this GPU | " + " | ".join(f"{SGLANG_B200_BLOCK16[n] * scale:.0f}" for n in names) + " |",
                  "| blockspec tok/s | " + " | ".join(f"{row['block16']['oracle'][n]['tokens_per_s']:.0f}"
                                                     for n in names) + " |"]
        ratios = [row["block16"]["oracle"][n]["tokens_per_s"] / (SGLANG_B200_BLOCK16[n] * scale) for n in names]
        lines.append("| over scaled SGLang | " + " | ".join(
            f"{x:.2f}x ({goal(x, GOALS['over_sglang'], at_most=False)})" for x in ratios) + " |")
    return "\n".join(lines)


def goal(value: float, target: float, at_most: bool = True) -> str:
    """"met", or by how much the value missed the goal."""
    if value <= target if at_most else value >= target:
        return "met"
    return f"missed by {abs(value / target - 1) * 100:.0f}%"


def report_checks(check: dict) -> str:
    """The run's checks in words: graphed greedy tokens against the eager path's on every path, and the flow
    kernel's error against fp32 beside the per-op kernels'."""
    paths = [name.removesuffix("_graph_equals_eager") for name in check if name.endswith("_graph_equals_eager")]
    graphed = ", ".join(f"{path} {'yes' if check[f'{path}_graph_equals_eager'] else 'NO'}" for path in paths)
    lines = [f"Checks: graphed greedy tokens equal the eager path's: {graphed}."]
    for a in check.get("flow_accuracy", []):
        lines.append(f"One decode token on {a['layers']} layers at context {a['context']}, relative error against "
                     f"fp32: flow kernel {a['flow_vs_fp32']:.4f}, per-op kernels {a['per_op_vs_fp32']:.4f}.")
    return " ".join(lines)


def report_phases(ctx: str, row: dict) -> str:
    paths = [p for p in ("ar", "dflash", "dflare") if "phases" in row[p]]
    lines = [f"Where a step's time goes, context {ctx}: each part captured as a CUDA graph of its own and timed "
             "alone: ms (its floor, x floor). The target pass is AR's one token, or the speculative step's verify "
             "block of 16 tokens with taps; the lm_head and GEMMs take as many rows.", "",
             "| part | " + " | ".join(paths) + " |", "| --- | " + " | ".join("---" for _ in paths) + " |"]
    names = list(dict.fromkeys(part for p in reversed(paths) for part in row[p]["phases"]["parts"]))
    for part in names:
        cells = []
        for p in paths:
            m = row[p]["phases"]["parts"].get(part)
            cells.append(f"{m['ms']:.3f} ({m['floor_ms']:.3f}, {m['x_floor']:.2f}x)" if m else "")
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_attention_sweep(r: dict) -> str:
    rows = r["attention_sweep"]
    lines = [f"Device {r['device']}, torch {r['torch']}, commit {r['commit']}, {r['date']}. The DFlash step's 16-query "
             "decode attention (draft and verify) under each setting, captured in CUDA graphs: ms per whole step "
             "and per target pass (36 layers of the verify block); * marks the source's setting.", "",
             "| context | splits / keys per tile / warps | step ms | target pass ms |", "| --- | --- | --- | --- |"]
    for x in sorted(rows, key=lambda x: (x["context"], x["step_ms"])):
        setting = f"{x['splits']} / {x['block_n']} / {x['num_warps']}" + (" *" if x["source"] else "")
        lines.append(f"| {x['context']} | {setting} | {x['step_ms']:.3f} | {x['target_pass_ms']:.3f} |")
    return "\n".join(lines)


def report_smollm2(r: dict, header: bool = True) -> str:
    s = r["smollm2"]
    text = (f"SmolLM2-135M-Instruct (real weights, {s['dtype']}, prompt {s['prompt_tokens']} tokens): AR "
            f"{s['ar_ms_per_token']:.2f} ms/token, speculative step (2-layer DFlash, block 16) "
            f"{s['spec_ms_per_step']:.2f} ms.")
    if "pdl_off" in s:
        text += (f" The same with PDL off, side by side: AR {s['pdl_off']['ar_ms_per_token']:.2f} ms/token, "
                 f"step {s['pdl_off']['spec_ms_per_step']:.2f} ms.")
    return f"Device {r['device']}, torch {r['torch']}, commit {r['commit']}, {r['date']}. {text}" if header else text


def report_timeline(r: dict) -> str:
    t = r["timeline"]
    paths = [p for p in t if p != "context"]
    lines = [f"Device {r['device']}, torch {r['torch']}, commit {r['commit']}, {r['date']}; context {t['context']}; "
             f"per graph-replayed step, {t[paths[0]]['steps']} steps profiled.", "",
             "| | " + " | ".join(paths) + " |", "| --- | " + " | ".join("---" for _ in paths) + " |"]
    for key, label in (("floor_us", "floor"), ("span_us", "first kernel start to last kernel end"),
                       ("busy_us", "some kernel running"), ("between_steps_us", "idle between steps (host turn)"),
                       ("within_steps_gaps_us", "idle gaps within steps"),
                       ("kernel_sum_us", "sum of kernel durations")):
        lines.append(f"| {label} | " + " | ".join(f"{t[p][key]:.0f} us" for p in paths) + " |")
    names = list(dict.fromkeys(g for p in paths for g in t[p]["groups"]))
    for g in names:
        cells = [t[p]["groups"].get(g) for p in paths]
        lines.append(f"| {g} | " + " | ".join(f"{c['us']:.0f} us / {c['launches']:.0f}" if c else "" for c in cells)
                     + " |")
    return "\n".join(lines)


def report_ab(r: dict) -> str:
    ab = r["ab"]
    names = list(ab["settings"])
    lines = [f"Device {r['device']}, torch {r['torch']}, {r['dtype']}, commit {r['commit']}, {r['date']}; "
             f"copy bandwidth {r['copy_bandwidth_GBps']:.0f} GB/s. Settings: {ab['settings']}. "
             "All graphed tokens equal eager: "
             f"{all(ab['check'].values())}.", "",
             "ms per step (x floor, speedup over " + names[0] + ")", "",
             "| context | path | floor ms | " + " | ".join(names) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in names) + " |"]
    for ctx, row in ab["contexts"].items():
        for name, m in row.items():
            cells = [f"{m[n]['ms']:.2f} ({m[n]['x_floor']:.2f}, {m[n]['speedup']:.3f}x)" for n in names]
            lines.append(f"| {ctx} | {name} | {m['floor_ms']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = parser_with_common_flags(__doc__)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--steps", type=int, default=100, help="timed steps per measurement")
    parser.add_argument("--peer-steps", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--smollm2-only", action="store_true", help="with --smollm2: only its timings")
    parser.add_argument("--qwen35", action="store_true",
                        help="only issue 25's row: the Qwen3.5-4B shape with its draft's shape (hybrid target)")
    parser.add_argument("--timeline", action="store_true",
                        help="only a profile of graph-replayed steps at the smallest context (where the time goes)")
    parser.add_argument("--sweep-attention", action="store_true",
                        help="only the 16-query decode-attention settings (ATTENTION_SWEEP), timed in graphed steps")
    parser.add_argument("--ab", action="store_true",
                        help="only the settings A/B (AB_SETTINGS: PDL, tables, prefetch, pipeline, RoPE kernel; "
                             "graphed steps, checks)")
    parser.add_argument("--ab-settings", nargs="+", choices=list(AB_SETTINGS),
                        help="with --ab: these settings only, the first is the baseline (default: all)")
    run_and_report(parser, run, report, "engine_limit")

if __name__ == "__main__":
    main()
