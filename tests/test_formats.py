"""Draft checkpoint format (SPEC section 4): round trips, both RoPE layouts, shards, and one-line refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from blockspec.draft import (DraftConfig, DraftModel, check_draft_fits_target, default_target_layer_ids, load_draft,
                             new_draft, new_draft_for_target, save_draft)
from blockspec.engine import SpeculativeDecoder
from blockspec.errors import BlockspecError
from blockspec.target import load_target

REPO_ROOT = Path(__file__).resolve().parent.parent

# Training keys AngelSlim writes, z-lab's auto_map, and a made-up nested key: all must survive a round trip.
EXTRA_KEYS = {"num_anchors": 512, "loss_decay_gamma": 7.0, "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
              "transformers_version": "4.57.1", "x_blockspec_test": {"nested": [1, 2, {"k": None}]}}


def make_draft(zoo, arch: str = "dflash", mask_embedding: bool = False, seed: int = 1, **kwargs) -> DraftModel:
    kwargs.setdefault("num_layers", 2)
    kwargs.setdefault("block_size", 8)
    return zoo.custom_draft("qwen3", arch, seed=seed, mask_embedding=mask_embedding, **kwargs)


def spec_tensor_names(arch: str, num_layers: int, mask_embedding: bool = False) -> set[str]:
    """The published tensor names, exactly as SPEC section 4 lists them (no prefix)."""
    names = {"norm.weight", "hidden_norm.weight"}
    for i in range(num_layers):
        p = f"layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        names |= {p + f"self_attn.{n}_proj.weight" for n in "qkvo"}
        names |= {p + f"self_attn.{n}_norm.weight" for n in "qk"}
        names |= {p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
        if arch == "dflare":
            names |= {p + "self_attn.k_proj_target.weight", p + "self_attn.v_proj_target.weight"}
    names.add("layer_fusion_weights" if arch == "dflare" else "fc.weight")
    if mask_embedding:
        names.add("mask_embedding")
    return names


def one_line_error(excinfo, *needles: str) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message.strip(), f"not one line: {message!r}"
    for needle in needles:
        assert needle in message, f"{needle!r} not named in: {message}"
    return message


def draft_outputs(draft: DraftModel, embed: torch.nn.Embedding, seed: int = 0) -> torch.Tensor:
    """Hidden states of one draft call on random features (deterministic for a given draft)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = draft.config
    ctx = 9
    features = torch.randn(1, ctx, len(cfg.target_layer_ids) * cfg.hidden_size, generator=gen)
    positions = torch.arange(ctx + cfg.block_size)[None] + 300  # far enough out for RoPE scaling to matter
    cache = draft.new_cache(1, 400)
    with torch.no_grad():
        embeds = draft.embed_block(torch.tensor([5]), embed)
        return draft(embeds, positions[:, ctx:], features, positions[:, :ctx], cache)


def edit_config(directory: Path, edit) -> None:
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def edit_tensors(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


# ---- round trips ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,mask_embedding", [("dflash", False), ("dflare", False), ("dflash", True),
                                                 ("dflare", True)])
def test_save_load_is_bit_identical(zoo, tmp_path, arch, mask_embedding):
    draft = make_draft(zoo, arch, mask_embedding, **EXTRA_KEYS)
    save_draft(draft, tmp_path / "a")
    on_disk = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert set(on_disk) == spec_tensor_names(arch, 2, mask_embedding)
    loaded = load_draft(tmp_path / "a")
    assert loaded.config.kind == arch
    assert (loaded.mask_embedding is not None) == mask_embedding
    original_state, loaded_state = draft.state_dict(), loaded.state_dict()
    assert set(original_state) == set(loaded_state)
    for name, tensor in original_state.items():
        assert loaded_state[name].dtype == tensor.dtype, name
        assert torch.equal(loaded_state[name], tensor), name
    written = json.loads((tmp_path / "a" / "config.json").read_text())
    assert written == draft.config.to_dict() == loaded.config.to_dict()
    for key, value in EXTRA_KEYS.items():
        assert written[key] == value
    assert torch.equal(loaded.rotary.inv_freq, draft.rotary.inv_freq)
    embed = zoo.target("qwen3").target.model.embed_tokens
    assert torch.equal(draft_outputs(loaded, embed), draft_outputs(draft, embed))
    # a second round trip writes the same bytes
    save_draft(loaded, tmp_path / "b")
    assert (tmp_path / "a" / "config.json").read_bytes() == (tmp_path / "b" / "config.json").read_bytes()
    again = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert set(again) == set(on_disk) and all(torch.equal(again[k], on_disk[k]) for k in on_disk)


