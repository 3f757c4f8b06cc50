"""How fast can a decode step's weight stream go? The four GEMVs of each Qwen3-4B layer (qkv, o_proj, gate_up,
down; M = 1, bf16, random weights), 36 layers chained so each GEMV reads the one before it, timed side by side
in one run:

  cublas       F.linear per GEMV, in a CUDA graph
  skinny       blockspec's engine today: kernels.skinny_linear per GEMV (its table, PDL, weight prefetch), in a
               CUDA graph, so a kernel boundary (drain, flush, the next grid's ramp) sits between GEMVs
  persistent   one kernel for the whole chain: one program per SM slot, each GEMV's (column block, K tile)
               units dealt out evenly, fp32 atomics for the outputs, a grid-wide barrier between GEMVs; before
               waiting at a barrier a program asks L2 for its first tiles of the next GEMV (prefetch > 0), so
               the weight stream need not stop at a dependency. "nobarrier" drops the barriers (wrong results):
               the streaming ceiling of that kernel, so barrier cost = persistent - nobarrier.
  dataflow     deterministic and barrier-free: each program owns whole output rows (no atomics), and every
               activation is a 64-bit word carrying the run's epoch, so a reader spins only on the tile it needs
               (NCCL's LL protocol); as written Triton does not pipeline its K loop (the spin is inside it)
  flow         the same dataflow design in Gluon (the flow kernel: flow_probe.py) with the pipeline written out: copy
               warps stream
               the weights through a shared-memory ring, capped in bytes in flight, dot warps poll per tile;
               "nowait" reads the activations without waiting (wrong results): its streaming ceiling
  block        (--block) the layer chain for a verify block of 16 tokens: the flow kernel's block form
               (benchmarks/flow_block.py, wgmma) against the engine's kernels on 16 rows
  layer        a Qwen3 layer without attention (o_proj reads q): RMSNorm before qkv and gate_up, residual adds
               after o_proj and down, silu(gate) * up; "layer flow" is the flow kernel doing that work itself
               (flow_chain with norms; checked against an fp64 reference that rounds where it does), "layer
               skinny" the engine's kernels (skinny GEMMs, add + RMSNorm, silu * up) in a CUDA graph

A barrier profile (%globaltimer at each program's arrival and departure) splits the persistent kernel's barrier
time into the GEMV's tail and the barrier's own release latency; for the flow kernel, a clock profile of its dot
warps' loop and a timeline of each GEMV's last stores and its readers' first arrivals say what a dependency
costs there.

Without attention (and, but for the layer chains, without norms or activations): this bounds what a
persistent per-step kernel could reach, i.e. whether it could bring the engine within the issue-3 targets
where per-GEMM kernels cannot. The
persistent kernel is a probe, not an engine path (fp32 atomics make it nondeterministic); its output is
checked against an fp64 reference of the same chain.

    python -m benchmarks.gemv_chain --commit HASH     # on the H100
    python -m benchmarks.gemv_chain --sweep-table --commit HASH
        # instead: tune the device's skinny table in the chain rather than on one GEMM repeated (gemm_shapes.py
        # --skinny): per GEMV and row count (1: AR, 16: a verify block) in turn, every candidate launch config
        # timed as the whole 36-layer skinny chain, a winner kept only if it beats the incumbent again when
        # re-timed alternately; the record's "winners" load into engine_limit.py --skinny-table
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.gemm_shapes import candidates, graph_time, label
from benchmarks.harness import copy_bandwidth, parser_with_common_flags, run_and_report, run_header

GEMVS = (("qkv", 6144, 2560), ("o_proj", 2560, 4096), ("gate_up", 19456, 2560), ("down", 2560, 9728))  # N, K
WIDEST = max(n for _, n, _ in GEMVS)
# (block_n, block_k, num_warps, num_stages, programs per SM, L2-prefetch tiles)
PERSISTENT_CONFIGS = [(64, 128, 4, 4, 1, 2)]  # the best of the configs swept in session 7
# the dataflow kernel (deterministic, no barriers): (block rows, block_k, num_warps, num_stages, programs per SM)
DATAFLOW_CONFIGS = [(32, 256, 4, 4, 2)]
# the Gluon dataflow kernel with its cp.async weight ring (flow_probe.py): (block rows, block_k, dot warps, ring
# stages, programs per SM, copy warps, KiB in flight per program: 0 = the whole ring, pack the GEMVs with at most
# half a tile of rows per program: two K tiles per tile)
FLOW_CONFIGS = [(64, 512, 4, 3, 1, 2, 64, 0), (64, 512, 4, 3, 1, 2, 64, 1), (64, 512, 4, 3, 1, 2, 96, 1)]
# the flow kernel doing a layer's elementwise work as well (RMSNorm, residual adds, silu * up; attention left out)
LAYER_CONFIGS = [(64, 512, 4, 3, 1, 2, 64, 0), (64, 512, 4, 3, 1, 2, 64, 1), (64, 512, 4, 3, 1, 2, 96, 1)]
# and with attention (--attention); cap 96 measured 1-2% slower than 64 in every attention run
ATTENTION_CONFIGS = [LAYER_CONFIGS[1]]
# the layer chain for a verify block of 16 tokens (--block): 64 x 256 tiles (a unit's [16, 256] activation words
# are 32 registers a thread, held twice: the current unit's and the next's)
BLOCK_ROWS = 16
BLOCK_CONFIGS = [(64, 256, 4, 5, 1, 2, 64, 0), (64, 256, 4, 6, 1, 2, 64, 0), (64, 256, 4, 6, 1, 2, 96, 0)]


def make_weights(layers: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    # one spare layer: the last layer's prefetch of the "next" qkv stays in bounds
    return [torch.randn(layers + 1, n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * k ** -0.5
            for _, n, k in GEMVS]


def kernel_chain(x0: torch.Tensor, weights: list[torch.Tensor], layers: int, project, rows: int = 1):
    """The chain as one call per GEMV (`project(x [rows, K], weight [N, K]) -> [rows, N]`), as the engine runs
    it; `rows` copies of the input."""
    def run() -> torch.Tensor:
        x = x0[:GEMVS[0][2]].to(torch.bfloat16)[None].expand(rows, -1).contiguous()
        for layer in range(layers):
            qkv = project(x, weights[0][layer])
            o = project(qkv[:, :GEMVS[1][2]], weights[1][layer])
            gate_up = project(o, weights[2][layer])
            x = project(gate_up[:, :GEMVS[3][2]], weights[3][layer])
        return x
    return run


def reference(x0: torch.Tensor, weights: list[torch.Tensor], layers: int) -> torch.Tensor:
    """fp64 chain with each GEMV's input rounded to bf16, as both kernels feed their dots."""
    x = x0.double()
    for layer in range(layers):
        for index, (_, n, k) in enumerate(GEMVS):
            x = weights[index][layer].double() @ x[:k].to(torch.bfloat16).double()
    return x


