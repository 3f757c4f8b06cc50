"""What the benchmark scripts share: the common flags, the commit, an optional freshly swept skinny-GEMM
table, the Qwen3-4B and Qwen3.5-4B shapes and drafts they time, the copy bandwidth and dense matmul rate behind
every floor, hand-captured CUDA graphs of a step and its parts, the results JSON and its markdown report; and the
tiny bigram target that the FSDP check (here) and the training tests (tests/test_train.py) train drafts for."""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
import zlib
from pathlib import Path
from typing import Callable, Iterator

import torch

from blockspec.bench.report import git_commit
from blockspec.kernels import use_settings
from blockspec.draft import DraftConfig, DraftModel, new_draft
from blockspec.engine import BatchDecoder
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
    return random_draft(dcfg, device, dtype)


def random_draft(dcfg: DraftConfig, device: str, dtype: torch.dtype) -> DraftModel:
    return new_draft(dcfg).to_empty(device=device).to(dtype).init_weights(seed=1).requires_grad_(False)


def qwen35_4b_hf_config(tiny: bool) -> object:
    """The Qwen3.5-4B text model's shape (issue 25) as a transformers Qwen3_5TextConfig: hidden 2560, 32 layers
    (every 4th full attention, 16/4 heads of 256, partial rotary 0.25, theta 1e7; the others Gated DeltaNet with
    16 key / 32 value heads of 128, conv kernel 4), intermediate 9216, vocab 248,320, tied. The HF peer is built
    from it and blockspec's target config derived from it, so the two cannot differ."""
    from transformers import Qwen3_5TextConfig

    if tiny:
        shape = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                     linear_key_head_dim=16, linear_value_head_dim=16)
    else:
        shape = dict(vocab_size=248320, hidden_size=2560, intermediate_size=9216, num_hidden_layers=32,
                     num_attention_heads=16, num_key_value_heads=4, head_dim=256, linear_num_key_heads=16,
                     linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128)
    return Qwen3_5TextConfig(**shape, linear_conv_kernel_dim=4, tie_word_embeddings=True,
                             max_position_embeddings=262144, eos_token_id=None, bos_token_id=None, pad_token_id=None,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25})


def qwen35_4b_config(tiny: bool) -> TargetConfig:
    hf = qwen35_4b_hf_config(tiny)
    first_attention = hf.layer_types.index("full_attention")  # its q/k norms tell from_hf they exist
    return TargetConfig.from_hf(hf, {f"model.layers.{first_attention}.self_attn.q_norm.weight"})


