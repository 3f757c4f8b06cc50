"""Answer extraction and matching, acceptance statistics, and the aggregation of benchmark records.

Answers. `extract_answer` takes the content of the LAST `\\boxed{...}` (braces balanced, `\\{` / `\\}` are
literal characters, a `\\boxed` left unclosed by a truncated output is skipped), else the last number in the
text. `answers_match` compares after a light normalisation (strip `$`, spaces, `\\left`/`\\right`, `\\!`,
`\\,`, `\\text{..}`-style wrappers, degree signs, `\\%`, a trailing period, a leading `x=`; `\\dfrac`/`\\tfrac`
-> `\\frac`; thousands commas "1,000" -> "1000"; "3.0" -> "3"), then numerically when both sides are numbers
(integers, decimals, `\\frac{a}{b}`, `a/b`). When the reference is a number and the prediction is not, the
last number inside the prediction is compared (so `\\boxed{18 \\text{ dollars}}` matches 18). This is NOT a
symbolic checker: equivalent but differently written expressions (`\\sqrt{8}` vs `2\\sqrt{2}`, reordered
tuples, intervals) count as wrong. It is there to show that speculative decoding leaves quality untouched:
both runs are graded by the same rule.

Acceptance. A speculative step commits `L` tokens (1..B: the accepted draft tokens plus the target's bonus
token). tau = mean over responses of each response's mean L (SPEC section 7); `tau_pooled` = mean L over
all steps. The histogram counts L = 1..B over all steps. The per-position acceptance rate is, for draft
position k = 1..B-1, P(draft token k accepted) = #steps with L - 1 >= k / #steps (acceptance is a prefix, so
this falls with k).

Timing. TTFT = prompt in -> first token out; TPOT = (total - TTFT) / (generated - 1), undefined for a
response of one token (such responses are left out of the TPOT means); speedup = mean TPOT(AR) / mean
TPOT(spec) over the responses of a dataset (or all of them, "overall"); tokens/s = total generated tokens /
total decode time.
"""

from __future__ import annotations

import copy
import math
import re
from statistics import mean

from blockspec.engine.stats import acceptance_histogram

# Fields of a run record that measure time: they differ between runs of the same prompts.
TIMING_FIELDS = ("ttft_s", "tpot_s", "tokens_per_s", "total_s")

_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")


