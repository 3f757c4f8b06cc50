"""What the benchmark scripts share: the common flags, the commit, an optional freshly swept skinny-GEMM
table, the Qwen3-4B shapes and drafts they time, the copy bandwidth behind every floor, a hand-captured CUDA
graph, the results JSON and its markdown report; and the tiny bigram target that the FSDP check (here) and the
training tests (tests/test_train.py) train drafts for."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import zlib
from pathlib import Path
from typing import Callable

import torch

from blockspec.bench.report import git_commit
from blockspec.kernels import use_settings
from blockspec.draft import DraftConfig, DraftModel, new_draft
from blockspec.target import Target, TargetConfig, target_from_hf


def qwen3_4b_config(tiny: bool) -> TargetConfig:
    if tiny:
        return TargetConfig("qwen3", 512, 64, 128, 6, 4, 2, 16, 1e-6, True, False, False, False, True,
                            (None,) * 6, 8192)
    return TargetConfig("qwen3", 151936, 2560, 9728, 36, 32, 8, 128, 1e-6, True, False, False, False, True,
                        (None,) * 36, 40960)


def make_draft(kind: str, cfg: TargetConfig, device: str, dtype: torch.dtype, tiny: bool) -> DraftModel:
    layers, ids = (5, None) if kind == "dflash" else (7, [1, 5, 9, 13, 17, 21, 25, 29, 33])
    if tiny:
        layers, ids = (2, None) if kind == "dflash" else (3, [0, 2, 4])
    dcfg = DraftConfig.create(kind, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                              num_layers=layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                              head_dim=cfg.head_dim, vocab_size=cfg.vocab_size, num_target_layers=cfg.num_layers,
                              block_size=16, target_layer_ids=ids, mask_token_id=cfg.vocab_size - 1)
    return new_draft(dcfg).to_empty(device=device).to(dtype).init_weights(seed=1).requires_grad_(False)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str, gib: float) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus written (median of 20)."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    times = []
    for i in range(25):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if i >= 5:
            times.append(time.perf_counter() - t)
    return 2 * src.numel() * 2 / statistics.median(times)


def capture_graph(fn: Callable[[], object], warmups: int = 2) -> tuple[torch.cuda.CUDAGraph, object]:
    """`fn` captured in one CUDA graph after warm-up runs on a side stream (as the engine captures its step);
    returns the graph and what the captured call returned (its static output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def write_record(record: dict, out_dir: str | Path, name: str, report: Callable[[str], str]) -> Path:
    """Write OUT/NAME-<time>.json and print its markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=1))
    print(report(str(path)))
    print(f"wrote {path}")
    return path


def run_header(args: argparse.Namespace) -> dict:
    """What every results JSON starts with: the device, torch, the commit and the time of the run."""
    cuda = args.device.startswith("cuda")
    return {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "torch": torch.__version__, "commit": args.commit, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def parser_with_common_flags(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small shapes, for a logic check on the CPU")
    parser.add_argument("--smollm2", default=None, help="SmolLM2-135M-Instruct .gguf: also time it with real weights")
    parser.add_argument("--skinny-table", default=None,
                        help="a gemm_shapes.py --skinny results JSON: run with its winners in the skinny table")
    parser.add_argument("--commit", default=None, help="default: the checkout's ($BLOCKSPEC_GIT_COMMIT without .git)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--report", default=None, help="render a results JSON as markdown and exit")
    return parser


def run_and_report(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], dict],
                   report: Callable[[str], str], name: str) -> None:
    """Parse, run, write the record and print its markdown (or only render --report FILE)."""
    args = parser.parse_args()
    if args.report:
        print(report(args.report))
        return
    if args.commit is None:
        args.commit = (git_commit() or "unknown")[:7]
    skinny = None
    if args.skinny_table:
        from benchmarks.gemm_shapes import load_winners

        skinny = load_winners(args.skinny_table, torch.device(args.device))
    with use_settings(skinny_table=skinny):  # None: the device's table
        record = run(args)
    record["skinny_table"] = ({f"{n},{k}": v for (n, k), v in skinny.items()} if skinny is not None
                              else "the device's (blockspec/kernels/tables)")
    write_record(record, args.out, name, report)


def seeded_normal(seed: int, name: str, shape: torch.Size) -> torch.Tensor:
    """Standard normal values that depend only on (seed, name, shape): neither on a library's own weight init
    nor on the order in which a model registers its parameters, so a new transformers cannot change them."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=gen)


def bigram_target(vocab: int = 64, hidden: int = 64, layers: int = 3, seed: int = 0,
                  noise: float = 0.02) -> tuple[Target, torch.Tensor, torch.nn.Module]:
    """A tiny Llama whose greedy next token is perm[current token]: logits[j] = <e_x, e_inv[j]> peaks at
    j = perm[x] (random embeddings in 64 dims: a margin of ~64 against noise of ~8)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=False, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    hf = LlamaForCausalLM(cfg).eval()
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(seeded_normal(seed, name, param.shape) * (1.0 if "embed_tokens" in name else noise))
        hf.lm_head.weight.copy_(hf.model.embed_tokens.weight[torch.argsort(perm)])
    return target_from_hf(hf, name=f"tiny-bigram-{seed}"), perm, hf


def random_prompts(vocab: int, n: int, seed: int) -> list:
    """n prompts of 4-11 random token ids (no tokenizer needed)."""
    from blockspec.train.data import Prompt

    gen = torch.Generator().manual_seed(seed)
    return [Prompt(ids=torch.randint(0, vocab, (int(torch.randint(4, 12, (1,), generator=gen)),),
                                     generator=gen).tolist(), source="random") for _ in range(n)]
