"""Drafts with `layer_types` and `sliding_window` (the Qwen3.5 DFlash drafts), and training them.

A `sliding_attention` layer is causal inside the block and a query at position p sees positions > p - W; a
`full_attention` layer sees the whole context and the whole block (docs/design-notes.md has the evidence). The
reference below spells that rule out as a dense mask over [context, block], the way z-lab's reference builds it.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from blockspec.draft import DraftConfig, DraftModel, load_draft
from blockspec.engine import BatchDecoder, SamplingParams, SpeculativeDecoder
from blockspec.errors import BlockspecError
from blockspec.layers import apply_rope
from blockspec.target import target_from_hf
from blockspec.train.forward import BlockTrainer, block_mask_mod, dense_block_mask, make_attention_mask, \
    masked_attention
from blockspec.train.trainer import TrainConfig, build_draft
from conftest import init_draft_, run_cli
from test_hybrid import prompts_of, tiny_qwen35

# Qwen3.5-4B's pattern (every 4th layer attends) over 16 tiny layers: 8 taps, as the published draft has
TARGET_LAYER_TYPES = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(16)]
TAPS = [1, 3, 5, 7, 9, 11, 13, 14]


def published_like_config(vocab: int, window: int = 6, **changes) -> dict:
    """The published Qwen3.5-4B-DFlash config.json at tiny sizes (5 sliding layers and a full one, block size
    and mask id inside dflash_config, rope_parameters instead of rope_theta)."""
    raw = {
        "architectures": ["DFlashDraftModel"], "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
        "model_type": "qwen3", "attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu",
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 6, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-6, "vocab_size": vocab,
        "max_position_embeddings": 262144, "tie_word_embeddings": False, "num_target_layers": 16,
        "layer_types": ["sliding_attention"] * 5 + ["full_attention"], "sliding_window": window,
        "use_sliding_window": True, "rope_parameters": {"rope_theta": 10000000.0, "rope_type": "default"},
        "dflash_config": {"block_size": 16, "mask_token_id": vocab - 1, "target_layer_ids": TAPS},
        "dtype": "bfloat16", "transformers_version": "4.57.1",
    }
    raw.update(changes)
    return raw


def windowed_draft(window: int, seed: int = 3, **changes) -> DraftModel:
    return init_draft_(DraftModel(DraftConfig.from_dict(published_like_config(64, window, **changes))), seed=seed)


@pytest.fixture(scope="module")
def target():
    return target_from_hf(tiny_qwen35(vocab=64, seed=2, layer_types=TARGET_LAYER_TYPES), name="tiny-qwen3.5-16")


# ---- the published shape loads and drafts ---------------------------------------------------------------------
def test_published_config_loads_and_drafts_losslessly(target, tmp_path):
    raw = published_like_config(64)
    draft = init_draft_(DraftModel(DraftConfig.from_dict(raw)), seed=4)
    save_file({k: v.contiguous() for k, v in draft.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(raw))
    loaded = load_draft(tmp_path)
    cfg = loaded.config
    assert cfg.block_size == 16 and cfg.mask_token_id == 63 and cfg.target_layer_ids == TAPS
    assert [cfg.layer_attention(i) for i in range(6)] == [(True, 6)] * 5 + [(False, None)]
    assert torch.allclose(loaded.rotary.inv_freq[1], torch.tensor(1e7 ** (-2 / 16)))
    assert cfg.to_dict() == raw  # a load -> save round trip keeps the published keys as they were
    prompt = prompts_of([30], 64, seed=1)[0]  # longer than the window
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    ar = SpeculativeDecoder(target, None).generate(prompt, params)
    assert SpeculativeDecoder(target, loaded).generate(prompt, params).token_ids == ar.token_ids
    got = BatchDecoder(target, loaded, max_batch=2, max_len=128).generate([prompt, prompt[:9]], [params, params])
    assert got[0].token_ids == ar.token_ids


@pytest.mark.parametrize("change, needle", [
    ({"layer_types": ["sliding_attention"] * 5 + ["chunked_attention"]}, "'chunked_attention'"),
    ({"layer_types": ["full_attention"] * 5}, "one type per layer"),
    ({"is_causal": False}, "'is_causal'"),
    ({"sliding_window": 0}, "'sliding_window'"),
    ({"dflash_config": {"block_size": 16, "mask_token_id": 1, "target_layer_ids": TAPS, "output_multiplier": 2.0}},
     "output_multiplier"),
], ids=["unknown-type", "wrong-length", "bidirectional-window", "zero-window", "output-multiplier"])
def test_configs_blockspec_does_not_implement_are_refused(tmp_path, change, needle):
    (tmp_path / "config.json").write_text(json.dumps(published_like_config(64, **change)))
    with pytest.raises(BlockspecError) as excinfo:
        load_draft(tmp_path)
    message = str(excinfo.value)
    assert needle in message and "\n" not in message


def test_window_needs_use_sliding_window_as_transformers_reads_it():
    draft = windowed_draft(6, use_sliding_window=False)
    assert draft.config.layer_attention(0) == (True, None)  # still causal in the block, no window
    forced = windowed_draft(6, is_causal=True)
    assert forced.config.layer_attention(5) == (True, None)  # is_causal makes the full layer causal too


# ---- sliding attention == a dense masked reference ------------------------------------------------------------
def reference_draft(draft: DraftModel, embeds: torch.Tensor, features: torch.Tensor, start: int) -> torch.Tensor:
    """One block at positions start..start+B-1 over the context 0..start-1, every layer's attention written with an
    explicit mask over [context, block] (keys at positions 0..start+B-1): a causal layer's query at p sees keys
    <= p, a windowed one keys > p - W, a full one everything."""
    cfg = draft.config
    b, n, _ = embeds.shape
    heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    cos, sin = draft.rotary(torch.arange(start + n)[None], embeds.dtype)
    query_pos = torch.arange(start, start + n)[:, None]
    key_pos = torch.arange(start + n)[None]
    x = embeds
    for index, (layer, ctx) in enumerate(zip(draft.layers, draft.fuse_context(features))):
        attn = layer.self_attn
        causal, window = cfg.layer_attention(index)
        visible = torch.ones(n, start + n, dtype=torch.bool)
        if causal:
            visible &= key_pos <= query_pos
        if window is not None:
            visible &= query_pos - key_pos < window
        h = layer.input_layernorm(x)
        both = torch.cat([ctx, h], dim=1)
        q = apply_rope(attn.q_norm(attn.q_proj(h).view(b, n, heads, d)).transpose(1, 2), cos[..., start:, :],
                       sin[..., start:, :])
        k = apply_rope(attn.k_norm(attn.k_proj(both).view(b, -1, kv_heads, d)).transpose(1, 2), cos, sin)
        v = attn.v_proj(both).view(b, -1, kv_heads, d).transpose(1, 2)
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        scores = (q @ k.transpose(-1, -2) * d ** -0.5).masked_fill(~visible, float("-inf"))
        out = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, n, heads * d)
        x = x + attn.o_proj(out)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return draft.norm(x)


@pytest.mark.parametrize("window", [5, 12, 40], ids=["window-inside-the-block", "window-12", "wider-than-context"])
def test_sliding_attention_equals_a_dense_masked_reference(window):
    draft = windowed_draft(window).eval()
    width = len(TAPS) * 32
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 30, width, generator=gen)
    embeds = torch.randn(2, 8, 32, generator=gen)
    starts = [30, 21]  # ragged rows: each sees only its own context
    with torch.no_grad():
        cache = draft.new_cache(2, 64)
        positions = torch.arange(30)[None].expand(2, -1)
        draft.store_context(features[:, :17], positions[:, :17], cache)  # the context in two pieces
        block_pos = torch.tensor(starts)[:, None] + torch.arange(8)
        # row 1's features past its start land on slots its block overwrites or never sees (as in the engine)
        got = draft(embeds, block_pos, features[:, 17:], positions[:, 17:], cache, kv_len=64)
        for row, start in enumerate(starts):
            expected = reference_draft(draft, embeds[row:row + 1], features[row:row + 1, :start], start)
            torch.testing.assert_close(got[row], expected[0], atol=1e-5, rtol=1e-5)


# ---- training -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal, window", [(False, None), (True, None), (True, 3), (True, 7)])
def test_mask_mod_equals_dense_mask_with_windows(causal, window):
    anchors = torch.tensor([[1, 4, 9, 20], [0, 0, 7, 30], [3, 3, 3, 3]])
    s, block = 24, 4
    dense = dense_block_mask(anchors, s, block, causal, window)[:, 0]
    mod = block_mask_mod(anchors, s, block, causal, window)
    b_idx, q_idx, kv_idx = torch.meshgrid(torch.arange(3), torch.arange(16), torch.arange(s + 16), indexing="ij")
    assert torch.equal(mod(b_idx, torch.zeros_like(b_idx), q_idx, kv_idx), dense)
    # block 2 of row 0 (anchor 9), slot 2 (position 11): context < 9 within the window, its block up to itself
    row = dense[0, 2 * block + 2]
    lowest = 0 if window is None else 11 - window + 1
    assert row[:s].tolist() == [lowest <= p < 9 for p in range(s)]
    own = [s + 2 * block + j for j in range(block)]
    assert row[own].tolist() == [(not causal or j <= 2) and (window is None or 2 - j < window) for j in range(block)]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_windowed_flex_attention_equals_dense():
    torch.manual_seed(0)
    anchors = torch.tensor([[2, 9, 17, 30], [1, 5, 6, 31]])
    q = torch.randn(2, 4, 32, 16)
    k, v = torch.randn(2, 2, 72, 16), torch.randn(2, 2, 72, 16)
    dense = masked_attention(q, k, v, make_attention_mask(anchors, 40, 8, "dense", True, 5), "dense")
    flex = masked_attention(q, k, v, make_attention_mask(anchors, 40, 8, "flex", True, 5), "flex", compiled=False)
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)


def test_training_forward_equals_inference_with_windows_and_gdn_taps(target):
    """Every block of the one-pass training forward == DraftModel.forward on that block alone, for a windowed
    draft on features tapped from GDN and attention layers of a hybrid target."""
    model = target.model
    draft = windowed_draft(5, seed=6)
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, features = model(ids, torch.arange(40)[None].expand(2, -1), model.new_cache(2, 40), tuple(TAPS))
        anchors = torch.tensor([[1, 10, 22, 32], [3, 4, 25, 29]])
        hidden = BlockTrainer(draft, "dense")(features, ids, anchors, model.embed_tokens.weight, block_size=8)
        for r in range(2):
            for n, p in enumerate(anchors[r].tolist()):
                embeds = draft.embed_block(ids[r:r + 1, p], model.embed_tokens, 8)
                served = draft(embeds, (p + torch.arange(8))[None], features[r:r + 1, :p], torch.arange(p)[None],
                               draft.new_cache(1, 64))
                torch.testing.assert_close(hidden[r, n * 8:(n + 1) * 8], served[0], rtol=1e-5, atol=1e-5)


def test_train_config_sliding_window(target):
    draft = build_draft(target, TrainConfig(num_layers=3, block_size=8, sliding_window=8))
    raw = draft.config.raw
    assert raw["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention"]
    assert (raw["sliding_window"], raw["use_sliding_window"]) == (8, True)
    with pytest.raises(BlockspecError, match="at least 2"):
        build_draft(target, TrainConfig(num_layers=1, sliding_window=8))


def test_cli_trains_a_windowed_draft_for_a_hybrid_target(capsys, tmp_path):
    hf = tiny_qwen35(vocab=64, seed=2)
    hf.save_pretrained(tmp_path / "target")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in prompts_of([5, 9, 3, 12, 7, 6], 64)))
    code, out, err = run_cli(capsys, "train", "--target", tmp_path / "target", "--data", prompts, "--output",
                             tmp_path / "run", "--num-layers", "2", "--block-size", "8", "--sliding-window", "4",
                             "--intermediate-size", "64", "--batch-size", "3", "--num-anchors", "4", "--seq-len", "48",
                             "--max-new-tokens", "16", "--steps", "3", "--mask-token-id", "3", "--target-layer-ids",
                             "0,2,4", "--no-progress", "--device", "cpu", "--eval-data", f"{prompts}:2")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["finished"] and summary["steps"] == 3 and summary["tau"] >= 1.0
    draft = load_draft(tmp_path / "run" / "draft", dtype=torch.float32)  # exported in bf16
    assert [draft.config.layer_attention(i) for i in range(2)] == [(True, 4), (False, None)]
    target = target_from_hf(hf)
    prompt = prompts_of([10], 64, seed=3)[0]
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    assert (SpeculativeDecoder(target, draft).generate(prompt, params).token_ids
            == SpeculativeDecoder(target, None).generate(prompt, params).token_ids)