def test_unknown_config_keys_in_a_foreign_file_survive(zoo, tmp_path):
    save_draft(make_draft(zoo), tmp_path / "a")
    edit_config(tmp_path / "a", lambda raw: raw.update({"loss_decay_gamma": 4, "some_future_key": [1, "x"]}))
    before = json.loads((tmp_path / "a" / "config.json").read_text())
    save_draft(load_draft(tmp_path / "a"), tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text()) == before


@pytest.mark.parametrize("arch", ["dflash", "dflare"])
def test_golden_reference_checkpoints_use_spec_names(golden_dir, arch):
    cases = [p for p in sorted(golden_dir.glob("*/case.json")) if json.loads(p.read_text())["arch"] == arch]
    if not cases:
        pytest.skip(f"no {arch} golden case under {golden_dir}")
    for case in cases:
        draft_dir = case.parent / "draft"
        config = json.loads((draft_dir / "config.json").read_text())
        names = set(load_file(str(draft_dir / "model.safetensors")))
        assert names == spec_tensor_names(arch, config["num_hidden_layers"])
        draft = load_draft(draft_dir)
        assert draft.config.to_dict() == config  # nothing lost, nothing added


def test_architecture_aliases(zoo, tmp_path):
    save_draft(make_draft(zoo, "dflash"), tmp_path)
    edit_config(tmp_path, lambda raw: raw.update(architectures=["QwenDFlashDraftModel"]))
    assert load_draft(tmp_path).config.kind == "dflash"


def test_ignored_exporter_tensors_are_dropped(zoo, tmp_path):
    draft = make_draft(zoo)
    save_draft(draft, tmp_path)

    def add(tensors):
        tensors["embed_tokens.weight"] = torch.zeros(320, 64)
        tensors["lm_head.weight"] = torch.zeros(320, 64)
        tensors["rotary_emb.inv_freq"] = torch.zeros(8)
    edit_tensors(tmp_path, add)
    loaded = load_draft(tmp_path)
    assert set(loaded.state_dict()) == set(draft.state_dict())
    assert torch.equal(loaded.rotary.inv_freq, draft.rotary.inv_freq)


# ---- RoPE ---------------------------------------------------------------------------------------------------
def _plain_inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def test_rope_theta_and_rope_parameters_layouts(zoo, tmp_path):
    draft = make_draft(zoo, rope_theta=5e5)
    save_draft(draft, tmp_path / "old")
    save_draft(draft, tmp_path / "new")

    def to_new_layout(raw):
        theta = raw.pop("rope_theta")
        raw.pop("rope_scaling")
        raw["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    edit_config(tmp_path / "new", to_new_layout)
    assert "rope_theta" not in json.loads((tmp_path / "new" / "config.json").read_text())
    old, new = load_draft(tmp_path / "old"), load_draft(tmp_path / "new")
    expected = _plain_inv_freq(5e5, 16)
    assert old.rotary.inv_freq.dtype == new.rotary.inv_freq.dtype == torch.float32
    assert torch.equal(old.rotary.inv_freq, expected)
    assert torch.equal(new.rotary.inv_freq, expected)
    assert old.rotary.attention_scaling == new.rotary.attention_scaling == 1.0
    assert not torch.allclose(expected, _plain_inv_freq(1e6, 16))  # theta really was read, not defaulted
    embed = zoo.target("qwen3").target.model.embed_tokens
    assert torch.equal(draft_outputs(old, embed), draft_outputs(new, embed))


YARN = {"factor": 4.0, "original_max_position_embeddings": 1024}


def _to_yarn(raw: dict, layout: str) -> dict:
    raw = dict(raw)
    if layout == "rope_scaling/rope_type":
        raw["rope_scaling"] = {"rope_type": "yarn", **YARN}
    elif layout == "rope_scaling/type":  # the older spelling
        raw["rope_scaling"] = {"type": "yarn", **YARN}
    else:  # transformers 5 layout
        raw["rope_parameters"] = {"rope_type": "yarn", "rope_theta": raw.pop("rope_theta"), **YARN}
        raw.pop("rope_scaling")
    return raw


@pytest.mark.parametrize("layout", ["rope_scaling/rope_type", "rope_scaling/type", "rope_parameters"])
def test_yarn_rope_scaling_is_honoured(zoo, layout):
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    default = make_draft(zoo, max_position_embeddings=4096)
    yarn = DraftModel(DraftConfig.from_dict(_to_yarn(default.config.to_dict(), layout)))
    yarn.load_state_dict(default.state_dict())  # same weights, only the RoPE differs
    assert not torch.allclose(yarn.rotary.inv_freq, default.rotary.inv_freq)
    # the reference: transformers' own Qwen3 rotary embedding for the same settings
    reference = Qwen3RotaryEmbedding(Qwen3Config(hidden_size=64, num_attention_heads=4, head_dim=16,
                                                 max_position_embeddings=4096,
                                                 rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, **YARN}))
    torch.testing.assert_close(yarn.rotary.inv_freq, reference.inv_freq.float(), atol=0, rtol=1e-6)
    assert yarn.rotary.attention_scaling == pytest.approx(0.1 * math.log(4.0) + 1.0)
    assert yarn.rotary.attention_scaling == pytest.approx(reference.attention_scaling)
    embed = zoo.target("qwen3").target.model.embed_tokens
    assert not torch.allclose(draft_outputs(yarn, embed), draft_outputs(default, embed), atol=1e-4)