def make_norms(layers: int, seed: int = 1) -> torch.Tensor:
    """RMSNorm weights [layers + 1, 2, hidden] (before qkv, before gate_up) near 1, bf16."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = GEMVS[0][2]
    return (1 + 0.1 * torch.randn(layers + 1, 2, hidden, device="cuda", generator=gen)).to(torch.bfloat16)


KV_HEADS, HEAD_DIM = 8, 128  # Qwen3-4B's: qkv's 6144 rows are 32 q heads, 8 k heads, 8 v heads of 128


def bf(t: torch.Tensor) -> torch.Tensor:
    """Rounded to bf16, held in fp64."""
    return t.to(torch.bfloat16).double()


def make_attention(layers: int, context: int, seed: int = 2) -> dict:
    """A decode step's attention state at `context` cached positions (random bf16 K/V, one spare layer), q/k
    RMSNorm weights near 1, and cos/sin of the new position (theta 1e6, rounded to bf16 as the engine's are), in
    flow_chain's `attention` form."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    length = context + 1
    shape = (layers + 1, KV_HEADS, length, HEAD_DIM)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, HEAD_DIM, 2, device="cuda", dtype=torch.float32) / HEAD_DIM))
    angle = (length - 1) * inv_freq
    return {"k_cache": torch.randn(shape, device="cuda", generator=gen).to(torch.bfloat16),
            "v_cache": torch.randn(shape, device="cuda", generator=gen).to(torch.bfloat16),
            "qk_norms": (1 + 0.1 * torch.randn(layers + 1, 2, HEAD_DIM, device="cuda", generator=gen)).to(
                torch.bfloat16),
            "rope": torch.stack([angle.cos(), angle.sin()]).to(torch.bfloat16).float(), "length": length}


