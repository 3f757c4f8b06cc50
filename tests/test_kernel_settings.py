"""The kernels' settings and launch tables (blockspec/kernels/settings.py), on the CPU: no Triton needed."""

import copy
import itertools
import json
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import blockspec.kernels
from blockspec.kernels import KernelSettings, current_settings, device_tables, use_settings
from blockspec.kernels.settings import (FLOW_FIELDS, attention_keys_per_tile, attention_rows, attention_shared_bytes,
                                       batch_attention_config, bucket_config, gdn_tile, merged_skinny_tables,
                                       prompt_attention_config, skinny_table_from_winners, tables_for)
from blockspec.layers import fused_kernels_apply, linear
from test_static_engine import MatrixProducts


def test_use_settings_changes_the_current_settings_inside_only_and_nests():
    assert current_settings() == KernelSettings()
    with use_settings(pdl=False) as outer:
        assert current_settings() is outer and not outer.pdl and outer.prefetch_tiles == 2
        with use_settings(prefetch_tiles=0):
            assert current_settings() == KernelSettings(pdl=False, prefetch_tiles=0)
        with use_settings(KernelSettings(fused_rope=False)):  # a whole settings object replaces the current one
            assert current_settings() == KernelSettings(fused_rope=False)
        assert current_settings() is outer
    assert current_settings() == KernelSettings()


def test_settings_are_restored_when_the_block_raises():
    with pytest.raises(RuntimeError), use_settings(pdl=False):
        raise RuntimeError
    assert current_settings().pdl


def test_fused_kernels_off_sends_cuda_inference_to_the_torch_ops():
    cuda_like = SimpleNamespace(is_cuda=True, requires_grad=False)  # what fused_kernels_apply asks of a tensor
    assert fused_kernels_apply(cuda_like)
    with use_settings(fused_kernels=False):
        assert not fused_kernels_apply(cuda_like)
    assert not fused_kernels_apply(torch.ones(1))  # a CPU tensor, whatever the settings


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="a torch built without oneDNN")
def test_cpu_products_through_onednn_follow_the_weights_and_the_setting():
    """CPU fp32 inference takes oneDNN with a weight packed once per tensor view: a slice of a stacked weight (as the
    draft's context projection is) and its whole each keep their own pack; an in-place update (an optimizer step)
    repacks; under autograd, and with the setting off, F.linear runs (its own kernels, so equal only to rounding)."""
    gen = torch.Generator().manual_seed(0)
    stacked, bias, x = (torch.randn(48, 32, generator=gen), torch.randn(48, generator=gen),
                        torch.randn(2, 5, 32, generator=gen))
    with torch.no_grad():
        for _ in range(2):  # the second round reads the packs
            for weight, b in ((stacked, bias), (stacked[16:], bias[16:])):
                torch.testing.assert_close(linear(x, weight, b), torch.nn.functional.linear(x, weight, b))
        with MatrixProducts() as log:
            linear(x, stacked)
            with use_settings(onednn_linear=False):
                linear(x, stacked)
        assert log.ops[0].startswith("mkldnn._linear_pointwise") and not log.ops[1].startswith("mkldnn")
        stacked.mul_(-2)  # a pack of the old values would give the old products
        torch.testing.assert_close(linear(x, stacked[16:]), torch.nn.functional.linear(x, stacked[16:]))
    trained = torch.nn.Parameter(stacked.clone())
    out = linear(x, trained)
    out.sum().backward()  # autograd: F.linear, whose backward reaches the weight
    assert trained.grad is not None and out.shape == (2, 5, 48)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="a torch built without oneDNN")