def test_yarn_draft_checkpoint_loads(zoo, tmp_path):
    default = make_draft(zoo, max_position_embeddings=4096)
    in_memory = DraftModel(DraftConfig.from_dict(_to_yarn(default.config.to_dict(), "rope_scaling/rope_type")))
    save_draft(default, tmp_path)
    edit_config(tmp_path, lambda raw: raw.update(_to_yarn(raw, "rope_scaling/rope_type")))
    loaded = load_draft(tmp_path)
    assert torch.equal(loaded.rotary.inv_freq, in_memory.rotary.inv_freq)
    assert loaded.rotary.attention_scaling == in_memory.rotary.attention_scaling


def test_inv_freq_stays_fp32_when_loaded_in_half_precision(zoo, tmp_path):
    """SPEC 2: inv_freq is kept in fp32; cos/sin are computed in fp32 and only then cast."""
    draft = make_draft(zoo)
    save_draft(draft, tmp_path)
    fp32 = load_draft(tmp_path).rotary.inv_freq
    bf16 = load_draft(tmp_path, dtype=torch.bfloat16)
    assert bf16.norm.weight.dtype == torch.bfloat16
    assert bf16.rotary.inv_freq.dtype == torch.float32, "inv_freq was cast to bf16: RoPE angles drift with position"
    assert torch.equal(bf16.rotary.inv_freq, fp32)


# ---- sharded and pickle checkpoints -------------------------------------------------------------------------
@pytest.mark.parametrize("arch, mask_embedding", [("dflash", False), ("dflare", True)])
def test_new_draft_allocates_nothing_and_keeps_a_real_rope_table(zoo, arch, mask_embedding):
    """The one way a draft is built without allocating its weights twice: parameters on meta, the RoPE table
    real; both ways to give it weights (a state assigned, or storage then init_weights) serve as a draft built
    directly does."""
    direct = make_draft(zoo, arch, mask_embedding=mask_embedding)
    embed = zoo.target("qwen3").target.model.embed_tokens
    empty = new_draft(direct.config, mask_embedding=mask_embedding)
    assert all(p.is_meta for p in empty.parameters())
    assert torch.equal(empty.rotary.inv_freq, direct.rotary.inv_freq)
    empty.load_state_dict(direct.state_dict(), assign=True)
    torch.testing.assert_close(draft_outputs(empty, embed), draft_outputs(direct, embed), rtol=0, atol=0)
    initialised = new_draft(direct.config, mask_embedding=mask_embedding).to_empty(device="cpu").init_weights(3)
    reference = DraftModel(direct.config, mask_embedding=mask_embedding).init_weights(3)
    torch.testing.assert_close(draft_outputs(initialised, embed), draft_outputs(reference, embed), rtol=0, atol=0)
    fresh = new_draft_for_target(zoo.target("qwen3").config, "dflare", num_layers=2, seed=3, std=0.5)
    assert 0.45 < float(fresh.layers[0].mlp.up_proj.weight.detach().std()) < 0.55  # one init, the std asked for


