"""Skinny GEMMs: a decode-time projection multiplies a few rows (1 token, or a 16-token block) by a large weight
[N, K], and the cost is streaming the weight once. Each program owns a tile of rows, BLOCK_N output features and
one K range, and reads that slab of the weight as row-contiguous [BLOCK_N, BLOCK_K] tiles. Split-K partials go
to an fp32 buffer that a second kernel sums in split order: never atomics, so results are bit-identical run to
run (the engine checks CUDA-graph replays against eager steps).

Launch settings come per weight shape (N, K) and row bucket (1: one token; 16: 2..16 rows; 32 and up: a batch of
tokens or blocks) from the device's table (settings.LaunchTables.skinny, measured: tables/*.json). rows = 16,
32 or 64 is a tensor-core dot with the rows padded to that (its weight tiles pipelined through shared memory), so
the weight is streamed once for all of them; rows = 1 a multiply-and-sum on the CUDA cores for a single row; split_k
is the number of K ranges. A shape or row count the table does not list, or lists as None, stays on cuBLAS
(`layers.linear` keeps F.linear); a direct skinny_linear call without a config takes default_skinny_config. An entry
{"cublas_split_k": s} stays on cuBLAS too, in s K ranges whose partials the next norm sums (`cublas_partials`).

More rows than a tile holds run as more tiles of the same program, so under one config a row's output does not
depend on how many rows run with it: with `KernelSettings.batch_invariant` every product of any row count runs
here under `invariant_config`, one config per weight shape.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blockspec.kernels.launch import pdl_options, pdl_prologue, prefetch_l2, prefetch_tiles
from blockspec.kernels.settings import SkinnyTable, bucket_config, current_settings, device_tables

BLOCK_ROWS = 16  # the row bucket of one verify block, whose config the batch-invariant path takes for any rows
ARGMAX_COLUMNS = 4096  # logits a program of argmax_rows reads: 8 KiB of bf16, 37 blocks of a 152k vocabulary
FILL_PROGRAMS = 264  # the default split-K aims for this many programs: two per SM of an H100 (132 SMs)


def default_skinny_config(n: int, k: int) -> dict:
    """Settings for a shape the table does not list: split K until the grid fills the GPU, keeping at least
    two tiles per K range (shorter loops leave the load pipeline no time to fill)."""
    block_n, block_k = 64, 128
    blocks_n, blocks_k = triton.cdiv(n, block_n), triton.cdiv(k, block_k)
    split = 1
    while blocks_n * split < FILL_PROGRAMS and blocks_k >= 4 * split:
        split *= 2
    return {"rows": 16, "block_n": block_n, "block_k": block_k, "split_k": split, "num_warps": 4, "num_stages": 4}


def skinny_table(device: torch.device) -> SkinnyTable:
    """The skinny-GEMM table kernels on `device` launch with: the current settings', else the device's."""
    table = current_settings().skinny_table
    return table if table is not None else device_tables(device).skinny


def skinny_config(n: int, k: int, m: int, device: torch.device) -> dict | None:
    """The table's settings for an [m, k] x [n, k]^T product on `device` (its smallest row bucket of at least m
    rows); None (use cuBLAS) when the table says so or lists no such shape or bucket: the kernel runs only where a
    measurement showed it faster."""
    return bucket_config(skinny_table(device).get((n, k), {}), m)


def invariant_config(n: int, k: int, device: torch.device) -> dict:
    """The one config of an [n, k] weight's products of any row count (`KernelSettings.batch_invariant`): the
    table's block config where it lists one, else the default; never the one-row kernel, whose sums run in
    another order, nor cuBLAS, whose kernels change with the row count."""
    return skinny_table(device).get((n, k), {}).get(BLOCK_ROWS) or default_skinny_config(n, k)


# m varies per call (1..16 rows share a binary); specialising on it would also compile m == 1 apart
@triton.jit(do_not_specialize=["m"])
def _skinny_linear(X, W, BIAS, OUT, IDX, m, n, k, k_split, sx, sw, so_split, so_m,
                   ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                   HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, PREFETCH: tl.constexpr, ARGMAX: tl.constexpr,
                   SILU_MUL: tl.constexpr, USE_PDL: tl.constexpr):
    # the row tiles of one weight tile are neighbours in launch order, so they find it in L2
    row0 = tl.program_id(0) * ROWS
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    X += row0.to(tl.int64) * sx
    m -= row0  # rows of this tile and after it
    rows = tl.arange(0, ROWS)
    lo = split * k_split
    hi = tl.minimum(lo + k_split, k)
    if PREFETCH > 0:  # weights never depend on the kernel before: start their stream before waiting on it
        line: tl.constexpr = 1024 // W.dtype.element_ty.primitive_bitwidth  # elements per 128-byte line
        offs = tl.arange(0, PREFETCH * BLOCK_K // line) * line
        ok = (cols[:, None] < n) & (offs[None, :] < hi - lo)
        first = W + cols[:, None].to(tl.int64) * sw + lo + offs[None, :]
        prefetch_l2(tl.where(ok, first, W))
    pdl_prologue(USE_PDL)
    ks = lo + tl.arange(0, BLOCK_K)
    col_ok = cols[:, None] < n
    w_ptrs = W + cols[:, None].to(tl.int64) * sw + ks[None, :]
    x_ptrs = X + rows[:, None] * sx + ks[None, :]
    # EVEN_K (K a multiple of BLOCK_K, so every range holds whole tiles): no K mask, which keeps the weight
    # loads 16-byte vectors
    if ROWS == 1:  # one row: multiply-and-sum, reduced across K once after the loop
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for start in range(lo, hi, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs, mask=col_ok, other=0.0)
                x = tl.load(x_ptrs)
            else:
                k_ok = ks[None, :] + (start - lo) < hi
                w = tl.load(w_ptrs, mask=col_ok & k_ok, other=0.0)
                x = tl.load(x_ptrs, mask=k_ok, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        out = tl.sum(acc, axis=1)[:, None]
    else:  # W tile [BLOCK_N, BLOCK_K] times x^T [BLOCK_K, ROWS]: the weight is the dot's wide operand
        out = tl.zeros([BLOCK_N, ROWS], tl.float32)
        row_ok = rows[:, None] < m
        for start in range(lo, hi, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs, mask=col_ok, other=0.0)
                x = tl.load(x_ptrs, mask=row_ok, other=0.0)
            else:
                k_ok = ks[None, :] + (start - lo) < hi
                w = tl.load(w_ptrs, mask=col_ok & k_ok, other=0.0)
                x = tl.load(x_ptrs, mask=row_ok & k_ok, other=0.0)
            out = tl.dot(w, tl.trans(x), out, input_precision=PRECISION)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
    if HAS_BIAS:
        out += tl.load(BIAS + cols, mask=cols < n, other=0.0).to(tl.float32)[:, None]
    if ARGMAX:  # per row, this column block's largest output as rounded to x's dtype, and its first column
        values = tl.where(col_ok, out.to(X.dtype.element_ty).to(tl.float32), float("-inf"))
        first = tl.program_id(1) * BLOCK_N + tl.argmax(values, axis=0, tie_break_left=True)
        slot = tl.program_id(1) * so_split + row0 + rows
        tl.store(OUT + slot, tl.max(values, axis=0), mask=rows < m)
        tl.store(IDX + slot, first, mask=rows < m)
    elif SILU_MUL:  # (gate j, up j) column pairs -> silu(gate) * up, rounded where the output and _silu_mul round
        pairs = tl.reshape(out.to(OUT.dtype.element_ty).to(tl.float32), [BLOCK_N // 2, 2, ROWS])
        gate, up = tl.split(tl.permute(pairs, [0, 2, 1]))
        silu = (gate / (1.0 + tl.exp(-gate))).to(OUT.dtype.element_ty).to(tl.float32)
        half = tl.program_id(1) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        OUT += row0.to(tl.int64) * so_m
        tl.store(OUT + rows[None, :] * so_m + half[:, None], (silu * up).to(OUT.dtype.element_ty),
                 mask=(half[:, None] < n // 2) & (rows[None, :] < m))
    else:
        OUT += row0.to(tl.int64) * so_m
        tl.store(OUT + split * so_split + rows[None, :] * so_m + cols[:, None], out.to(OUT.dtype.element_ty),
                 mask=col_ok & (rows[None, :] < m))


@triton.jit
def _sum_splits(PART, BIAS, OUT, total, n, splits, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                USE_PDL: tl.constexpr):
    pdl_prologue(USE_PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    acc = tl.load(PART + offs, mask=ok, other=0.0)
    for s in range(1, splits):  # fixed order: deterministic
        acc += tl.load(PART + s * total + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs % n, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _argmax_blocks(VALUES, IDX, OUT, blocks, m, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """Row r's column blocks' maxima reduced: the first block holding the largest value gives its first column."""
    pdl_prologue(USE_PDL)
    row = tl.program_id(0)
    b = tl.arange(0, BLOCK)
    ok = b < blocks
    values = tl.load(VALUES + b * m + row, mask=ok, other=float("-inf"))
    cols = tl.load(IDX + b * m + row, mask=ok, other=0)
    best = tl.argmax(values, axis=0, tie_break_left=True)
    tl.store(OUT + row, tl.sum(tl.where(b == best, cols, 0), axis=0).to(tl.int64))


@triton.jit
def _argmax_columns(LOGITS, VALUES, IDX, n, m, s_m, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """Row r's largest value in one column block of written logits, and its first column (NaN counts as the
    largest, as in torch's argmax)."""
    pdl_prologue(USE_PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    values = tl.load(LOGITS + row.to(tl.int64) * s_m + cols, mask=cols < n, other=float("-inf")).to(tl.float32)
    values = tl.where(values != values, float("inf"), values)
    slot = tl.program_id(1) * m + row
    tl.store(VALUES + slot, tl.max(values, axis=0))
    tl.store(IDX + slot, tl.program_id(1) * BLOCK + tl.argmax(values, axis=0, tie_break_left=True))


# batch_invariant: the same kernel, one binary for every row count (so_split follows the rows, and Triton would
# specialise on it: on 1, or on divisibility by 16, which picks vector widths and so register layouts)
_skinny_linear_any_rows = triton.jit(do_not_specialize=["m", "so_split"])(_skinny_linear.fn)


def _gemm_kernel() -> triton.runtime.JITFunction:
    return _skinny_linear_any_rows if current_settings().batch_invariant else _skinny_linear


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(-1)` of logits [m, n] (unit stride on n) as [m] int64, in two passes over column blocks:
    torch's reduction gives a row one program, which at a verify's 256 rows of a 152k vocabulary read its logits at
    about half the copy bandwidth. The first column holding the largest value wins, as in torch."""
    m, n = logits.shape
    assert m > 0 and logits.stride(1) == 1
    blocks = triton.cdiv(n, ARGMAX_COLUMNS)
    values, cols = _block_maxima(blocks, m, logits.device)
    pdl = pdl_options(logits)
    _argmax_columns[(m, blocks)](logits, values, cols, n, m, logits.stride(0), BLOCK=ARGMAX_COLUMNS, num_warps=4,
                                 **pdl)
    return _argmax_of_blocks(values, cols, pdl)


def _block_maxima(blocks: int, m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scratch for each column block's maximum per row and its first column: [blocks, m] fp32 and int32."""
    return (torch.empty(blocks, m, device=device, dtype=torch.float32),
            torch.empty(blocks, m, device=device, dtype=torch.int32))


def _argmax_of_blocks(values: torch.Tensor, cols: torch.Tensor, pdl: dict) -> torch.Tensor:
    """[m] int64: per row, the first column of the first block holding the largest of its blocks' maxima."""
    blocks, m = values.shape
    out = torch.empty(m, device=values.device, dtype=torch.long)
    _argmax_blocks[(m,)](values, cols, out, blocks, m, BLOCK=triton.next_power_of_2(blocks), num_warps=4, **pdl)
    return out


def skinny_argmax(x: torch.Tensor, weight: torch.Tensor, config: dict) -> torch.Tensor:
    """argmax over the columns of x [m, k] @ weight [n, k]^T per row, as torch's argmax of the logits
    `skinny_linear` would write (the same rounding to x's dtype, the first column on ties), without writing them:
    each GEMM program keeps its column block's maximum per row, and a second kernel reduces those. [m] int64.
    For a greedy step's lm_head; `config` must not split K."""
    m, k = x.shape
    n = weight.shape[0]
    assert m > 0 and config["split_k"] == 1 and weight.shape[1] == k and weight.stride(1) == 1
    if x.stride(1) != 1:
        x = x.contiguous()
    blocks = triton.cdiv(n, config["block_n"])
    values, cols = _block_maxima(blocks, m, x.device)
    pdl = pdl_options(x)
    _gemm_kernel()[(triton.cdiv(m, config["rows"]), blocks, 1)](
        x, weight, weight, values, cols, m, n, k, triton.cdiv(k, config["block_k"]) * config["block_k"], x.stride(0),
        weight.stride(0), values.stride(0), 0, ROWS=config["rows"], BLOCK_N=config["block_n"],
        BLOCK_K=config["block_k"], EVEN_K=k % config["block_k"] == 0, HAS_BIAS=False,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", PREFETCH=prefetch_tiles(pdl),
        ARGMAX=True, SILU_MUL=False, num_warps=config["num_warps"], num_stages=config["num_stages"], **pdl)
    return _argmax_of_blocks(values, cols, pdl)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: dict | None = None, silu_mul: bool = False) -> torch.Tensor:
    """F.linear for x [m, k]: weight [n, k] (unit stride on k), optional bias [n]; returns [m, n] in x's dtype,
    accumulated in fp32, the rows in tiles of config["rows"]. `config` defaults to the table (or the default
    where the table prefers cuBLAS). With `silu_mul` (a fused gate_up projection, its columns (gate j, up j)
    pairs; `config` must not split K) returns [m, n / 2]: norm_rope.silu_mul of that output, bit for bit."""
    out = _gemm(x, weight, bias, config, silu_mul)
    if out.dim() == 3:  # fp32 partial sums, one per K range
        parts, out = out, torch.empty(out.shape[1:], device=x.device, dtype=x.dtype)
        block = 1024
        _sum_splits[(triton.cdiv(out.numel(), block),)](
            parts, bias if bias is not None else parts, out, out.numel(), out.shape[1], parts.shape[0],
            HAS_BIAS=bias is not None, BLOCK=block, num_warps=4, **pdl_options(x))
    return out


def skinny_linear_unsummed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                           config: dict | None = None) -> torch.Tensor:
    """skinny_linear without its reduce: where `config` splits K, the fp32 partial sums [splits, m, n] (the bias
    left out) for a kernel that sums them on its own (norm_rope.add_partials_rms_norm); else the output [m, n]."""
    return _gemm(x, weight, bias, config, silu_mul=False)


def cublas_partials(x: torch.Tensor, weight: torch.Tensor, splits: int) -> torch.Tensor:
    """x [m, k] times weight [n, k]^T as fp32 partial sums over `splits` equal K ranges, [splits, m, n]: one
    strided-batched cuBLAS GEMM for a kernel that sums them on its own (norm_rope.add_partials_rms_norm), where
    cuBLAS's own split-K would sum them in a launch of its own."""
    m, k = x.shape
    part = k // splits
    assert part * splits == k and weight.stride(1) == 1
    if x.stride(1) != 1:
        x = x.contiguous()
    ranges = x.unflatten(1, (splits, part)).transpose(0, 1)  # [splits, m, part]
    weights = weight.unflatten(1, (splits, part)).permute(1, 2, 0)  # [splits, part, n], column-major
    return torch.bmm(ranges, weights, out_dtype=torch.float32)


def _gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: dict | None,
          silu_mul: bool) -> torch.Tensor:
    """The GEMM's launch: its output [m, n] (or [m, n / 2] with `silu_mul`), or its fp32 partial sums [splits, m, n]
    where `config` splits K (the bias is then left to whoever sums them)."""
    m, k = x.shape
    n = weight.shape[0]
    assert m > 0 and weight.shape[1] == k and weight.stride(1) == 1
    if config is None:
        config = skinny_config(n, k, m, x.device)
        config = config if config is not None and "cublas_split_k" not in config else default_skinny_config(n, k)
    rows, block_n, block_k = config["rows"], config["block_n"], config["block_k"]
    assert not silu_mul or (config["split_k"] == 1 and n % 2 == 0), "silu_mul needs whole pairs, one K range"
    if x.stride(1) != 1:
        x = x.contiguous()
    split = config["split_k"]
    k_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k  # whole tiles per K range
    split = triton.cdiv(k, k_split)  # no empty trailing ranges
    out = (torch.empty(m, n // 2 if silu_mul else n, device=x.device, dtype=x.dtype) if split == 1
           else torch.empty(split, m, n, device=x.device, dtype=torch.float32))
    pdl = pdl_options(x)
    _gemm_kernel()[(triton.cdiv(m, rows), triton.cdiv(n, block_n), split)](
        x, weight, bias if bias is not None else weight, out, out, m, n, k, k_split, x.stride(0), weight.stride(0),
        out.stride(0) if split > 1 else 0, out.stride(-2),
        ROWS=rows, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
        HAS_BIAS=bias is not None and split == 1, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        PREFETCH=prefetch_tiles(pdl), ARGMAX=False, SILU_MUL=silu_mul, num_warps=config["num_warps"],
        num_stages=config["num_stages"], **pdl)
    return out
