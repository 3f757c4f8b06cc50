"""The engine's device-side greedy step (the one a CUDA graph holds; on the CPU the same step runs without a
graph) on a fixed-length cache against a growing one and against plain decoding: same tokens, same acceptance,
rollback and bookkeeping on the device."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.oracle import OracleProposer
from blockspec.draft import new_draft_for_target
from blockspec.engine import DraftProposer, SamplingParams, SpeculativeDecoder
from blockspec.engine.sampling import RowSampling
from blockspec.kernels import use_settings
from blockspec.target import Target, TargetConfig, TargetModel

VOCAB, HIDDEN, LAYERS = 97, 64, 4


def tiny_target(seed: int = 0, std: float = 0.3) -> Target:
    cfg = TargetConfig("qwen3", VOCAB, HIDDEN, 128, LAYERS, 4, 2, 16, 1e-6, True, False, False, False, False,
                       (None,) * LAYERS, 4096)
    model = TargetModel.random(cfg, seed=seed, std=std, rope_theta=10000.0)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(3.0)  # varied logits, so greedy output is not one repeated token
    return Target(model=model, tokenizer=None, name="tiny", eos_token_ids=())


def agreeing_pair(block_size: int = 8, token: int = 7):
    """A target whose greedy choice is always `token` and a draft that proposes it in every slot.

    Feature 0 of every embedding (the draft's mask embedding too) is large and no layer writes to it, so after
    any final RMSNorm it stays positive; the lm_head reads only feature 0 and only `token`'s row is non-zero.
    Both networks share that lm_head, so the draft agrees everywhere: every step accepts the whole block.
    """
    target = tiny_target()
    model = target.model
    draft = new_draft_for_target(model.config, "dflash", num_layers=1, block_size=block_size, seed=1)
    with torch.no_grad():
        model.embed_tokens.weight[:, 0] = 50.0
        draft.mask_embedding[0] = 50.0  # the draft's MASK slots start from its own mask embedding
        model.lm_head.weight = torch.nn.Parameter(torch.zeros(VOCAB, HIDDEN))
        model.lm_head.weight[token, 0] = 1.0
        for layer in model.layers:
            layer.self_attn.o_proj.weight[0] = 0
            layer.mlp.down_proj.weight[0] = 0
        for layer in draft.layers:
            layer.self_attn.o_proj.weight[0] = 0
            layer.mlp.down_proj.weight[0] = 0
    return target, draft


@pytest.mark.parametrize("arch", ["dflash", "dflare"])
@pytest.mark.parametrize("block", [1, 2, 4, 8])
def test_static_step_equals_eager_loop(arch, block):
    target = tiny_target(seed=block)
    draft = new_draft_for_target(target.model.config, arch, num_layers=2, block_size=8, seed=2)
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    fast = SpeculativeDecoder(target, draft, max_len=256)
    eager = SpeculativeDecoder(target, draft)
    for length in (1, 5, 23):
        prompt = torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(length)).tolist()
        got = fast.generate(prompt, params, block_size=block)
        want = eager.generate(prompt, params, block_size=block)
        plain = eager.generate(prompt, params, block_size=1)
        assert got.token_ids == want.token_ids == plain.token_ids
        assert got.stats.acceptance_lengths == want.stats.acceptance_lengths
        assert len(set(got.token_ids)) > 3


def test_whole_blocks_accepted_and_max_new_tokens_lands_mid_block():
    target, draft = agreeing_pair(block_size=8)
    fast = SpeculativeDecoder(target, draft, max_len=128)
    eager = SpeculativeDecoder(target, draft)
    for max_new in (1, 8, 9, 20, 33):
        params = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
        got, want = fast.generate([3, 4, 5], params), eager.generate([3, 4, 5], params)
        assert got.token_ids == want.token_ids == [7] * max_new
        assert got.finish_reason == "length"
        # prefill commits 1 token, then every step commits a whole block of 8
        assert got.stats.acceptance_lengths == want.stats.acceptance_lengths == [8] * len(got.stats.acceptance_lengths)
        assert 1 + 8 * (got.stats.steps - 1) < max_new <= 1 + 8 * got.stats.steps or max_new == 1


def test_stop_token_inside_an_accepted_run():
    target, draft = agreeing_pair(block_size=8)
    params = SamplingParams(max_new_tokens=50, stop_token_ids=(7,))
    for decoder in (SpeculativeDecoder(target, draft, max_len=128), SpeculativeDecoder(target, draft)):
        result = decoder.generate([1, 2], params)
        assert result.token_ids == [7] and result.finish_reason == "stop"


@pytest.mark.parametrize("pipeline", [False, True], ids=["sync", "pipelined"])
def test_forced_acceptance_schedule_commits_what_it_says(pipeline):
    target = tiny_target(seed=5)
    draft = new_draft_for_target(target.model.config, "dflash", num_layers=1, block_size=8, seed=2)
    prompt = [9, 8, 7]
    plain = SpeculativeDecoder(target, None).generate(prompt, SamplingParams(max_new_tokens=70, ignore_eos=True))
    oracle = OracleProposer(DraftProposer(draft, target.model), prompt + plain.token_ids, [2, 7, 0, 5], VOCAB, "cpu")
    fast = SpeculativeDecoder(target, oracle, max_len=256)
    fast.engine.pipeline = pipeline  # the CUDA path runs one step ahead of the host
    result = fast.generate(prompt, SamplingParams(max_new_tokens=60, ignore_eos=True))
    assert result.stats.acceptance_lengths[:8] == [3, 8, 1, 6, 3, 8, 1, 6]
    assert result.token_ids == plain.token_ids[:60]
    # the caches and state stay consistent after forced rollbacks: plain decoding from the same decoder is
    # unaffected and equals the eager loop
    params = SamplingParams(max_new_tokens=25, ignore_eos=True)
    assert fast.generate(prompt, params, block_size=1).token_ids == plain.token_ids[:25]


class MatrixProducts(TorchDispatchMode):
    """The matrix products run inside: their op names in order, and those with an operand broadcast over a batch dim
    (stride 0: one matrix read again for every batch index)."""

    PRODUCTS = ("aten.mm.", "aten.addmm.", "aten.bmm.", "aten.baddbmm.", "mkldnn._linear_pointwise.")

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.broadcast: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(self.PRODUCTS):
            self.ops.append(name)
            if any(isinstance(a, torch.Tensor) and a.dim() == 3 and a.shape[0] > 1 and a.stride(0) == 0 for a in args):
                self.broadcast.append(f"{name} {[tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("arch", ["dflash", "dflare"])
def test_a_draft_pass_reads_each_weight_once_whatever_the_rows(arch, onednn):
    """One draft pass (greedy and sampled proposals) runs the same matrix products for 8 rows as for 1, none batched
    over the rows with a broadcast weight. The draft's lm_head input (block slots 1..) is a strided slice, which
    F.linear ran as a batched matmul reading the lm_head once per row: 778 MB a row for the 4B, 0.26 ms on the
    H100's bandwidth, most of a draft pass at c = 32. The weights carry no autograd state, as those of a model built
    under inference mode (with it, torch folds the rows itself), and the pass runs under no_grad, where a dispatch
    mode sees the products (under inference mode it sees aten.linear whole). On the CPU path through oneDNN too."""
    target = tiny_target(seed=3)
    draft = new_draft_for_target(target.model.config, arch, num_layers=2, block_size=8, seed=4)
    for model in (target.model, draft):
        model.requires_grad_(False)
    proposer = DraftProposer(draft, target.model)
    proposer.allocate(8, 64)
    generator = torch.Generator().manual_seed(0)
    for row in range(8):
        features = torch.randn(1, 10, len(proposer.tap_layer_ids) * HIDDEN, generator=generator)
        proposer.join(row, features, torch.arange(10)[None], torch.tensor([10]))
    products = {}
    for n in (1, 8):
        positions = 10 + torch.arange(4).repeat(n, 1)
        last = torch.randint(0, VOCAB, (n,), generator=generator)
        with torch.no_grad(), use_settings(onednn_linear=onednn), MatrixProducts() as log:
            drafts = proposer.propose_greedy(n, 4, last, positions, 14)
            greedy_rows = RowSampling.of([SamplingParams()] * n, "cpu")
            sampled, _ = proposer.propose_sampled(n, 4, last, positions, 14, greedy_rows,
                                                  torch.zeros(n, 3, dtype=torch.float64))
        assert sampled.tolist() == drafts.tolist()  # both lm_head paths agree
        assert not log.broadcast
        products[n] = log.ops
    assert products[8] == products[1] and products[1]


def test_static_cache_too_small_is_a_user_error():
    from blockspec.errors import BlockspecError

    target = tiny_target()
    fast = SpeculativeDecoder(target, None, max_len=32)
    with pytest.raises(BlockspecError, match="static cache"):
        fast.generate(list(range(20)), SamplingParams(max_new_tokens=20))