def test_sharded_checkpoint_loads(zoo, tmp_path):
    draft = make_draft(zoo, "dflare", mask_embedding=True)
    save_draft(draft, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    state = {k: v.detach().contiguous() for k, v in draft.state_dict().items()}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in keys})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = load_draft(tmp_path)
    loaded_state = loaded.state_dict()
    assert set(loaded_state) == set(state)
    assert all(torch.equal(loaded_state[k], state[k]) for k in state)
    # a shard listed in the index but missing is named
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(BlockspecError) as excinfo:
        load_draft(tmp_path)
    one_line_error(excinfo, "model-00002-of-00002.safetensors")


def test_pickle_only_checkpoint_is_refused(zoo, tmp_path):
    draft = make_draft(zoo)
    draft.config.save(tmp_path)
    torch.save(draft.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(BlockspecError) as excinfo:
        load_draft(tmp_path)
    one_line_error(excinfo, "safetensors", "pytorch_model.bin")


# ---- refusals -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["hidden_size", "architectures", "block_size", "num_hidden_layers",
                                 "intermediate_size", "num_attention_heads"])
def test_missing_required_config_key(zoo, tmp_path, key):
    save_draft(make_draft(zoo), tmp_path)
    edit_config(tmp_path, lambda raw: raw.pop(key))
    with pytest.raises(BlockspecError) as excinfo:
        load_draft(tmp_path)
    one_line_error(excinfo, repr(key))


def test_unknown_architecture(zoo, tmp_path):
    save_draft(make_draft(zoo), tmp_path)
    edit_config(tmp_path, lambda raw: raw.update(architectures=["LlamaForCausalLM"]))
    with pytest.raises(BlockspecError) as excinfo:
        load_draft(tmp_path)
    one_line_error(excinfo, "architectures", "LlamaForCausalLM")


def test_config_that_is_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(BlockspecError) as excinfo:
        load_draft(tmp_path)
    one_line_error(excinfo, "config.json")


@pytest.mark.parametrize("arch,tensor", [("dflash", "norm.weight"), ("dflash", "fc.weight"),
                                         ("dflare", "layers.1.self_attn.k_proj_target.weight"),
                                         ("dflare", "layer_fusion_weights")])
def test_missing_tensor(zoo, tmp_path, arch, tensor):
    save_draft(make_draft(zoo, arch), tmp_path)
    edit_tensors(tmp_path, lambda tensors: tensors.pop(tensor))
    with pytest.raises(BlockspecError) as excinfo:
        load_draft(tmp_path)
    one_line_error(excinfo, repr(tensor))


@pytest.mark.parametrize("arch,tensor", [("dflash", "fc.weight"), ("dflare", "layer_fusion_weights"),
                                         ("dflash", "layers.0.self_attn.q_proj.weight")])
def test_wrong_tensor_shape(zoo, tmp_path, arch, tensor):
    save_draft(make_draft(zoo, arch), tmp_path)

    def reshape(tensors):
        t = tensors[tensor]
        tensors[tensor] = torch.zeros(t.shape[0], t.shape[1] + 1)
    edit_tensors(tmp_path, reshape)
    with pytest.raises(BlockspecError) as excinfo:
        load_draft(tmp_path)
    one_line_error(excinfo, repr(tensor))


def test_tensor_of_the_other_architecture(zoo, tmp_path):
    save_draft(make_draft(zoo, "dflash"), tmp_path)
    edit_tensors(tmp_path, lambda t: t.update({"layers.0.self_attn.k_proj_target.weight": torch.zeros(32, 64)}))
    with pytest.raises(BlockspecError) as excinfo:
        load_draft(tmp_path)
    one_line_error(excinfo, "layers.0.self_attn.k_proj_target.weight", "architectures")


def _refused_by_target(zoo, draft, *needles):
    tiny = zoo.target("qwen3")
    with pytest.raises(BlockspecError) as excinfo:
        check_draft_fits_target(draft, tiny.config)
    one_line_error(excinfo, *needles)
    with pytest.raises(BlockspecError) as excinfo:
        SpeculativeDecoder(tiny.target, draft)
    one_line_error(excinfo, *needles)


