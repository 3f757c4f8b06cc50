"""The target side of the flow kernel (target/flow.py) on the CPU: which targets and calls it takes, and the
weight stacking it needs (the layers' parameters become views into one tensor per projection, unchanged in
value, so the per-op path computes exactly what it did). The kernel itself needs a Hopper GPU:
benchmarks/engine_limit.py checks it there."""

import dataclasses

import pytest
import torch

from blockspec.target import TargetConfig, TargetModel
from blockspec.target.flow import WEIGHT_GROUPS, flow_unsupported, shape_unsupported, stack_layer_weights

LAYERS = 3


def qwen3_config(**changes) -> TargetConfig:
    cfg = TargetConfig("qwen3", 101, 512, 1024, LAYERS, 8, 2, 128, 1e-6, True, False, False, False, False,
                       (None,) * LAYERS, 4096)
    return dataclasses.replace(cfg, **changes)


def test_stacked_weights_are_views_with_the_same_values_and_forward() -> None:
    model = TargetModel.random(qwen3_config(), seed=3, std=0.05)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids, positions = torch.tensor([[5, 9, 2, 7]]), torch.arange(4)[None]
    want = model(ids, positions, model.new_cache(1, 8))[0]

    with torch.inference_mode():  # as on its first use, inside a decode step
        stacks = stack_layer_weights(model.layers)

    assert not any(s.is_inference() for s in stacks)  # a later training step may save them for backward

    assert [tuple(s.shape) for s in stacks] == [(LAYERS, 1536, 512), (LAYERS, 512, 1024), (LAYERS, 2048, 512),
                                                (LAYERS, 512, 1024), (LAYERS, 2, 512), (LAYERS, 2, 128)]
    assert all(s.is_contiguous() for s in stacks)
    for stack, paths in zip(stacks, WEIGHT_GROUPS):
        for index, layer in enumerate(model.layers):
            for part, path in enumerate(paths):
                weight = layer.get_submodule(path).weight
                expected = stack[index] if len(paths) == 1 else stack[index, part]
                assert weight.data_ptr() == expected.data_ptr()  # a view, not a copy
                assert torch.equal(weight, before[f"layers.{index}.{path}.weight"])
    # writing through a layer's parameter shows in the stack: one storage
    with torch.no_grad():
        model.layers[1].mlp.down_proj.weight[0, 0] = 42.0
    assert stacks[3][1, 0, 0] == 42.0
    with torch.no_grad():
        model.layers[1].mlp.down_proj.weight[0, 0] = before["layers.1.mlp.down_proj.weight"][0, 0]
    assert torch.equal(model(ids, positions, model.new_cache(1, 8))[0], want)


@pytest.mark.parametrize("changes, reason", [
    ({}, None),
    ({"qk_norm": False}, "no q/k norms"),
    ({"qkv_bias": True}, "biases"),
    ({"sliding_windows": (None, 64, None)}, "sliding-window layers"),
    ({"head_dim": 64, "num_heads": 16, "num_kv_heads": 4}, "head_dim 64, not 128"),
    ({"num_kv_heads": 4}, "8 q heads over 4 kv heads, not 4 each"),
    ({"hidden_size": 640}, "hidden, intermediate or q size not a multiple of 512"),
])
def test_shape_unsupported_names_what_rules_a_target_out(changes: dict, reason: str | None) -> None:
    assert shape_unsupported(qwen3_config(**changes)) == reason


def test_scaled_rope_and_cpu_weights_are_ruled_out() -> None:
    assert shape_unsupported(qwen3_config(), rope_scaling=0.5) == "scaled RoPE attention"
    model = TargetModel.random(qwen3_config(), seed=0, std=0.05)
    assert flow_unsupported(model) == "not bf16 on CUDA"


def test_cpu_decode_tokens_take_the_per_op_path_and_build_nothing() -> None:
    model = TargetModel.random(qwen3_config(), seed=0, std=0.05)
    with torch.inference_mode():
        hidden, features = model(torch.tensor([[3]]), torch.tensor([[0]]), model.new_cache(1, 8))
    assert hidden.shape == (1, 1, 512) and features is None
    assert model._flow is None and not model._prepared  # a forward builds nothing: the engine prepares
    model.prepare_fast_path()
    assert model._flow is None and model._prepared  # on the CPU there is nothing to build