def test_a_draft_pass_in_inference_mode_packs_its_weights_once(zoo, monkeypatch):
    """In inference mode a slice of an inference tensor has no `_base`: the DFlash context's k/v rows of the stacked
    q/k/v weight were repacked on every call (51 repacks a 32-token generation of the shipped draft). The rows are a
    view cached beside the stack, the same tensor each call: a second draft pass packs nothing."""
    from test_static_engine import tiny_target

    draft = copy.deepcopy(zoo.draft("qwen3", "dflash", block_size=8))  # weights of its own: packed by no other test
    c = tiny_target().model.config
    attn = draft.layers[0].self_attn
    packed, reorder = [], torch.ops.mkldnn._reorder_linear_weight
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", lambda w: packed.append(w.shape) or reorder(w))
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 8, c.hidden_size, generator=gen)
    features = torch.randn(1, 5, len(draft.config.target_layer_ids) * c.hidden_size, generator=gen)
    with torch.inference_mode():
        passes = [draft(embeds, torch.arange(5, 13)[None], features, torch.arange(5)[None], draft.new_cache(1, 32))
                  for _ in range(2)]
        kv = attn.stacked("qkv", attn.q_proj, attn.k_proj, attn.v_proj, rows=(attn.q_width, attn.q_width + 64))
        assert kv[0] is attn.stacked("qkv", attn.q_proj, attn.k_proj, attn.v_proj,
                                     rows=(attn.q_width, attn.q_width + 64))[0]
    assert packed and torch.equal(passes[0], passes[1])
    first = len(packed)
    with torch.inference_mode():
        draft(embeds, torch.arange(5, 13)[None], features, torch.arange(5)[None], draft.new_cache(1, 32))
    assert len(packed) == first  # nothing packed again


@pytest.mark.parametrize("name, file", [("NVIDIA H100 80GB HBM3", "h100.json"), ("NVIDIA H100 PCIe", "h100.json"),
                                        ("NVIDIA H200", "h100.json"), ("NVIDIA A100-SXM4-80GB", "default.json"),
                                        ("NVIDIA GeForce RTX 4090", "default.json"), ("", "default.json")])
def test_tables_are_chosen_by_the_device_name(name: str, file: str):
    assert tables_for(name).file == file


def test_the_h100_table_holds_the_measured_settings():
    tables = tables_for("NVIDIA H100 80GB HBM3")
    assert tables.skinny[(6144, 2560)][1] == {"rows": 16, "block_n": 64, "block_k": 256, "split_k": 1,
                                              "num_warps": 4, "num_stages": 3}
    assert tables.skinny[(2560, 9728)][16]["split_k"] == 4
    assert tables.skinny[(2048, 2560)][1] is None and tables.skinny[(2048, 2560)][16] is None  # cuBLAS was faster
    assert tables.skinny[(19456, 2560)][128]["rows"] == 128 and tables.skinny[(19456, 2560)][256] is None
    assert tables.attention["wide"] == {"splits": 16, "block_n": 32, "num_warps": 4, "rows": {
        "8": {"splits": 4, "block_n": 32}, "16": {"splits": 1, "block_n": 64}}}
    assert dict(zip(FLOW_FIELDS, tables.flow)) == {"block_rows": 64, "block_k": 512, "dot_warps": 4, "stages": 3,
                                                   "programs_per_sm": 1, "copy_warps": 2, "kib_in_flight": 64,
                                                   "pack_small": True}


@pytest.mark.parametrize("device", ["NVIDIA H100 80GB HBM3", ""])
def test_every_decode_attention_tile_fits_the_h100_and_the_tuned_ones_stay(device: str):
    """Head dims 64/128/256, one query up to a block of 16 (tiles of 1-4 queries on "narrow", 8 or 16 on "wide", 16
    under batch_invariant), GQA groups up to 8, 16- and 32-bit caches: every launch fits the 227 KiB an H100 or H200
    gives a program, and the tables' tiles at head dims up to 128 (whose timings are tuned) are launched as they are."""
    hopper = 232448
    attention = tables_for(device).attention
    for head_dim, group, itemsize in itertools.product((64, 128, 256), (1, 2, 4, 8), (2, 4)):
        for kind, tiles in (("narrow", (1, 2, 4)), ("wide", (8, 16))):
            entry = attention.get(f"{kind}_d{head_dim}", attention[kind])
            for block_n, tile in itertools.product({entry["block_n"]} | {r["block_n"] for r in entry.get(
                    "rows", {}).values()}, tiles):
                rows = attention_rows(group, tile)
                fitted = attention_keys_per_tile(block_n, rows, head_dim, itemsize, hopper)
                assert attention_shared_bytes(rows, fitted, head_dim, itemsize) <= hopper, (head_dim, group, tile)
                assert fitted == block_n or head_dim > 128