def _draft_with(zoo, tmp_path, edit, arch="dflash") -> DraftModel:
    save_draft(make_draft(zoo, arch), tmp_path)
    edit_config(tmp_path, edit)
    return load_draft(tmp_path)


def test_fits_target_accepts_a_matching_draft(zoo):
    for arch in ("dflash", "dflare"):
        for mask_embedding in (False, True):
            check_draft_fits_target(make_draft(zoo, arch, mask_embedding), zoo.target("qwen3").config)


def test_hidden_size_that_does_not_fit(zoo):
    cfg = DraftConfig.create("dflash", hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                             head_dim=16, vocab_size=320, num_target_layers=5, block_size=8, mask_token_id=1)
    _refused_by_target(zoo, DraftModel(cfg), "'hidden_size'", "32", "64")


def test_vocab_size_that_does_not_fit(zoo, tmp_path):
    _refused_by_target(zoo, _draft_with(zoo, tmp_path, lambda raw: raw.update(vocab_size=151936)), "'vocab_size'")


def test_num_target_layers_that_does_not_fit(zoo, tmp_path):
    _refused_by_target(zoo, _draft_with(zoo, tmp_path, lambda raw: raw.update(num_target_layers=36)),
                       "'num_target_layers'")


@pytest.mark.parametrize("ids", [[0, 5], [-1, 2], [1, 40]])
def test_target_layer_ids_out_of_range(zoo, tmp_path, ids):
    def edit(raw):
        raw["dflash_config"]["target_layer_ids"] = ids
    _refused_by_target(zoo, _draft_with(zoo, tmp_path, edit), "target_layer_ids")


@pytest.mark.parametrize("mask", [320, -1, None, 10**6])
def test_mask_token_out_of_range_without_mask_embedding(zoo, tmp_path, mask):
    def edit(raw):
        raw["dflash_config"]["mask_token_id"] = mask
    draft = _draft_with(zoo, tmp_path, edit)
    assert draft.mask_embedding is None
    _refused_by_target(zoo, draft, "mask_token_id", "mask_embedding")


def test_mask_embedding_needs_no_mask_token(zoo, tmp_path):
    draft = make_draft(zoo, "dflare", mask_embedding=True)
    assert draft.config.mask_token_id is None
    save_draft(draft, tmp_path)
    loaded = load_draft(tmp_path)
    assert loaded.mask_embedding is not None and torch.equal(loaded.mask_embedding, draft.mask_embedding)
    check_draft_fits_target(loaded, zoo.target("qwen3").config)
    embeds = loaded.embed_block(torch.tensor([3]), zoo.target("qwen3").target.model.embed_tokens)
    assert embeds.shape == (1, 8, 64)
    assert all(torch.equal(embeds[0, j], loaded.mask_embedding) for j in range(1, 8))


