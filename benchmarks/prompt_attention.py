"""Prompt attention (issue 26): kernels.attention.prompt_attention's tiles, timed beside SDPA's flash and cuDNN
kernels on the prompt shapes a joint prefill runs; the device table's "prompt" entries come from here.

A third of a speculative cell's time at 32 concurrent requests is prefill, and flash's prompt attention was 7% of
it. cuDNN's kernel is faster still but stays out of the engine (design notes, "Prefill"); a Triton kernel has no
process-wide state.

    python -m benchmarks.prompt_attention --out DIR
    python -m benchmarks.prompt_attention --report FILE.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.harness import graph_ms, parser_with_common_flags, run_and_report, run_header
from blockspec.kernels.attention import prompt_attention

# (name, prompts, tokens, heads, kv heads, head dim): Qwen3-4B's, Qwen3.5-4B's and SmolLM2-135M's attention at the
# prefills batch_throughput runs (8 prompts of 512 joining together, one alone) and long prompts
SHAPES = (("qwen3_4b 8x512", 8, 512, 32, 8, 128), ("qwen3_4b 1x512", 1, 512, 32, 8, 128),
          ("qwen3_4b 1x4096", 1, 4096, 32, 8, 128), ("qwen3_4b 1x16384", 1, 16384, 32, 8, 128),
          ("qwen35_4b 8x512", 8, 512, 16, 4, 256), ("smollm2 8x512", 8, 512, 9, 3, 64))
# (block_m, block_n, warps, stages); block_m a multiple of block_n
CONFIGS = tuple({"block_m": m, "block_n": n, "num_warps": w, "num_stages": s} for m, n, w, s in
                ((128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2)))


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
        paths = [(f"triton {c['block_m']}x{c['block_n']}, {c['num_warps']} warps, {c['num_stages']} stages",
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
