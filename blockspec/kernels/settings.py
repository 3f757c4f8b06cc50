"""What the CUDA path launches: the switches a benchmark compares side by side, and the launch tables tuned per
device, and how big a decode-attention tile may be. None of it imports Triton, so the CPU path (and a machine
without Triton) can use it.

The switches are a KernelSettings, current per context (`use_settings`), which the kernels read when they launch:
a CUDA graph keeps the launches it was captured with. The tables are data (tables/*.json), chosen by the name
of the device a tensor lives on the first time that device launches a kernel.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import re
from importlib import resources
from typing import Iterator

import torch

# per weight shape (n, k), per row bucket (a table's "m1", "m16", "m32", ...: a product of m rows takes the smallest
# bucket of at least m) a skinny-GEMM launch config, or None where cuBLAS is faster
SkinnyTable = dict[tuple[int, int], dict[int, dict | None]]
# the flow kernel's config, in order (tables/*.json name them): rows per tile, K per tile, dot warps, ring
# stages, programs per SM, copy warps, KiB in flight per program, whether small GEMVs pack two K tiles per tile
FLOW_FIELDS = ("block_rows", "block_k", "dot_warps", "stages", "programs_per_sm", "copy_warps", "kib_in_flight",
               "pack_small")


@dataclasses.dataclass(frozen=True)
class KernelSettings:
    """The kernels' switches (the CUDA path's, and onednn_linear on the CPU); the defaults are what measured fastest
    on the H100 (`benchmarks/engine_limit.py --ab`, docs/performance.md). pdl, prefetch_tiles and fused_rope change no
    result; the others change where bf16 (or, for onednn_linear, fp32) rounds.

    pdl: programmatic dependent launch (Hopper and later). Every kernel may be scheduled while the one before it
        is still finishing; it waits (griddepcontrol.wait) for that kernel's writes before touching memory, then
        lets the next one start launching, so launch latency and ramp-up overlap the previous kernel's tail, the
        cost that ~440 small launches a speculative step pay (design notes, "The PDL gain").
    prefetch_tiles: with PDL, a skinny GEMM's programs are resident while the kernel before them still runs; they
        ask L2 for their first this-many weight tiles before waiting on it, so the weight stream starts during
        that kernel (0: off). A decode attention's programs do the same with their first key and value tiles (the
        cache store before it writes one slot a query).
    fused_rope: RoPE's cos/sin tables for a pass's positions in one kernel instead of the ~9 small torch ops of
        layers.RotaryEmbedding (bit-identical values).
    flow_decode: a batch-1 decode token through the flow kernel (every layer in one launch) where the target and
        device allow it; False: the per-op kernels.
    fused_gdn: a Gated DeltaNet layer's decode or verify (and a "replay" cache's commit) in Triton kernels
        (kernels/gdn.py, two launches a layer) instead of its torch ops (about ten a token).
    defer_replay_rows: with fused_gdn, a "replay" commit of this many rows or more only records the kept counts,
        and the next decode or verify applies them to the states it loads anyway (one read of every state a step
        instead of three); fewer rows replay at commit, where the kept updates would lengthen every layer's serial
        path by more than one replay launch of all layers costs (design notes); such a pass settles first what a
        larger one left pending.
    fla_prefill: a Gated DeltaNet layer's prefill through flash-linear-attention's chunked kernels where that package
        is installed (an optional CUDA dependency); False, or not installed: the torch chunked form.
    fused_kernels: the Triton kernels at all; False: every layer takes its plain torch ops (the baseline that
        benchmarks/compile_vs_graphs.py hands to torch.compile).
    skinny_table, attention_table, gdn_tile: launch tables to use instead of the device's (a sweep's candidates);
        None: the device's (`device_tables`).
    batch_invariant: a row's every result independent of how many rows run with it and what they hold
        (`--exact`), so that speculative tokens equal plain decoding's bit for bit in bf16 and a request's tokens
        do not depend on the batch. Every product of 16-bit weights, whatever its row count (prefills too), runs
        the Triton GEMM with one config per weight shape (skinny.invariant_config); attention, for any number of
        queries, cuts each query's keys at fixed offsets and sums the pieces in order; batch-1 decode skips the
        flow kernel. The norms, silu * up and RoPE kernels are per row already. CUDA inference of targets
        without Gated DeltaNet layers, with fused_kernels (docs/design-notes.md has the argument and the limits).
        Off by default: on an H100 it makes a plain token 5-9% slower (a speculative step 1-2%), over the 3% a
        default may cost (docs/performance.md).
    onednn_linear: on the CPU, fp32 inference's products through oneDNN with each weight packed once
        (layers._onednn_linear): a second copy of the weights in memory; False: F.linear (MKL on x86 builds).
    """

    pdl: bool = True
    prefetch_tiles: int = 2
    fused_rope: bool = True
    flow_decode: bool = True
    fused_gdn: bool = True
    defer_replay_rows: int = 4
    fla_prefill: bool = True
    fused_kernels: bool = True
    batch_invariant: bool = False
    onednn_linear: bool = True
    skinny_table: SkinnyTable | None = None
    attention_table: dict[str, dict] | None = None
    gdn_tile: dict | None = None


_CURRENT: contextvars.ContextVar[KernelSettings] = contextvars.ContextVar("blockspec_kernel_settings",
                                                                          default=KernelSettings())


# torch.compile cannot trace a ContextVar: it takes the settings current when it traces, as a CUDA graph keeps
# those current when it is captured
@torch.compiler.assume_constant_result
def current_settings() -> KernelSettings:
    """The settings kernels launch with here (KernelSettings() unless inside `use_settings`)."""
    return _CURRENT.get()


@contextlib.contextmanager
def use_settings(settings: KernelSettings | None = None, **changes: object) -> Iterator[KernelSettings]:
    """Launch (and capture graphs) inside with `settings` (default: the current ones) changed by `changes`, e.g.
    `with use_settings(pdl=False): ...`."""
    token = _CURRENT.set(dataclasses.replace(settings or current_settings(), **changes))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)


def attention_rows(group: int, queries: int) -> int:
    """Rows of one decode-attention program: its GQA group's heads times its queries, a power of two and 16 at least
    (a dot's smallest)."""
    return max(16, 1 << (group * queries - 1).bit_length())


def batch_attention_config(config: dict, rows: int) -> tuple[dict, int]:
    """The config of a launch over `rows` rows and its key splits a row. A table entry's "rows" lists settings
    measured at a row count R ("splits" a row, "block_n"), which serve R / 2 < rows <= R. Elsewhere the one-row
    splits are shared out: b rows fill the GPU with b times one row's programs, and every split costs its partial
    sums' scratch traffic (at 32 rows of 8 queries, more bytes than the K/V), so b rows take splits // b, at least
    one, keeping one row's program count."""
    measured = next((v for r, v in config.get("rows", {}).items() if int(r) // 2 < rows <= int(r)), None)
    if measured is not None:
        return {**config, "block_n": measured["block_n"]}, measured["splits"]
    return config, max(1, config["splits"] // rows)


def attention_table(device: torch.device) -> dict[str, dict]:
    """The attention launch table in force: the current settings' (a sweep's candidates), else `device`'s."""
    table = current_settings().attention_table
    return table if table is not None else device_tables(device).attention


def prompt_attention_config(device: torch.device, head_dim: int, tokens: int, prompts: int = 1) -> dict | None:
    """How `prompts` prompts of `tokens` each at this head dim take their attention (`attention_table`'s
    "prompt_d128", ...): the entry's tiles for kernels.attention.prompt_attention, or {"sdpa": backend} for an SDPA
    backend; its "batch" entry takes over from "from_prompts" prompts on, then its "long" entry from "from_tokens"
    on. None where the table lists none (SDPA's flash kernel then)."""
    entry = attention_table(device).get(f"prompt_d{head_dim}")
    if entry is not None and "batch" in entry and prompts >= entry["batch"]["from_prompts"]:
        return entry["batch"]
    if entry is not None and "long" in entry and tokens >= entry["long"]["from_tokens"]:
        return entry["long"]
    return entry


def attention_shared_bytes(rows: int, block_n: int, head_dim: int, itemsize: int) -> int:
    """An upper bound on one decode-attention program's shared memory as Triton 3.6 compiles it for sm_90 (at most
    512 bytes over the compiled size at head dims 64-256, 16-128 rows and 16-128 keys a tile, checked offline). The
    dots read the queries from it, and the loop's pipeline keeps K and V tiles in flight there: three of each on
    wgmma (16-bit inputs, 64 rows or more); otherwise two, beside the probabilities and a word a row."""
    if itemsize == 2 and rows >= 64:
        return (6 * block_n + rows) * head_dim * itemsize
    return (4 * block_n + rows) * head_dim * itemsize + rows * block_n * itemsize + rows * 4


def attention_keys_per_tile(block_n: int, rows: int, head_dim: int, itemsize: int, shared_limit: int) -> int:
    """A config's keys per tile, halved (down to 16) while a program would need more shared memory than the device
    gives one: fp32 at head dim 256 needs 276 KiB with 64 keys, the H100 has 227 (where the tables' tiles at head
    dims up to 128 fit as they are). A function of the launch's shape alone: the batch-invariant path keeps one
    tiling whatever the query count."""
    while block_n > 16 and attention_shared_bytes(rows, block_n, head_dim, itemsize) > shared_limit:
        block_n //= 2
    return block_n


@dataclasses.dataclass(frozen=True)
class LaunchTables:
    """One device's launch settings, as a tables/*.json file holds them.

    skinny: the skinny GEMM's config per weight shape and row bucket (SkinnyTable); a shape it does not list
        stays on cuBLAS.
    attention: decode attention's config per query count ("narrow": up to 4 queries, "wide": a block), and per head
        dim where one needs its own ("wide_d256"): key splits per (row, KV head), keys per tile, warps; optionally
        "rows", settings measured for batches of rows (batch_attention_config).
    flow: the flow kernel's config (FLOW_FIELDS, in order); None: not measured on this device, so batch-1 decode
        takes the per-op kernels.
    gdn: a Gated DeltaNet decode or verify program's tile (kernels/gdn.py): value dims of one value head's state it
        holds ("value_dims") and its warps; optionally "batch", the tile from its "rows" rows up.
    """

    file: str
    skinny: SkinnyTable
    attention: dict[str, dict]
    flow: tuple | None
    gdn: dict


def skinny_table_from_winners(winners: list[dict]) -> SkinnyTable:
    """A SkinnyTable from entries {"n", "k", "m1", "m16", ...} (a table file's "skinny", or the "winners" of a
    gemm_shapes.py --skinny or gemv_chain.py --sweep-table run): each "m<rows>" field is a row bucket."""
    return {(w["n"], w["k"]): {int(key[1:]): config for key, config in w.items() if re.fullmatch(r"m\d+", key)}
            for w in winners}


def bucket_config(buckets: dict[int, dict | None], rows: int) -> dict | None:
    """One shape's config for a product of `rows` rows: its smallest row bucket of at least that many (None: cuBLAS,
    also past the largest)."""
    return next((buckets[bucket] for bucket in sorted(buckets) if rows <= bucket), None)


def merged_skinny_tables(base: SkinnyTable, update: SkinnyTable) -> SkinnyTable:
    """`base` with `update`'s buckets in place of its own, shape by shape (a sweep of some buckets keeps the
    others)."""
    return {shape: {**base.get(shape, {}), **update.get(shape, {})} for shape in {**base, **update}}


def _table_files() -> list[tuple[str, dict]]:
    folder = resources.files(__package__).joinpath("tables")
    return [(f.name, json.loads(f.read_text())) for f in sorted(folder.iterdir(), key=lambda f: f.name)
            if f.name.endswith(".json")]


@functools.lru_cache(maxsize=None)
def tables_for(device_name: str) -> LaunchTables:
    """The first table file whose "devices" names part of `device_name` (as torch.cuda.get_device_name writes
    it); default.json (no devices) where none does."""
    files = _table_files()
    file, data = next(((name, data) for name, data in files if any(d in device_name for d in data["devices"])),
                      next((name, data) for name, data in files if name == "default.json"))
    flow = data["flow"]
    return LaunchTables(file, skinny_table_from_winners(data["skinny"]), data["attention"],
                        None if flow is None else tuple(flow[field] for field in FLOW_FIELDS), data["gdn"])


@functools.lru_cache(maxsize=None)
def _cuda_tables(index: int) -> LaunchTables:
    return tables_for(torch.cuda.get_device_name(index))


def device_tables(device: torch.device) -> LaunchTables:
    """The launch tables for kernels on `device` (default.json for a CPU device: Triton's interpreter)."""
    if device.type != "cuda":
        return tables_for("")
    return _cuda_tables(device.index if device.index is not None else torch.cuda.current_device())


def gdn_tile(device: torch.device, rows: int) -> dict:
    """A Gated DeltaNet decode/verify program's tile on `device` for `rows` rows (kernels/gdn.py): {"value_dims",
    "warps"} from the current settings, else the device's table, whose "batch" entry (if any) takes over from its
    "rows" up (benchmarks/gdn_tiles.py times the candidates), except under batch_invariant: a tile's warps order
    the sums over keys, so a row would round differently beside seven others than alone."""
    settings = current_settings()
    if settings.gdn_tile is not None:
        return settings.gdn_tile
    table = device_tables(device).gdn
    batch = table.get("batch")
    takes_batch_tile = batch is not None and rows >= batch["rows"] and not settings.batch_invariant
    return batch if takes_batch_tile else table