# ---- default target layer ids --------------------------------------------------------------------------------
def test_default_target_layer_ids_examples():
    assert default_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]
    assert default_target_layer_ids(36, 9) == [1, 5, 9, 13, 17, 21, 25, 29, 33]
    assert default_target_layer_ids(7, 3) == [1, 2, 4]  # 2.5 rounds half to EVEN (Python round), not to 3
    for layers in (2, 5, 6, 28, 30, 36):
        assert default_target_layer_ids(layers, 1) == [layers // 2]


@pytest.mark.parametrize("layers", [5, 6, 12, 24, 28, 30, 36, 48, 64])
@pytest.mark.parametrize("draft_layers", [1, 2, 3, 5, 7, 8])
def test_default_target_layer_ids_formula(layers, draft_layers):
    if draft_layers == 1:
        expected = [layers // 2]
    else:
        expected = [round(1 + i * (layers - 4) / (draft_layers - 1)) for i in range(draft_layers)]
    assert default_target_layer_ids(layers, draft_layers) == expected


def test_config_without_target_layer_ids_derives_them(zoo, tmp_path):
    def edit(raw):
        raw["num_target_layers"] = 36
        raw["num_hidden_layers"] = 5
        raw["dflash_config"].pop("target_layer_ids")
    save_draft(make_draft(zoo, num_layers=5), tmp_path)
    edit_config(tmp_path, edit)
    assert DraftConfig.load(tmp_path).target_layer_ids == [1, 9, 17, 25, 33]


# ---- target loading refusals ----------------------------------------------------------------------------------
def test_load_target_missing_path(tmp_path):
    for name in (str(tmp_path / "no-such-model"), "no-such-model-dir"):
        with pytest.raises(BlockspecError) as excinfo:
            load_target(name)
        one_line_error(excinfo, name)


def test_load_target_refuses_non_gguf_file_and_empty_dir(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(BlockspecError) as excinfo:
        load_target(str(tmp_path / "weights.bin"))
    one_line_error(excinfo, "gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BlockspecError) as excinfo:
        load_target(str(tmp_path / "empty"))
    one_line_error(excinfo, "config.json")


def test_load_draft_missing_path(tmp_path):
    with pytest.raises(BlockspecError) as excinfo:
        load_draft(tmp_path / "nope")
    one_line_error(excinfo, "nope")
    with pytest.raises(BlockspecError) as excinfo:
        load_draft(tmp_path)  # exists, but holds no config.json
    one_line_error(excinfo, "config.json")


def save_tiny_hf_target(zoo, directory: Path) -> Path:
    """The zoo's tiny Qwen3 target saved as an HF directory (config.json + model.safetensors)."""
    zoo.target("qwen3").hf.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("tensor", ["model.layers.1.mlp.down_proj.weight", "model.norm.weight",
                                    "model.embed_tokens.weight"])
def test_target_missing_tensor_is_refused_not_random(zoo, tmp_path, tensor):
    """transformers would initialise a missing tensor randomly and only log it: a silently wrong target."""
    edit_tensors(save_tiny_hf_target(zoo, tmp_path), lambda t: t.pop(tensor))
    with pytest.raises(BlockspecError) as excinfo:
        load_target(str(tmp_path), tokenizer=False)
    # the tiny Qwen3 ties its head to the embedding: without it, lm_head.weight is missing as well
    one_line_error(excinfo, "missing tensor", "lm_head.weight" if "embed" in tensor else tensor)


def test_target_tensor_of_the_wrong_shape_is_refused(zoo, tmp_path):
    def shrink(t):
        t["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 100)
    edit_tensors(save_tiny_hf_target(zoo, tmp_path), shrink)
    with pytest.raises(BlockspecError) as excinfo:
        load_target(str(tmp_path), tokenizer=False)
    one_line_error(excinfo, "model.layers.1.mlp.down_proj.weight", "[64, 100]", "[64, 128]")
    save_tiny_hf_target(zoo, tmp_path)
    edit_config(tmp_path, lambda raw: raw.update(hidden_size=128))  # config.json that disagrees with the weights
    with pytest.raises(BlockspecError) as excinfo:
        load_target(str(tmp_path), tokenizer=False)
    one_line_error(excinfo, "config.json")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_target_with_non_finite_weights_is_refused(zoo, tmp_path, value):
    """A NaN or inf in one weight makes every logit it reaches NaN: refused at load, naming the tensor."""
    def poison(t):
        t["model.layers.1.self_attn.k_proj.weight"][3, 5] = value
    edit_tensors(save_tiny_hf_target(zoo, tmp_path), poison)
    with pytest.raises(BlockspecError) as excinfo:
        load_target(str(tmp_path), tokenizer=False)
    one_line_error(excinfo, "not finite", "layers.1.self_attn.qkv_proj.weight")


@pytest.mark.parametrize("edit,needle", [
    (lambda raw: raw.update(num_hidden_layers=2), "num_hidden_layers"),  # layer_types still lists 4 layers
    (lambda raw: raw.update(layer_types=["full_attention", "mamba", "full_attention", "full_attention"]),
     "layer_types"),
])
def test_target_config_that_transformers_rejects(zoo, tmp_path, edit, needle):
    """transformers validates configs with its own exception type (not a ValueError): still one line."""
    edit_config(save_tiny_hf_target(zoo, tmp_path), edit)
    with pytest.raises(BlockspecError) as excinfo:
        load_target(str(tmp_path), tokenizer=False)
    one_line_error(excinfo, "config", needle)


def test_target_with_unreadable_weights(zoo, tmp_path):
    """A truncated download, a file that is not safetensors, an index that is not JSON: one line each."""
    weights = save_tiny_hf_target(zoo, tmp_path) / "model.safetensors"
    data = weights.read_bytes()
    for broken in (data[:len(data) // 2], b"not a safetensors file"):
        weights.write_bytes(broken)
        with pytest.raises(BlockspecError) as excinfo:
            load_target(str(tmp_path), tokenizer=False)
        one_line_error(excinfo, "safetensors", "unreadable")
    weights.unlink()
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(BlockspecError) as excinfo:
        load_target(str(tmp_path), tokenizer=False)
    one_line_error(excinfo, "model.safetensors.index.json")


def test_load_target_and_load_draft_take_a_path_object(zoo, tmp_path):
    """Both documented entry points take a pathlib.Path as well as a string; any other type is a one-line error."""
    target = load_target(save_tiny_hf_target(zoo, tmp_path / "target"), tokenizer=False)
    assert target.name == str(tmp_path / "target") and target.model.config.num_layers == 5
    save_draft(make_draft(zoo), tmp_path / "draft")
    assert load_draft(tmp_path / "draft").config.num_layers == 2
    for load in (load_target, load_draft):
        for wrong in (None, 123):
            with pytest.raises(BlockspecError) as excinfo:
                load(wrong)
            one_line_error(excinfo, repr(wrong), "path")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a CUDA device on a CPU-only machine")
def test_load_target_and_load_draft_check_device_and_dtype(zoo, tmp_path):
    """Devices and dtypes are checked the same way whether given as strings or torch objects, by both loaders."""
    target_dir = save_tiny_hf_target(zoo, tmp_path / "target")
    save_draft(make_draft(zoo), tmp_path / "draft")
    cases = [(load_target, target_dir, dict(device=torch.device("cuda")), "CUDA is not available"),
             (load_target, target_dir, dict(device=0), "device"),
             (load_target, target_dir, dict(dtype=torch.int8), "torch.int8"),
             (load_draft, tmp_path / "draft", dict(device="cuda"), "CUDA is not available"),
             (load_draft, tmp_path / "draft", dict(device=torch.device("cuda:1")), "CUDA is not available"),
             (load_draft, tmp_path / "draft", dict(device="mps"), "mps"),
             (load_draft, tmp_path / "draft", dict(dtype="half"), "'half'")]
    for load, path, kwargs, needle in cases:
        with pytest.raises(BlockspecError) as excinfo:
            load(path, **kwargs)
        one_line_error(excinfo, needle)
    assert load_target(target_dir, device=torch.device("cpu"), tokenizer=False).device.type == "cpu"
    assert load_draft(tmp_path / "draft", dtype="bfloat16").fc.weight.dtype == torch.bfloat16  # as load_target takes it


def test_draft_and_target_given_the_wrong_way_round(zoo, tmp_path):
    """A draft's config.json says model_type qwen3: loaded as a target it lacked only its embedding and head."""
    save_draft(make_draft(zoo), tmp_path / "draft")
    with pytest.raises(BlockspecError) as excinfo:
        load_target(tmp_path / "draft", tokenizer=False)
    one_line_error(excinfo, "is a DFlash/DFlare draft, not a target")
    with pytest.raises(BlockspecError) as excinfo:
        load_draft(save_tiny_hf_target(zoo, tmp_path / "target"))
    one_line_error(excinfo, "Qwen3ForCausalLM", "not a DFlash/DFlare draft")


@pytest.mark.parametrize("content", [b"", b"GGUFgarbage"], ids=["empty", "truncated"])
def test_unreadable_gguf_target(tmp_path, monkeypatch, content):
    """gguf's reader raised ValueError / struct.error for a file it cannot parse; nothing is left in the cache."""
    monkeypatch.setenv("BLOCKSPEC_CACHE", str(tmp_path / "cache"))
    (tmp_path / "model.gguf").write_bytes(content)
    with pytest.raises(BlockspecError) as excinfo:
        load_target(tmp_path / "model.gguf")
    one_line_error(excinfo, "model.gguf")
    assert not list((tmp_path / "cache" / "gguf").iterdir())


def test_target_config_with_fewer_layers_than_the_weights(tmp_path):
    """A Llama config.json (no layer_types to cross-check) claiming fewer layers than the checkpoint holds: the
    extra layers' tensors were dropped as 'unexpected' and a truncated target loaded silently."""
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path)
    edit_config(tmp_path, lambda raw: (raw.update(num_hidden_layers=2), raw.pop("layer_types", None)))
    with pytest.raises(BlockspecError) as excinfo:
        load_target(tmp_path, tokenizer=False)
    one_line_error(excinfo, "model.layers.2.", "num_hidden_layers")
