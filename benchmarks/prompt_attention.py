"""A candidate for batched prompt attention (issue 26): a Triton causal attention over the static cache, timed beside
SDPA's flash and cuDNN kernels on the prompt shapes a joint prefill runs.

A third of a speculative cell's time at 32 concurrent requests is prefill, and flash's prompt attention is 10% of
it (0.152 ms a Qwen3-4B layer of 8 x 512 tokens, 113 TFLOP/s; cuDNN 0.105, but with cuDNN in the process a lone
prompt's host time grew: design notes, "Prefill"). A kernel of our own has no process-wide state. It moves into
kernels/ only if it wins here.

Each program takes BLOCK_M queries of one (row, query head) and runs the online softmax over its keys, the last
block masked causally; queries read K/V of their GQA head straight from the cache layer [b, kv heads, slots, d], and
the output is written as [b, n, heads * d], what o_proj reads.

    python -m benchmarks.prompt_attention --out DIR
    python -m benchmarks.prompt_attention --report FILE.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.harness import graph_ms, parser_with_common_flags, run_and_report, run_header

# (name, prompts, tokens, heads, kv heads, head dim): Qwen3-4B's and Qwen3.5-4B's attention at the prefills
# batch_throughput runs (8 prompts of 512 joining together, one alone) and a long prompt
SHAPES = (("qwen3_4b 8x512", 8, 512, 32, 8, 128), ("qwen3_4b 1x512", 1, 512, 32, 8, 128),
          ("qwen3_4b 1x4096", 1, 4096, 32, 8, 128), ("qwen35_4b 8x512", 8, 512, 16, 4, 256))
# (BLOCK_M, BLOCK_N, warps, stages); BLOCK_M a multiple of BLOCK_N
CONFIGS = ((128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2))


@triton.jit
def _prompt_attention(Q, K, V, OUT, sq_b, sq_h, sq_n, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, so_b, so_n, n, scale,
                      HEADS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    # every head's last query block first: the longest programs start first, fewer SMs idle at the end
    start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    b = tl.program_id(0) // HEADS
    h = tl.program_id(0) % HEADS
    kvh = h // GROUP
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_n + dims[None, :], mask=rows[:, None] < n, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    k_base = K + b * sk_b + kvh * sk_h
    v_base = V + b * sv_b + kvh * sv_h
    qk_scale = scale * 1.4426950408889634  # exp2 of log2(e) x: exp
    # keys before the block's first query need no mask (BLOCK_M is a multiple of BLOCK_N); the diagonal ones do
    for start_n in range(0, start_m, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + keys[:, None] * sk_l + dims[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + keys[:, None] * sv_l + dims[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    for start_n in range(start_m, tl.minimum(start_m + BLOCK_M, n), BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + keys[:, None] * sk_l + dims[None, :], mask=keys[:, None] < n, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where((keys[None, :] <= rows[:, None]) & (keys[None, :] < n), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + keys[:, None] * sv_l + dims[None, :], mask=keys[:, None] < n, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = OUT + b * so_b + rows[:, None] * so_n + h * D + dims[None, :]
    tl.store(out, (acc / l_i[:, None]).to(OUT.dtype.element_ty), mask=rows[:, None] < n)


def prompt_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     config: tuple[int, int, int, int] = CONFIGS[0]) -> torch.Tensor:
    """Causal attention of prompts q [b, heads, n, d] (any strides, unit on d) from slot 0 over cache layers
    [b, kv heads, slots >= n, d]: [b, n, heads * d] in q's dtype."""
    b, heads, n, d = q.shape
    block_m, block_n, warps, stages = config
    out = torch.empty(b, n, heads * d, device=q.device, dtype=q.dtype)
    _prompt_attention[(b * heads, triton.cdiv(n, block_m))](
        q, k_cache, v_cache, out, q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), n,
        d ** -0.5, HEADS=heads, GROUP=heads // k_cache.shape[1], D=d, BLOCK_M=block_m, BLOCK_N=block_n,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages)
    return out


def sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, backend: SDPBackend) -> torch.Tensor:
    """What layers.attention runs for a prompt, on one backend."""
    n = q.shape[2]
    with sdpa_kernel([backend]):
        out = F.scaled_dot_product_attention(q, k_cache[:, :, :n], v_cache[:, :, :n], is_causal=True,
                                             enable_gqa=k_cache.shape[1] != q.shape[1])
    return out.transpose(1, 2).reshape(q.shape[0], n, -1)


def run(args: argparse.Namespace) -> dict:
    device, record, cells = args.device, run_header(args), []
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    for name, b, n, heads, kv_heads, d in SHAPES[:1] if args.tiny else SHAPES:
        if args.tiny:
            name, n, heads, kv_heads, d = "tiny", 40, 4, 2, 16
        q = torch.randn(b, n, heads, d, device=device, dtype=dtype).transpose(1, 2)  # the engine's q layout
        k_cache, v_cache = (torch.randn(b, kv_heads, n + 64, d, device=device, dtype=dtype) for _ in range(2))
        reference = sdpa(q.float(), k_cache.float(), v_cache.float(), SDPBackend.MATH)
        cell = {"shape": name, "gflop": 4 * b * heads * n * n * d / 2 / 1e9, "paths": {}}
        paths = [(f"triton {c[0]}x{c[1]}, {c[2]} warps, {c[3]} stages",
                  lambda c=c: prompt_attention(q, k_cache, v_cache, c))
                 for c in (CONFIGS[:1] if args.tiny else CONFIGS)]
        if device.startswith("cuda"):
            paths += [(label, lambda backend=backend: sdpa(q, k_cache, v_cache, backend)) for label, backend in
                      (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION))]
        for label, fn in paths:
            try:
                error = ((fn().float() - reference).norm() / reference.norm()).item()
                ms = graph_ms(fn, device)
            except Exception as exc:  # a config that does not fit, a backend that refuses: recorded
                cell["paths"][label] = {"error": str(exc).splitlines()[0][:160]}
                continue
            cell["paths"][label] = {"ms": ms, "tflops": cell["gflop"] / ms, "rel_err": error}
        cells.append(cell)
    record["cells"] = cells
    return record


def report(path: str) -> str:
    r = json.load(open(path))
    lines = [f"Device {r['device']}, torch {r['torch']}, commit {r['commit']}, {r['date']}. Causal prompt attention "
             "over the cache, ms per layer (TFLOP/s; relative error against fp32 math):", ""]
    for cell in r["cells"]:
        lines += [f"{cell['shape']} ({cell['gflop']:.1f} GFLOP):", ""]
        for label, p in cell["paths"].items():
            lines.append(f"- {label}: " + (p["error"] if "error" in p else
                                           f"{p['ms']:.3f} ms ({p['tflops']:.0f}; {p['rel_err']:.1e})"))
        lines.append("")
    return "\n".join(lines).rstrip()


def main() -> None:
    run_and_report(parser_with_common_flags(__doc__), run, report, "prompt_attention")


if __name__ == "__main__":
    main()