def attention_reference(qkv: torch.Tensor, attention: dict, layer: int) -> torch.Tensor:
    """fp64 decode attention of one layer from its qkv rows, rounded where the engine's qkv_rope_store rounds
    (q/k RMSNorm, RoPE; the new k and v cached as bf16); the output rounded to bf16 as o_proj reads it."""
    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return bf(weight.double() * bf(x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)))

    def rope(x: torch.Tensor) -> torch.Tensor:
        half = HEAD_DIM // 2
        lo, hi = x[:, :half], x[:, half:]
        return torch.cat([bf(bf(lo * cos) + bf(-hi * sin)), bf(bf(hi * cos) + bf(lo * sin))], dim=1)

    cos, sin = attention["rope"].double()
    heads = GEMVS[1][2] // HEAD_DIM
    q = rope(norm(qkv[:heads * HEAD_DIM].view(heads, HEAD_DIM), attention["qk_norms"][layer, 0]))
    k_new = rope(norm(qkv[heads * HEAD_DIM:(heads + KV_HEADS) * HEAD_DIM].view(KV_HEADS, HEAD_DIM),
                      attention["qk_norms"][layer, 1]))
    length = attention["length"]
    keys = attention["k_cache"][layer, :, :length].double().clone()
    values = attention["v_cache"][layer, :, :length].double().clone()
    keys[:, -1] = k_new
    values[:, -1] = qkv[(heads + KV_HEADS) * HEAD_DIM:].view(KV_HEADS, HEAD_DIM)
    scores = torch.einsum("kgd,ktd->kgt", q.view(KV_HEADS, heads // KV_HEADS, HEAD_DIM), keys) * HEAD_DIM ** -0.5
    return bf(torch.einsum("kgt,ktd->kgd", scores.softmax(-1), values).reshape(-1))


def layer_reference(x0: torch.Tensor, weights: list[torch.Tensor], norms: torch.Tensor, layers: int,
                    engine: bool = False, attention: dict | None = None) -> torch.Tensor:
    """fp64 layer chain (flow_chain's with norms; without `attention` o_proj reads q) with bf16 rounding where the
    kernel rounds (RMSNorm's scale applied after the GEMV); with engine=True as engine_layer_chain computes it
    instead (the norm rounded before the GEMV). Both take gate_up's rows as (gate, up) pairs, the engine's layout.
    Returns the residual stream after the last layer."""
    def normed_gemv(weight: torch.Tensor, x: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(x.square().mean() + 1e-6)
        if engine:
            return bf(weight.double() @ bf(norm.double() * bf(x * scale)))
        return bf((weight.double() @ bf(x * norm.double())) * scale)

    h = bf(x0[:GEMVS[0][2]])
    for layer in range(layers):
        qkv = normed_gemv(weights[0][layer], h, norms[layer, 0])
        o = qkv[:GEMVS[1][2]] if attention is None else attention_reference(qkv, attention, layer)
        h = bf(h + bf(weights[1][layer].double() @ o))
        gate_up = normed_gemv(weights[2][layer], h, norms[layer, 1])
        gate, up = gate_up[0::2], gate_up[1::2]
        h = bf(h + bf(weights[3][layer].double() @ bf(bf(gate * torch.sigmoid(gate)) * up)))
    return h


def engine_layer_chain(x0: torch.Tensor, weights: list[torch.Tensor], norms: torch.Tensor, layers: int,
                       attention: dict | None = None):
    """The layer chain as the engine runs a target layer today (without `attention`, attention left out and
    o_proj reading q): skinny GEMMs, the norm fused with the residual add before it, silu * up as its own kernel
    (gate_up's rows (gate, up) pairs, as in the flow kernel), with attention the engine's qkv_rope_store and
    split-K decode_attention, all under PDL in a CUDA graph."""
    from blockspec.kernels.attention import decode_attention
    from blockspec.kernels.norm_rope import add_rms_norm, qkv_rope_store, rms_norm, silu_mul
    from blockspec.kernels.skinny import skinny_linear

    heads = GEMVS[1][2] // HEAD_DIM
    if attention is not None:
        position = torch.full((1, 1), attention["length"] - 1, device="cuda", dtype=torch.long)
        cos, sin = (half.to(torch.bfloat16).repeat(2).view(1, 1, HEAD_DIM) for half in attention["rope"])

    def attend(qkv: torch.Tensor, layer: int) -> torch.Tensor:
        if attention is None:
            return qkv[:, :GEMVS[1][2]]
        q_rows, k_rows, v_rows = qkv.view(1, 1, -1).split([heads * HEAD_DIM, KV_HEADS * HEAD_DIM,
                                                           KV_HEADS * HEAD_DIM], dim=-1)
        q = qkv_rope_store(q_rows, k_rows, v_rows, heads, KV_HEADS, HEAD_DIM, attention["qk_norms"][layer, 0],
                           attention["qk_norms"][layer, 1], 1e-6, cos, sin, position,
                           attention["k_cache"][layer:layer + 1], attention["v_cache"][layer:layer + 1])
        return decode_attention(q, attention["k_cache"][layer:layer + 1], attention["v_cache"][layer:layer + 1],
                                position).view(1, -1)

    def run() -> torch.Tensor:
        h = x0[..., :GEMVS[0][2]].to(torch.bfloat16).reshape(-1, GEMVS[0][2]).contiguous()  # [tokens, hidden]
        normed = rms_norm(h, norms[0, 0], 1e-6)
        for layer in range(layers):
            qkv = skinny_linear(normed, weights[0][layer])
            o = skinny_linear(attend(qkv, layer), weights[1][layer])
            h, normed = add_rms_norm(h, o, norms[layer, 1], 1e-6)
            gate_up = skinny_linear(normed, weights[2][layer])
            down = skinny_linear(silu_mul(gate_up[:, 0::2], gate_up[:, 1::2]), weights[3][layer])
            h, normed = add_rms_norm(h, down, norms[layer + 1, 0], 1e-6)
        return h
    return run


def graph_ms(fn, reps: int) -> float:
    """Median ms per CUDA-graph replay of `fn`."""
    return graph_time(fn, reps)[0] * 1e3


def barrier_profile(x0: torch.Tensor, weights: list[torch.Tensor], layers: int, config: tuple) -> dict:
    """Where a grid barrier's time goes, from each program's %globaltimer at arrival and departure (one run after
    a warm-up), per GEMV the barrier follows (medians over layers, us): `spread` last minus first arrival (the
    GEMV's tail: programs finishing unevenly), `release` median departure minus last arrival (the barrier's own
    latency once everyone is in), `departure_spread` last minus first departure, `wait` a program's median
    departure minus its arrival, `gemv` a program's median time from the previous departure to this arrival,
    `slowest` the slowest program's time minus that median. `systematic`: correlation over programs between
    their mean GEMV times (relative to each GEMV's median) on even and on odd layers: near 1 if the same
    programs (SMs) are slow every time, near 0 if the tail is random."""
    from benchmarks.persistent_gemv import persistent_chain

    nprog = torch.cuda.get_device_properties(0).multi_processor_count * config[4]
    times = torch.zeros(layers * 4, nprog, 2, device="cuda", dtype=torch.int64)
    fn, _ = persistent_chain(x0, weights, layers, config, GEMVS, WIDEST, True, times)
    fn()
    fn()
    t = (times.cpu().double() / 1e3)  # us
    arrive, leave = t[..., 0], t[..., 1]
    gemv = arrive[1:] - leave[:-1]  # [barrier - 1, program]: each program's time for the GEMV before barrier b
    stats: dict = {}
    for index, (name, _, _) in enumerate(GEMVS):
        rows = range(index, layers * 4, 4)
        per = {"spread": [(arrive[b].max() - arrive[b].min()).item() for b in rows],
               "release": [(leave[b].median() - arrive[b].max()).item() for b in rows],
               "wait": [(leave[b] - arrive[b]).median().item() for b in rows],
               "departure_spread": [(leave[b].max() - leave[b].min()).item() for b in rows],
               "gemv": [gemv[b - 1].median().item() for b in rows if b > 0],
               "slowest": [(gemv[b - 1].max() - gemv[b - 1].median()).item() for b in rows if b > 0]}
        stats[name] = {key: statistics.median(values) for key, values in per.items()}
    relative = gemv / gemv.median(dim=1, keepdim=True).values
    even, odd = relative[0::2].mean(0), relative[1::2].mean(0)
    systematic = torch.corrcoef(torch.stack([even, odd]))[0, 1].item()
    return {"config": list(config), "us": stats, "systematic": systematic,
            "program_relative_time": [round(v, 4) for v in relative.mean(0).tolist()]}


def flow_profile(x0: torch.Tensor, weights: list[torch.Tensor], layers: int, config: tuple, wait: bool,
                 norms: torch.Tensor | None = None, tokens: int = 1) -> dict:
    """Where the flow kernel's dot warps spend their time: each program's clock cycles per GEMV and phase
    (weights landed; the next unit's cursor and activation prefetch; activations in; dot and store), one run after
    a warm-up. Medians over programs of each phase's share of the loop and its cycles per unit, overall and per
    GEMV, with the weight bytes of the median program's unit of that GEMV (a unit that takes longer than its
    bytes take to stream is where the dot warps, not the stream, set the pace). tokens=16: the block form's dot
    warps (x0 [16, K]; their third phase also stores the operand for the wgmma)."""
    from flow_probe import flow_chain

    from blockspec.kernels.flow import packed_gemvs

    nprog = torch.cuda.get_device_properties(0).multi_processor_count * config[4]
    cycles = torch.zeros(nprog, 4, 4, device="cuda", dtype=torch.int64)
    if tokens == 1:
        fn, _ = flow_chain(x0, weights, layers, config, GEMVS, WIDEST, wait, cycles, norms=norms)
    else:
        from benchmarks.flow_block import block_chain

        fn, _ = block_chain(x0, weights, layers, config, GEMVS, WIDEST, norms, wait, cycles)
    fn()
    fn()
    c = cycles.cpu().double()  # [program, GEMV, phase]
    br, bk = config[0], config[1]
    rows = torch.tensor([[g * ((p + 1) * (n // g) // nprog) - g * (p * (n // g) // nprog)
                          for index, (_, n, _) in enumerate(GEMVS)
                          for g in [2 if norms is not None and index == 2 else 1]] for p in range(nprog)],
                        dtype=torch.float64)  # [program, GEMV]
    packed = torch.tensor(packed_gemvs(GEMVS, nprog, br, config[7] and tokens == 1, norms is not None),
                          dtype=torch.float64)
    k_tiles = torch.tensor([k // bk for _, _, k in GEMVS], dtype=torch.float64)
    units = layers * torch.ceil(rows / (br / (1 + packed))) * torch.ceil(k_tiles / (1 + packed))  # [program, GEMV]
    phases = ("weights", "next unit", "poll", "dot")
    total = c.sum(1)
    per_gemv = {}
    for index, (name, _, _) in enumerate(GEMVS):
        per_gemv[name] = {"cycles_per_unit": {phase: (c[:, index, j] / units[:, index]).median().item()
                                              for j, phase in enumerate(phases)},
                          "units_per_layer": (units[:, index] / layers).median().item(),
                          "bytes_per_unit": (rows[:, index] * k_tiles[index] * bk * 2
                                             / (units[:, index] / layers)).median().item()}
    return {"config": list(config), "wait": wait, "layer": norms is not None, "tokens": tokens,
            "share": {name: (total[:, j] / total.sum(1)).median().item() for j, name in enumerate(phases)},
            "cycles_per_unit": {name: (total[:, j] / units.sum(1)).median().item() for j, name in enumerate(phases)},
            "loop_cycles_per_unit": (total.sum(1) / units.sum(1)).median().item(), "per_gemv": per_gemv}


def flow_timeline(x0: torch.Tensor, weights: list[torch.Tensor], layers: int, config: tuple,
                  norms: torch.Tensor | None = None) -> dict:
    """What a dependency costs the flow kernel, from each program's %globaltimer when it stored its last rows
    of a GEMV and when its first activations of the next GEMV arrived (one run after a warm-up), per GEMV
    that produces them (medians over layers, us): `store_spread` last minus first store (the GEMV's tail),
    `release` median arrival minus the last store (how long the last rows take to reach a reader), `first`
    earliest arrival minus the last store, `wait` a program's arrival minus its own last store."""
    from flow_probe import flow_chain

    nprog = torch.cuda.get_device_properties(0).multi_processor_count * config[4]
    times = torch.zeros(layers * 4, nprog, 2, device="cuda", dtype=torch.int64)
    fn, _ = flow_chain(x0, weights, layers, config, GEMVS, WIDEST, True, times, timeline=True, norms=norms)
    fn()
    fn()
    t = times[:-1].cpu().double() / 1e3  # the last GEMV has no reader
    stored, arrived = t[..., 0], t[..., 1]
    last = stored.max(dim=1).values
    stats: dict = {}
    for index, (name, _, _) in enumerate(GEMVS):
        rows = [b for b in range(index, layers * 4 - 1, 4)]
        per = {"store_spread": [(stored[b].max() - stored[b].min()).item() for b in rows],
               "release": [(arrived[b].median() - last[b]).item() for b in rows],
               "first": [(arrived[b].min() - last[b]).item() for b in rows],
               "wait": [(arrived[b] - stored[b]).median().item() for b in rows]}
        stats[name] = {key: statistics.median(values) for key, values in per.items()}
    return {"config": list(config), "layer": norms is not None, "us": stats}


def sweep_table(x0: torch.Tensor, weights: list[torch.Tensor], layers: int, reps: int) -> tuple[list, list]:
    """Coordinate descent over the chain's four GEMVs for 1 and 16 rows, from the table in effect (the device's,
    or --skinny-table's); returns the timing rows and the table as gemm_shapes-style winners (every entry of the
    table in effect, the tuned ones replaced)."""
    from blockspec.kernels.skinny import BLOCK_ROWS, skinny_config, skinny_linear, skinny_table

    device = x0.device
    source = skinny_table(device)
    table = {m: {(n, k): skinny_config(n, k, m, device) for _, n, k in GEMVS} for m in (1, BLOCK_ROWS)}
    rows_out = []

    def chain_ms(m: int, configs: dict) -> float:
        project = lambda x, w: skinny_linear(x, w, None, configs[tuple(w.shape)])  # noqa: E731
        return graph_ms(kernel_chain(x0, weights, layers, project, rows=m), reps)

    for m in table:
        for name, n, k in GEMVS:
            incumbent = table[m][(n, k)]
            base = chain_ms(m, table[m])
            best, best_ms = incumbent, base
            for config in candidates(m, k):
                try:
                    ms = chain_ms(m, {**table[m], (n, k): config})
                except Exception as exc:  # noqa: BLE001 (a config that does not fit)
                    rows_out.append({"m": m, "gemm": name, "config": config, "error": str(exc)[:120]})
                    continue
                rows_out.append({"m": m, "gemm": name, "config": config, "ms": ms, "incumbent_ms": base})
                if ms < best_ms:
                    best, best_ms = config, ms
            if best is not incumbent:  # confirm against the incumbent, alternately, before adopting
                pairs = [(chain_ms(m, {**table[m], (n, k): best}), chain_ms(m, table[m])) for _ in range(3)]
                gain = statistics.median(b / a for a, b in pairs)
                kept = gain > 1.003
                print(f"M={m:2d} {name:8s} {label(best)} vs {label(incumbent)}: x{gain:.4f} "
                      f"{'kept' if kept else 'not kept'}", flush=True)
                rows_out.append({"m": m, "gemm": name, "candidate": best, "incumbent": incumbent,
                                 "confirm_pairs_ms": pairs, "gain": gain, "kept": kept})
                if kept:
                    table[m][(n, k)] = best
    winners = []
    for (n, k), entry in source.items():
        tuned = {m: table[m].get((n, k), entry[m]) for m in table}
        name = next((g for g, gn, gk in GEMVS if (gn, gk) == (n, k)), "other")
        winners.append({"gemm": name, "n": n, "k": k, "m1": tuned[1], "m16": tuned[BLOCK_ROWS]})
    return rows_out, winners


def chain_setup(args) -> tuple[list[torch.Tensor], torch.Tensor, float, int, dict]:
    """What every chain run starts from: the weights, the input, the copy bandwidth measured now, the weights'
    bytes and the record with its floor."""
    torch.manual_seed(0)
    weights = make_weights(args.layers)
    x0 = torch.randn(WIDEST, device="cuda", dtype=torch.float32)
    bandwidth = copy_bandwidth("cuda", 2.0)
    weight_bytes = sum(n * k * 2 for _, n, k in GEMVS) * args.layers
    record: dict = {**run_header(args), "layers": args.layers, "weight_bytes": weight_bytes,
                    "copy_bandwidth_GBps": bandwidth / 1e9, "floor_ms": weight_bytes / bandwidth * 1e3,
                    "check": {}, "paths": {}}
    return weights, x0, bandwidth, weight_bytes, record


def run(args) -> dict:
    from benchmarks.flow_probe import flow_chain
    from benchmarks.persistent_gemv import dataflow_chain, persistent_chain

    from blockspec.kernels.skinny import skinny_linear

    layers = args.layers
    weights, x0, bandwidth, weight_bytes, record = chain_setup(args)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s, floor {record['floor_ms']:.3f} ms for {layers} layers",
          flush=True)
    if args.sweep_table:
        record["sweep"], record["winners"] = sweep_table(x0, weights, layers, args.reps)
        return record

    # each kernel config first on 2 layers: all programs resident (none gave up waiting), output against fp64
    want = reference(x0, weights, 2)
    norms = make_norms(layers)
    want_layer = layer_reference(x0, weights, norms, 2)

    def check(fn, failed, reference=want) -> dict:
        """The chain's last output against fp64, whether a program gave up waiting, and a rerun bit for bit."""
        try:
            got = fn()[1, 3, :GEMVS[3][1]].clone()
            again = fn()[1, 3, :GEMVS[3][1]]
            torch.cuda.synchronize()
            return {"rel_err": ((got.double() - reference).norm() / reference.norm()).item(),
                    "gave_up_waiting": bool(failed.item()), "bit_exact_rerun": bool(torch.equal(got, again))}
        except Exception as exc:  # noqa: BLE001 (a config that does not fit: recorded, not fatal)
            return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}

    usable, dataflow_usable, flow_usable = [], [], []
    for kind, configs, make, fit in (("persistent", PERSISTENT_CONFIGS, persistent_chain, usable),
                                     ("dataflow", DATAFLOW_CONFIGS, dataflow_chain, dataflow_usable),
                                     ("flow", FLOW_CONFIGS, flow_chain, flow_usable)):
        for config in configs:
            record["check"][f"{kind} {config}"] = result = check(*make(x0, weights, 2, config, GEMVS, WIDEST))
            if result.get("rel_err", 1.0) < 1e-2 and not result["gave_up_waiting"]:
                fit.append(config)
    layer_usable = []
    for config in LAYER_CONFIGS:
        fn, failed = flow_chain(x0, weights, 2, config, GEMVS, WIDEST, norms=norms)
        record["check"][f"layer flow {config}"] = result = check(fn, failed, want_layer)
        if result.get("rel_err", 1.0) < 1e-2 and not result["gave_up_waiting"]:
            layer_usable.append(config)
    engine_layer = engine_layer_chain(x0, weights, norms, 2)()[0].double()
    want_engine = layer_reference(x0, weights, norms, 2, engine=True)
    record["check"]["layer_skinny_rel_err"] = ((engine_layer - want_engine).norm() / want_engine.norm()).item()
    skinny_out = kernel_chain(x0, weights, 2, lambda x, w: skinny_linear(x, w))()[0].double()
    record["check"]["skinny_rel_err"] = ((skinny_out - want).norm() / want.norm()).item()
    print("check", record["check"], flush=True)

    paths = {"cublas": kernel_chain(x0, weights, layers, F.linear),
             "skinny": kernel_chain(x0, weights, layers, lambda x, w: skinny_linear(x, w))}
    failures = {}
    for config in usable:
        for barriers in (True, False):
            name = f"{'persistent' if barriers else 'nobarrier'} n{config[0]} k{config[1]} w{config[2]} " \
                   f"st{config[3]} x{config[4]} pf{config[5]}"
            paths[name], failures[name] = persistent_chain(x0, weights, layers, config, GEMVS, WIDEST, barriers)
    for config in dataflow_usable:
        name = f"dataflow r{config[0]} k{config[1]} w{config[2]} st{config[3]} x{config[4]}"
        paths[name], failures[name] = dataflow_chain(x0, weights, layers, config, GEMVS, WIDEST)
    for config in flow_usable:
        for wait in (True, False):
            name = f"flow{'' if wait else ' nowait'} r{config[0]} k{config[1]} w{config[2]} ring{config[3]} " \
                   f"x{config[4]} copy{config[5]} cap{config[6] or 'ring'}{' packed' if config[7] else ''}"
            paths[name], failures[name] = flow_chain(x0, weights, layers, config, GEMVS, WIDEST, wait)
    for config in layer_usable:
        for wait in (True, False):
            name = f"layer flow{'' if wait else ' nowait'} r{config[0]} k{config[1]} ring{config[3]} " \
                   f"cap{config[6] or 'ring'}{' packed' if config[7] else ''}"
            paths[name], failures[name] = flow_chain(x0, weights, layers, config, GEMVS, WIDEST, wait, norms=norms)
    paths["layer skinny (the engine's kernels)"] = engine_layer_chain(x0, weights, norms, layers)
    record["barrier_profiles"] = [barrier_profile(x0, weights, layers, config) for config in usable[:1]]
    for profile in record["barrier_profiles"]:
        print("barrier profile", profile["config"], profile["us"], "systematic", profile["systematic"],
              "slowest programs", sorted(profile["program_relative_time"])[-5:], flush=True)
    record["flow_profiles"] = [flow_profile(x0, weights, layers, config, True) for config in flow_usable]
    record["flow_timelines"] = [flow_timeline(x0, weights, layers, config) for config in flow_usable]
    record["flow_profiles"] += [flow_profile(x0, weights, layers, config, True, norms) for config in layer_usable]
    record["flow_timelines"] += [flow_timeline(x0, weights, layers, config, norms) for config in layer_usable]
    for profile in record["flow_profiles"] + record["flow_timelines"]:
        print("flow", profile, flush=True)
    times: dict = {}
    for name, fn in paths.items():
        try:
            times[name] = [graph_ms(fn, args.reps)]
        except Exception as exc:  # noqa: BLE001 (a config that does not fit: recorded, not fatal)
            record["paths"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    for name in times:  # a second round, interleaved, for drift
        times[name].append(graph_ms(paths[name], args.reps))
    for name, ts in times.items():
        ms = statistics.median(ts)
        failed = bool(failures[name].item()) if name in failures else False
        record["paths"][name] = {"ms": ms, "rounds_ms": ts, "x_floor": ms / record["floor_ms"],
                                 "TBps": weight_bytes / ms / 1e9, "us_per_layer": ms * 1e3 / layers,
                                 "barrier_failed": failed}
        print(f"{name:45s} {ms:7.3f} ms  {ms / record['floor_ms']:.3f}x floor  {weight_bytes / ms / 1e9:.2f} TB/s"
              + ("  BARRIER FAILED" if failed else ""), flush=True)
    return record


def attention_timeline(x0: torch.Tensor, weights: list[torch.Tensor], norms: torch.Tensor, layers: int,
                       config: tuple, attention: dict, copies: bool = True) -> dict:
    """Where the flow kernel's attention hop goes, from %globaltimer stamps (one run after a warm-up), medians over
    layers of per-layer medians over programs (us): `qkv_tail` last minus first program's last qkv store; `inputs`
    an attention unit's wait for its q/k/v after its own last qkv store, `after_last_qkv` its inputs' arrival
    after the layer's last qkv store; `norm_rope` q/k norm, RoPE and the cache store; `softmax` the split's loop;
    `partial` combining the warps and publishing the partial; `combine` the last split's wait for the group's
    partials, their sum and its publication;
    `to_o_proj` a program's first o_proj input after the layer's last combine; `hop` a program's first o_proj
    input after its own last qkv store (the whole cost of attention as a program sees it). copies=False: the
    same without weight copies (wrong results), to see what the copy warps' instructions cost the stages."""
    from flow_probe import flow_chain

    nprog = torch.cuda.get_device_properties(0).multi_processor_count * config[4]
    stamps = torch.zeros(layers, nprog, 8, device="cuda", dtype=torch.int64)
    fn, _ = flow_chain(x0, weights, layers, config, GEMVS, WIDEST, True, stamps, "attention", norms, attention,
                       copies)
    fn()
    fn()
    t = stamps.cpu().double() / 1e3
    units = 8 * (nprog // 8)
    per: dict = {key: [] for key in ("qkv_tail", "inputs", "after_last_qkv", "norm_rope", "softmax", "partial",
                                     "combine", "to_o_proj", "hop")}
    for layer in t:
        last_qkv = layer[:, 0].max()
        att = layer[:units]
        combined = att[att[:, 5] > 0]
        per["qkv_tail"].append((last_qkv - layer[:, 0].min()).item())
        per["inputs"].append((att[:, 1] - att[:, 0]).median().item())
        per["after_last_qkv"].append((att[:, 1] - last_qkv).median().item())
        per["norm_rope"].append((att[:, 2] - att[:, 1]).median().item())
        per["softmax"].append((att[:, 3] - att[:, 2]).median().item())
        per["partial"].append((att[:, 4] - att[:, 3]).median().item())
        per["combine"].append((combined[:, 5] - combined[:, 4]).median().item())
        per["to_o_proj"].append((layer[:, 6] - combined[:, 5].max()).median().item())
        per["hop"].append((layer[:, 6] - layer[:, 0]).median().item())
    return {"config": list(config), "length": attention["length"],
            "copies": copies, "us": {key: statistics.median(values) for key, values in per.items()}}


VOCAB = 151936  # Qwen3-4B's lm_head rows


def with_lm_head(layers_fn, head: dict):
    """A chain of layers (returning the last residual, bf16 [1, hidden]) followed by what ends an AR step: the
    final RMSNorm, the lm_head (the engine's skinny GEMM) and the argmax."""
    from blockspec.kernels.norm_rope import rms_norm
    from blockspec.kernels.skinny import skinny_linear

    def run() -> torch.Tensor:
        normed = rms_norm(layers_fn(), head["norm"], 1e-6)
        return skinny_linear(normed, head["weight"]).argmax(-1)
    return run


def run_attention(args) -> dict:
    """Whole decode layers, attention in: the flow kernel with its attention units against the engine's kernels,
    side by side per context, with the attention-free layer chains as the baseline; checked against fp64 on 2
    layers first. The floor adds the K/V bytes a step reads to the weights'. Then both as an AR step but for the
    embedding (with_lm_head): its floor adds the lm_head's bytes (context keyed negative in the record)."""
    from flow_probe import flow_chain

    layers = args.layers
    weights, x0, bandwidth, weight_bytes, record = chain_setup(args)
    norms = make_norms(layers)
    record["contexts"] = {}
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(3)
    head = {"weight": torch.randn(VOCAB, GEMVS[0][2], device="cuda", generator=gen).to(torch.bfloat16)
            * GEMVS[0][2] ** -0.5, "norm": norms[layers, 0]}  # the spare layer's norm as the final one
    head_bytes = head["weight"].numel() * 2
    paths = {"layer skinny (the engine's kernels)": (engine_layer_chain(x0, weights, norms, layers), 0)}
    for config in LAYER_CONFIGS[1:2]:
        fn, _ = flow_chain(x0, weights, layers, config, GEMVS, WIDEST, norms=norms)
        paths[f"layer flow cap{config[6]}"] = (fn, 0)
    for context in args.contexts:
        flow_state, engine_state = make_attention(layers, context), make_attention(layers, context)
        kv_bytes = layers * 2 * KV_HEADS * flow_state["length"] * HEAD_DIM * 2
        record["contexts"][context] = {"kv_bytes": kv_bytes,
                                       "floor_ms": (weight_bytes + kv_bytes) / bandwidth * 1e3}
        want = layer_reference(x0, weights, norms, 2, attention=flow_state)
        for config in ATTENTION_CONFIGS:
            fn, failed = flow_chain(x0, weights, 2, config, GEMVS, WIDEST, norms=norms, attention=flow_state)
            got = fn()[1, 3, :GEMVS[3][1]].clone()
            again = fn()[1, 3, :GEMVS[3][1]]
            record["check"][f"ctx {context} flow {config}"] = result = {
                "rel_err": ((got.double() - want).norm() / want.norm()).item(),
                "gave_up_waiting": bool(failed.item()), "bit_exact_rerun": bool(torch.equal(got, again))}
            print(context, config, result, flush=True)
            if result["rel_err"] < 1e-2 and not result["gave_up_waiting"]:
                paths[f"layer flow cap{config[6]} + attention, ctx {context}"] = (flow_chain(
                    x0, weights, layers, config, GEMVS, WIDEST, norms=norms, attention=flow_state)[0], context)
        engine_want = layer_reference(x0, weights, norms, 2, engine=True, attention=engine_state)
        engine_got = engine_layer_chain(x0, weights, norms, 2, engine_state)()[0].double()
        record["check"][f"ctx {context} skinny"] = {
            "rel_err": ((engine_got - engine_want).norm() / engine_want.norm()).item()}
        print(context, "skinny", record["check"][f"ctx {context} skinny"], flush=True)
        config, state = ATTENTION_CONFIGS[0], flow_state  # the diagnostics, the AR step and the timeline use the first
        fn, _ = flow_chain(x0, weights, layers, config, GEMVS, WIDEST, norms=norms, attention=state, copies=False)
        paths[f"layer flow + attention, no weight copies (wrong results), ctx {context}"] = (fn, context)
        paths[f"layer skinny + attention (the engine's kernels), ctx {context}"] = (
            engine_layer_chain(x0, weights, norms, layers, engine_state), context)
        # an AR step but for the embedding: the layers, the final norm, the lm_head and the argmax
        flow_layers, _ = flow_chain(x0, weights, layers, config, GEMVS, WIDEST, norms=norms, attention=state,
                                    last_only=True)
        paths[f"AR step: flow kernel + lm_head, ctx {context}"] = (
            with_lm_head(lambda fn=flow_layers: fn().to(torch.bfloat16)[None], head), -context)
        paths[f"AR step: the engine's kernels + lm_head, ctx {context}"] = (
            with_lm_head(engine_layer_chain(x0, weights, norms, layers, engine_state), head), -context)
        record["contexts"][-context] = {"floor_ms": (weight_bytes + kv_bytes + head_bytes) / bandwidth * 1e3}
        for copies in (True, False):
            timeline = attention_timeline(x0, weights, norms, layers, config, state, copies)
            record.setdefault("attention_timelines", []).append(timeline)
            print("attention timeline", timeline, flush=True)
    times = {name: [graph_ms(fn, args.reps)] for name, (fn, _) in paths.items()}
    for name in times:  # a second round, interleaved, for drift
        times[name].append(graph_ms(paths[name][0], args.reps))
    for name, ts in times.items():
        context = paths[name][1]
        floor = record["contexts"][context]["floor_ms"] if context else record["floor_ms"]
        context = abs(context)
        ms = statistics.median(ts)
        record["paths"][name] = {"ms": ms, "rounds_ms": ts, "context": context, "floor_ms": floor,
                                 "x_floor": ms / floor, "us_per_layer": ms * 1e3 / layers}
        print(f"{name:60s} {ms:7.3f} ms  floor {floor:.3f}  {ms / floor:.3f}x", flush=True)
    return record


def run_block(args) -> dict:
    """The layer chain (no attention) for a verify block of 16 tokens: the flow kernel's block form against the
    engine's kernels on 16 rows, side by side, checked per token against fp64 on 2 layers first; the one-token
    layer chains of both in the same run for scale. The floor is the weights' bytes, as for one token."""
    from benchmarks.flow_block import block_chain

    from flow_probe import flow_chain

    layers = args.layers
    weights, x0, bandwidth, weight_bytes, record = chain_setup(args)
    norms = make_norms(layers)
    block = torch.randn(BLOCK_ROWS, GEMVS[0][2], device="cuda", dtype=torch.float32)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s, floor {record['floor_ms']:.3f} ms", flush=True)
    want = torch.stack([layer_reference(row, weights, norms, 2) for row in block])
    engine_want = torch.stack([layer_reference(row, weights, norms, 2, engine=True) for row in block])
    engine_got = engine_layer_chain(block, weights, norms, 2)().double()
    record["check"]["block skinny"] = {"rel_err": ((engine_got - engine_want).norm() / engine_want.norm()).item()}
    paths = {"block of 16, the engine's kernels": engine_layer_chain(block, weights, norms, layers),
             "one token, the engine's kernels": engine_layer_chain(x0, weights, norms, layers),
             "one token, flow kernel": flow_chain(x0, weights, layers, LAYER_CONFIGS[1], GEMVS, WIDEST, norms=norms)[0]}
    failures = {}
    for config in BLOCK_CONFIGS:
        name = f"block of 16, flow r{config[0]} k{config[1]} ring{config[3]} cap{config[6]}"
        try:
            fn, failed = block_chain(block, weights, 2, config, GEMVS, WIDEST, norms)
            got = fn().double().clone()
            again = fn().double()
            torch.cuda.synchronize()
            result = {"rel_err": ((got - want).norm() / want.norm()).item(),
                      "rel_err_per_token_max": ((got - want).norm(dim=1) / want.norm(dim=1)).max().item(),
                      "gave_up_waiting": bool(failed.item()), "bit_exact_rerun": bool(torch.equal(got, again))}
        except Exception as exc:  # noqa: BLE001 (a config that does not fit: recorded, not fatal)
            result = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        record["check"][name] = result
        print(name, result, flush=True)
        if result.get("rel_err", 1.0) < 1e-2 and not result["gave_up_waiting"]:
            for wait in (True, False):
                full = f"{name}{'' if wait else ' nowait (wrong results)'}"
                paths[full], failures[full] = block_chain(block, weights, layers, config, GEMVS, WIDEST, norms, wait)
                profile = flow_profile(block, weights, layers, config, wait, norms, BLOCK_ROWS)
                record.setdefault("flow_profiles", []).append(profile)
                print("profile", profile, flush=True)
    times = {name: [graph_ms(fn, args.reps)] for name, fn in paths.items()}
    for name in times:  # a second round, interleaved, for drift
        times[name].append(graph_ms(paths[name], args.reps))
    for name, ts in times.items():
        ms = statistics.median(ts)
        record["paths"][name] = {"ms": ms, "rounds_ms": ts, "x_floor": ms / record["floor_ms"],
                                 "TBps": weight_bytes / ms / 1e9, "us_per_layer": ms * 1e3 / layers,
                                 "barrier_failed": bool(failures[name].item()) if name in failures else False}
        print(f"{name:60s} {ms:7.3f} ms  {ms / record['floor_ms']:.3f}x floor", flush=True)
    return record


def report(path: str) -> str:
    import json

    r = json.loads(Path(path).read_text())
    if "contexts" in r:
        lines = [f"Decode layers with attention, {r['layers']} Qwen3-4B layers (M = 1), {r['device']}, commit "
                 f"{r['commit']}, {r['date']}; copy bandwidth {r['copy_bandwidth_GBps']:.0f} GB/s", "",
                 "| path | context | ms | floor ms | x floor | us/layer |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {name} | {p['context'] or '-'} | {p['ms']:.3f} | {p['floor_ms']:.3f} | {p['x_floor']:.3f} | "
                  f"{p['us_per_layer']:.1f} |" for name, p in r["paths"].items()]
        for timeline in r.get("attention_timelines", []):
            chunk = f" chunk {timeline['chunk']}" if "chunk" in timeline else ""  # (runs before the mma softmax)
            lines += ["", f"Attention hop, flow {timeline['config']}{chunk}, {timeline['length']} "
                      f"positions{'' if timeline.get('copies', True) else ', no weight copies'} (us, medians over "
                      "layers of medians over programs): "
                      + ", ".join(f"{key} {value:.2f}" for key, value in timeline["us"].items())]
        return "\n".join(lines + ["", f"Checks: {r['check']}"])
    if "winners" in r:
        kept = [row for row in r["sweep"] if "kept" in row]
        return "\n".join(f"M={row['m']} {row['gemm']}: {row['candidate']} x{row['gain']:.4f} over "
                         f"{row['incumbent']} ({'kept' if row['kept'] else 'not kept'})" for row in kept) or "no change"
    rows = "M = 1 and a block of 16" if any(name.startswith("block") for name in r["paths"]) else "M = 1"
    lines = [f"GEMV chain, {r['layers']} Qwen3-4B layers (qkv, o_proj, gate_up, down; {rows}), {r['device']}, "
             f"commit {r['commit']}, {r['date']}; copy bandwidth {r['copy_bandwidth_GBps']:.0f} GB/s, "
             f"floor {r['floor_ms']:.3f} ms", "", "| path | ms | x floor | TB/s | us/layer |",
             "| --- | --- | --- | --- | --- |"]
    for name, p in r["paths"].items():
        if "error" in p:
            lines.append(f"| {name} | {p['error']} | | | |")
        else:
            flag = " (barrier gave up)" if p["barrier_failed"] else ""
            lines.append(f"| {name}{flag} | {p['ms']:.3f} | {p['x_floor']:.3f} | {p['TBps']:.2f} | "
                         f"{p['us_per_layer']:.1f} |")
    for profile in r.get("barrier_profiles", []):
        lines += ["", f"Barrier profile of persistent {profile['config']} (us, medians over layers; same programs "
                  f"slow every time: correlation {profile['systematic']:.2f})", "",
                  "| barrier after | GEMV (median program) | arrival spread | slowest - median | release after "
                  "the last arrival | a program's wait |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {name} | {u['gemv']:.2f} | {u['spread']:.2f} | {u['slowest']:.2f} | {u['release']:.2f} | "
                  f"{u['wait']:.2f} |" for name, u in profile["us"].items()]
    for profile in r.get("flow_profiles", []):
        block = ", a block of 16 tokens" if profile.get("tokens", 1) > 1 else ""
        lines += ["", f"Flow kernel{' (layer chain' + block + ')' if profile.get('layer') else ''} {profile['config']}"
                  f"{'' if profile['wait'] else ' nowait'}: median over "
                  f"programs, {profile['loop_cycles_per_unit']:.0f} cycles per unit", "",
                  "| phase | share of the loop | cycles per unit |", "| --- | --- | --- |"]
        lines += [f"| {name} | {profile['share'][name]:.3f} | {profile['cycles_per_unit'][name]:.0f} |"
                  for name in profile["share"]]
        if "per_gemv" in profile:
            lines += ["", "| GEMV | units per layer | KB per unit | " + " | ".join(profile["share"]) + " |",
                      "| --- | --- | --- |" + " --- |" * len(profile["share"])]
            lines += [f"| {name} | {g['units_per_layer']:.0f} | {g['bytes_per_unit'] / 1024:.1f} | "
                      + " | ".join(f"{v:.0f}" for v in g["cycles_per_unit"].values()) + " |"
                      for name, g in profile["per_gemv"].items()]
    for timeline in r.get("flow_timelines", []):
        lines += ["", f"Flow kernel{' (layer chain)' if timeline.get('layer') else ''} {timeline['config']}: a GEMV's "
                  "last rows to its readers (us, medians over layers)",
                  "", "| GEMV | stores spread | first reader after the last store | median reader | a program's "
                  "wait after its own last store |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {name} | {u['store_spread']:.2f} | {u['first']:.2f} | {u['release']:.2f} | {u['wait']:.2f} |"
                  for name, u in timeline["us"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = parser_with_common_flags(__doc__)
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--sweep-table", action="store_true", help="only tune the skinny table in the chain")
    parser.add_argument("--attention", action="store_true",
                        help="only whole decode layers with attention (flow kernel vs the engine's kernels)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--block", action="store_true",
                        help="only the layer chain for a 16-token verify block (flow kernel vs the engine's kernels)")
    run_and_report(parser, lambda args: (run_attention if args.attention else run_block if args.block else run)(args),
                   report, "gemv_chain")


if __name__ == "__main__":
    main()