def test_a_batch_of_rows_takes_its_measured_attention_settings_else_shares_out_one_rows_splits():
    entry = {"splits": 16, "block_n": 64, "num_warps": 4, "rows": {"8": {"splits": 4, "block_n": 32},
                                                                   "32": {"splits": 1, "block_n": 128}}}
    chosen = {rows: batch_attention_config(entry, rows) for rows in (1, 2, 4, 5, 8, 9, 16, 17, 32, 33, 64)}
    shared = {rows: ({**entry}, max(1, 16 // rows)) for rows in (1, 2, 4, 9, 16, 33, 64)}  # no bucket serves these
    assert chosen == {**shared, 5: ({**entry, "block_n": 32}, 4), 8: ({**entry, "block_n": 32}, 4),
                      17: ({**entry, "block_n": 128}, 1), 32: ({**entry, "block_n": 128}, 1)}
    assert batch_attention_config({"splits": 16, "block_n": 64}, 8) == ({"splits": 16, "block_n": 64}, 2)


def test_a_prompt_takes_its_head_dims_tiles_the_long_ones_from_their_length_and_none_where_unlisted():
    """What layers.attention asks for a prompt from its start: the table's entry for the head dim ("batch" from its
    "from_prompts" on, then "long" from its "from_tokens" on); None (SDPA's flash kernel) for a head dim the table
    does not list, and on a table without prompt entries, the default one that a device nobody measured gets."""
    short, long = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3}, {"from_tokens": 4096, "block_m": 128}
    batch = {"from_prompts": 2, "sdpa": "cudnn"}
    table = {"narrow": {}, "wide": {}, "prompt_d128": {**short, "long": long, "batch": batch}, "prompt_d256": short}
    cpu = torch.device("cpu")
    with use_settings(attention_table=table):
        assert prompt_attention_config(cpu, 128, 4095) == {**short, "long": long, "batch": batch}
        assert prompt_attention_config(cpu, 128, 4096) == long
        assert prompt_attention_config(cpu, 128, 512, prompts=2) == batch  # a group of prompts, whatever their length
        assert prompt_attention_config(cpu, 128, 4096, prompts=8) == batch
        assert prompt_attention_config(cpu, 256, 512, prompts=8) == short  # no batch entry
        assert prompt_attention_config(cpu, 256, 16384) == short  # no long entry
        assert prompt_attention_config(cpu, 64, 512) is None
    assert prompt_attention_config(cpu, 128, 512) is None  # default.json: never measured, so flash
    h100 = tables_for("NVIDIA H100 80GB HBM3").attention
    assert {f"prompt_d{d}" for d in (64, 128, 256)} <= set(h100)


def test_qwen35s_fp32_decode_token_takes_half_the_keys_per_tile_to_fit():
    """What the H100 refused: one query over 4 KV heads of 256 dims in fp32 at 64 keys a tile needs 282688 bytes
    (Triton 3.6's compiled size, which the estimate matches), over the 232448 there are; 32 keys need 149568."""
    rows = attention_rows(4, 1)
    assert rows == 16 and attention_shared_bytes(rows, 64, 256, 4) == 282688
    assert attention_keys_per_tile(64, rows, 256, 4, 232448) == 32
    assert attention_shared_bytes(rows, 32, 256, 4) == 149568
    assert attention_keys_per_tile(64, rows, 256, 2, 232448) == 64  # bf16: 138 KiB, as tabled


def test_a_product_takes_the_smallest_row_bucket_that_holds_it_and_cublas_past_the_largest():
    one, block, batch = ({"rows": rows, "block_n": 64, "block_k": 128, "split_k": split, "num_warps": 4,
                          "num_stages": 4} for rows, split in ((16, 1), (16, 2), (64, 1)))
    table = skinny_table_from_winners([{"gemm": "qkv", "n": 96, "k": 32, "m1": one, "m16": block, "m64": batch},
                                       {"gemm": "o", "n": 32, "k": 32, "m1": None, "m16": block}])
    assert table == {(96, 32): {1: one, 16: block, 64: batch}, (32, 32): {1: None, 16: block}}
    assert [bucket_config(table[(96, 32)], m) for m in (1, 2, 16, 17, 64, 65)] == [one, block, block, batch, batch,
                                                                                     None]
    assert [bucket_config(table[(32, 32)], m) for m in (1, 16, 17)] == [None, block, None]
    assert bucket_config({}, 1) is None  # a shape the table does not list
    swept = skinny_table_from_winners([{"n": 32, "k": 32, "m32": batch}, {"n": 8, "k": 8, "m1": None}])
    assert merged_skinny_tables(table, swept) == {(96, 32): table[(96, 32)], (32, 32): {1: None, 16: block, 32: batch},
                                                  (8, 8): {1: None}}


def test_an_unlisted_device_keeps_cublas_and_the_per_op_decode():
    tables = tables_for("NVIDIA A100-SXM4-80GB")
    assert tables.skinny == {} and tables.flow is None
    assert set(tables.attention) == {"narrow", "wide"}
    assert device_tables(torch.device("cpu")) is tables_for("")  # CPU tensors (Triton's interpreter)


def test_a_batch_takes_the_gdn_batch_tile_unless_batch_invariant_and_a_setting_overrides_all(monkeypatch):
    h100 = tables_for("NVIDIA H100 80GB HBM3")
    monkeypatch.setattr("blockspec.kernels.settings.device_tables", lambda device: h100)
    one, batch = (gdn_tile(torch.device("cuda"), rows) for rows in (7, 8))
    assert (one["value_dims"], one["warps"]) == (16, 1) and (batch["value_dims"], batch["warps"]) == (64, 2)
    with use_settings(gdn_tile={"value_dims": 16, "warps": 2}):
        assert gdn_tile(torch.device("cuda"), 32) == {"value_dims": 16, "warps": 2}
    with use_settings(batch_invariant=True):  # one tile for any rows: a row rounds alike alone and in a batch
        assert gdn_tile(torch.device("cuda"), 32) == gdn_tile(torch.device("cuda"), 1) == one


def test_every_table_file_is_complete_reachable_and_shipped_with_the_package():
    folder = resources.files("blockspec.kernels").joinpath("tables")
    files = {f.name: json.loads(f.read_text()) for f in folder.iterdir() if f.name.endswith(".json")}
    assert {"default.json", "h100.json"} <= set(files)
    for name, data in files.items():
        assert set(data) == {"devices", "notes", "skinny", "attention", "gdn", "flow"}, name
        for tile in (data["gdn"], data["gdn"].get("batch", {"value_dims": 64, "warps": 4})):
            assert {"value_dims", "warps"} <= set(tile) <= {"value_dims", "warps", "batch", "rows"}, name
            assert 128 % tile["value_dims"] == 0, name
        tables = tables_for(data["devices"][0] if data["devices"] else "")  # each file's first device gets it
        assert tables.file == name
        assert all({1, 16} <= set(entry) <= {1, 16, 32, 64, 128, 256} for entry in tables.skinny.values())
        assert tables.flow is None or len(tables.flow) == len(FLOW_FIELDS)
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"kernels/tables/*.json"' in pyproject  # package data: a wheel ships the tables


def test_no_environment_variable_is_read_in_the_kernels_package():
    for path in Path(blockspec.kernels.__file__).parent.glob("*.py"):
        source = path.read_text()
        assert "environ" not in source and "getenv" not in source, path.name


def test_batch_invariant_is_off_by_default_and_changes_nothing_on_the_cpu():
    """`--exact` is a switch (its cost is not measured yet); on the CPU every path is the torch ops either way, so
    the same requests give the same tokens with it on, prefills of more than 16 tokens included."""
    from blockspec.engine import BatchDecoder, SamplingParams
    from test_static_engine import tiny_target

    assert KernelSettings().batch_invariant is False
    target = tiny_target(seed=4)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    prompts = [[5, 9, 2], list(range(3, 40))]
    plain = BatchDecoder(target, max_batch=2).generate(prompts, params)
    with use_settings(batch_invariant=True):
        exact = BatchDecoder(target, max_batch=2).generate(prompts, params)
    assert [r.token_ids for r in exact] == [r.token_ids for r in plain]