def qwen35_draft_config(cfg: TargetConfig, tiny: bool, block_size: int = 16) -> DraftConfig:
    """The published Qwen3.5-4B-DFlash draft's shape (issue 25): 6 layers, 5 sliding (window 4096) then one full,
    32/8 heads of 128, intermediate 9216, 8 taps [1, 5, ..., 29], mask id 248077."""
    if tiny:
        layers, heads, kv_heads, head_dim, inter, window, mask = 2, 4, 2, 16, 128, 8, cfg.vocab_size - 1
        ids = [1, 3, 5]
    else:
        layers, heads, kv_heads, head_dim, inter, window, mask = 6, 32, 8, 128, 9216, 4096, 248077
        ids = list(range(1, 30, 4))
    return DraftConfig.create("dflash", hidden_size=cfg.hidden_size, intermediate_size=inter, num_layers=layers,
                              num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=cfg.vocab_size,
                              num_target_layers=cfg.num_layers, block_size=block_size, target_layer_ids=ids,
                              mask_token_id=mask, rope_theta=1e7, sliding_window=window, use_sliding_window=True,
                              layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"])


def qwen35_draft(cfg: TargetConfig, device: str, dtype: torch.dtype, tiny: bool, block_size: int = 16) -> DraftModel:
    """`qwen35_draft_config`'s draft with random weights."""
    return random_draft(qwen35_draft_config(cfg, tiny, block_size), device, dtype)


def gdn_kernels(device: str) -> str:
    """Which Gated DeltaNet kernels a prefill runs, blockspec's as transformers' Qwen3.5: flash-linear-attention's
    where it imports (as transformers tries when its Qwen3.5 module loads) and the inputs are on CUDA, else the
    torch form."""
    if not device.startswith("cuda"):
        return "torch (CPU)"
    try:
        import fla
        import fla.ops.gated_delta_rule  # noqa: F401
    except Exception as exc:  # what stopped the import is the answer
        return f"torch (flash-linear-attention: {type(exc).__name__}: {str(exc)[:80]})"
    return f"flash-linear-attention {getattr(fla, '__version__', '?')}"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str, gib: float) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus written (median of 20; on CUDA timed by
    events on the device, so that a host sync's latency does not count as copy time)."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    times = []
    for i in range(25):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - t
        if i >= 5:
            times.append(seconds)
    return 2 * src.numel() * 2 / statistics.median(times)


def matmul_rate(device: str, n: int = 8192) -> float:
    """FLOP/s of an n x n x n matmul on random data (median of 10 after 3 warm-ups): bf16 on CUDA, the dense rate
    behind every FLOP floor; fp32 on the CPU (a logic check)."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = []
    for i in range(13):
        sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


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


def graph_ms(fn: Callable[[], object], device: str, replays: int = 20, rounds: int = 7) -> float:
    """Median ms of one replay of `fn` captured as a CUDA graph (CUDA events over `replays` back-to-back
    replays, median of `rounds`); on the CPU (a logic check) of one eager call."""
    if not device.startswith("cuda"):
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    graph, _ = capture_graph(fn)
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    return statistics.median(times)


def graph_kernels(fn: Callable[[], object], device: str, replays: int = 5, top: int = 12) -> list[dict]:
    """Where one replay of `fn` (captured as a CUDA graph) spends its device time: the `top` kernels by summed
    duration, per replay. On the CPU (a logic check) the CPU ops of one eager call stand in for kernels."""
    if not device.startswith("cuda"):
        return profiled_kernels(fn, device, 1, top)
    graph, _ = capture_graph(fn)
    graph.replay()
    sync(device)
    return profiled_kernels(graph.replay, device, replays, top)


def profiled_kernels(fn: Callable[[], object], device: str, calls: int = 1, top: int | None = 12) -> list[dict]:
    """The `top` kernels (None: all) of `calls` calls of `fn` by summed device time, per call (on the CPU, CPU ops)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    rows = []
    for evt in prof.key_averages():
        us = (evt.self_device_time_total if cuda else evt.self_cpu_time_total) / calls
        if us > 0:
            rows.append({"kernel": evt.key[:80], "us": us, "launches": evt.count / calls})
    return sorted(rows, key=lambda r: -r["us"])[:top]


@contextlib.contextmanager
def restored(engine: BatchDecoder, n: int) -> Iterator[None]:
    """Rows [0, n) of `engine` as they were before the block: a step or pass replayed for timing advances them
    (the positions, the proposer's rows, a hybrid target's recurrent state; K/V slots past a row's position are
    rewritten before anyone reads them)."""
    state = [engine.last_token[:n], engine.start[:n], *engine.target_cache.rows(0, n).state()]
    if engine.proposer is not None:
        state += engine.proposer.state(n)
    saved = [t.clone() for t in state]
    try:
        yield
    finally:
        for live, copy in zip(state, saved):
            live.copy_(copy)


def step_ms(engine: BatchDecoder, n: int, block: int, device: str, replays: int = 10, rounds: int = 5) -> float:
    """The whole greedy step of live rows [0, n) (`greedy_step`: draft, verify, acceptance, bookkeeping; no host
    read) as a CUDA graph of its own. Each replay moves a row by its accepted drafts + 1: force acceptance to 0 so
    that the replays stay within the rows' slack."""
    with torch.inference_mode(), restored(engine, n):
        return graph_ms(lambda: engine.greedy_step(n, block, engine.max_len), device, replays, rounds)


def target_pass(engine: BatchDecoder, n: int, block: int) -> Callable[[], torch.Tensor]:
    """Live rows [0, n)'s target pass over `block` random tokens at their next block's positions (taps included
    when drafting), without the lm_head: returns the final-normed hidden states. Time it inside `restored`."""
    model = engine.target.model
    block_pos = engine.start[:n, None] + engine.offsets[None, :block]
    block_ids = torch.randint(0, model.config.vocab_size, (n, block), device=block_pos.device)
    cache = engine.target_cache.rows(0, n)
    taps = engine.tap_ids if block > 1 else ()
    return lambda: model(block_ids, block_pos, cache, taps, kv_len=engine.max_len)[0]


def weight_gemms(model: torch.nn.Module, rows: int) -> tuple[Callable[[], None], int, int]:
    """Every weight GEMM of `model`'s layers on `rows` random rows, with the engine's GEMM kernels (`layers.linear`)
    and nothing else, and those weights' bytes and elements: the part of a pass that only the GEMM kernels decide."""
    from blockspec.layers import linear

    weights = [m.weight for m in model.layers.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {k: torch.randn(rows, k, device=weights[0].device, dtype=weights[0].dtype)
              for k in {w.shape[1] for w in weights}}

    def run() -> None:
        for w in weights:
            linear(inputs[w.shape[1]], w)

    return run, sum(w.numel() * w.element_size() for w in weights), sum(w.numel() for w in weights)


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


def python_loop_ms() -> float:
    """A pure-Python loop's milliseconds: the host's speed, which differed 1.9x between two device leases on one day
    (batch_probe-20261206-120703.json and batch_probe-20261206-123206.json: 180 and 93 ms), and which host-bound
    figures (a lone prompt's prefill, small models' steps) follow."""
    started = time.perf_counter()
    sum(i * i for i in range(2_000_000))
    return (time.perf_counter() - started) * 1e3


def parser_with_common_flags(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small shapes, for a logic check on the CPU")
    parser.add_argument("--smollm2", default=None, help="SmolLM2-135M-Instruct .gguf: also time it with real weights")
    parser.add_argument("--skinny-table", nargs="+", default=None,
                        help="gemm_shapes.py --skinny results JSONs: run with their winners in the skinny table")
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
        commit = git_commit() or "unknown"
        args.commit = commit[:7] if len(commit) == 40 else commit  # a full hash, shortened; "abc1234-dirty" kept
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