# ---- answer extraction ----------------------------------------------------------------------------------------
def _braced(text: str, start: int) -> str | None:
    """Content of the brace group opening at text[start] == '{', or None when it never closes."""
    depth = 0
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # an escaped character (\{, \}, \\) never opens or closes a group
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` (or `\\fbox{...}`) in `text`."""
    positions = sorted(m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*(?=\{)", text))
    for end in reversed(positions):
        content = _braced(text, end)
        if content is not None:
            return content.strip()
    return None


def last_number(text: str) -> str | None:
    matches = _NUMBER.findall(text)
    return matches[-1].replace(",", "") if matches else None


def extract_answer(text: str) -> str | None:
    """The final answer of a response: the last \\boxed{...}, else the last number, else None."""
    boxed = last_boxed(text)
    return boxed if boxed is not None else last_number(text)


# ---- answer matching ------------------------------------------------------------------------------------------
_WRAPPERS = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")


def normalize_answer(answer: str) -> str:
    s = answer.strip()
    for _ in range(3):  # nested wrappers
        s = _WRAPPERS.sub(r"\1", s)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""),
                     ("\\ ", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("^\\circ", ""),
                     ("^{\\circ}", ""), ("\\%", ""), ("%", ""), ("\\$", ""), ("$", ""), ("\\displaystyle", "")):
        s = s.replace(old, new)
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2}
    s = re.sub(r"^[a-zA-Z]=", "", s)  # "x=5" -> "5"
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"-?\d+\.\d+", s):
        s = s.rstrip("0").rstrip(".")
    return s


def _as_number(s: str) -> float | None:
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", s) or \
        re.fullmatch(r"(-?)(-?\d+(?:\.\d+)?)/(-?\d+(?:\.\d+)?)", s)
    if m:
        den = float(m.group(3))
        return None if den == 0 else (-1 if m.group(1) else 1) * float(m.group(2)) / den
    try:
        value = float(s)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def answers_match(predicted: str | None, reference: str | None) -> bool:
    if predicted is None or reference is None:
        return False
    pred, ref = normalize_answer(predicted), normalize_answer(reference)
    if pred == ref:
        return True
    ref_value = _as_number(ref)
    if ref_value is None:
        return False
    pred_value = _as_number(pred)
    if pred_value is None:  # "18dollars", "\$18.00" and the like: the last number inside
        inner = last_number(pred)
        pred_value = _as_number(inner) if inner is not None else None
    return pred_value is not None and abs(pred_value - ref_value) <= 1e-6 * max(1.0, abs(ref_value))


# ---- acceptance statistics ------------------------------------------------------------------------------------
def per_position_acceptance(lengths: list[int], block_size: int) -> list[float]:
    """P(draft token k accepted) for k = 1..block_size-1: #steps with L-1 >= k / #steps."""
    if not lengths:
        return [0.0] * (block_size - 1)
    return [sum(1 for n in lengths if n - 1 >= k) / len(lengths) for k in range(1, block_size)]


def _mean(values: list[float]) -> float | None:
    return mean(values) if values else None


def summarize_runs(runs: list[dict], block_size: int) -> dict:
    """Aggregate run records (one per response) of one decoding mode."""
    lengths = [n for r in runs for n in r["acceptance_lengths"]]
    tokens = sum(r["generated_tokens"] for r in runs)
    total_s = sum(r["total_s"] for r in runs)
    hist = acceptance_histogram(lengths, block_size)
    return {
        "block_size": block_size,
        "responses": len(runs),
        "generated_tokens": tokens,
        "steps": len(lengths),
        "tau": _mean([r["tau"] for r in runs if r["steps"]]),
        "tau_pooled": sum(lengths) / len(lengths) if lengths else None,
        "acceptance_histogram": hist,
        "acceptance_histogram_fraction": [h / len(lengths) for h in hist] if lengths else [0.0] * block_size,
        "per_position_acceptance": per_position_acceptance(lengths, block_size),
        "mean_ttft_s": _mean([r["ttft_s"] for r in runs]),
        "mean_tpot_s": _mean([r["tpot_s"] for r in runs if r["tpot_s"] is not None]),
        "tokens_per_s": tokens / total_s if total_s > 0 else None,
        "total_s": total_s,
    }


def _accuracy(records: list[dict], mode: str) -> float | None:
    graded = [r["turns"][0][mode]["correct"] for r in records if r.get("reference") is not None]
    return sum(graded) / len(graded) if graded else None


def summarize_group(records: list[dict], block_size: int) -> dict:
    """Summary of the records of one dataset (or of all): both modes, speedup, accuracy, identity."""
    turns = [t for r in records for t in r["turns"]]
    ar = summarize_runs([t["ar"] for t in turns], 1)
    spec = summarize_runs([t["spec"] for t in turns], block_size)
    speedup = (ar["mean_tpot_s"] / spec["mean_tpot_s"]
               if ar["mean_tpot_s"] is not None and spec["mean_tpot_s"] else None)
    equal = sum(1 for t in turns if t["outputs_equal"])
    out = {"samples": len(records), "responses": len(turns), "ar": ar, "spec": spec, "speedup": speedup,
           "outputs_equal": equal, "outputs_equal_fraction": equal / len(turns) if turns else None}
    graded = [r for r in records if r.get("reference") is not None]
    if graded:
        out["accuracy"] = {"graded": len(graded), "ar": _accuracy(graded, "ar"), "spec": _accuracy(graded, "spec")}
    return out


def summarize(records: list[dict], block_size: int, datasets: list[str]) -> dict:
    """{"datasets": {name: summary}, "overall": summary} in the given dataset order."""
    per = {name: summarize_group([r for r in records if r["dataset"] == name], block_size) for name in datasets}
    return {"datasets": per, "overall": summarize_group(records, block_size)}


def without_timing(records: list[dict]) -> list[dict]:
    """Copies of bench records with the timing fields removed: what must not change across runs or shards."""
    records = copy.deepcopy(records)
    for record in records:
        for turn in record["turns"]:
            for mode in ("ar", "spec"):
                for name in TIMING_FIELDS:
                    turn[mode].pop(name, None)
    return records
