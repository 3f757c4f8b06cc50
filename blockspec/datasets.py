"""Benchmark datasets and their prompt formats (SPEC section 7), from a local folder or the model hub: the one
reader of prompt sets for `blockspec bench`, training's held-out evaluation and the benchmark scripts.

Every dataset becomes a list of `Sample`s: the user turns in order (already formatted), the reference final
answer where there is one, and the dataset's own id and category.

Prompt formats, exactly:
- gsm8k, math500, aime24, aime25: `{question}` + "\\nPlease reason step by step, and put your final answer
  within \\boxed{}." (gsm8k `question`; math500 `problem`; aime24 `problem`, else `question`; aime25
  `problem`).
- humaneval: "Write a solution to the following problem and make sure that it passes the tests:\\n```python\\n"
  + `prompt` + "\\n```".
- mbpp: the `prompt` field of the hand-verified *sanitized* MBPP, test split (task_id 11..510, 257 tasks).
  That is the split the public DFlash harness loads (`google-research-datasets/mbpp`, config `sanitized`,
  split `test`), and the local copy's SOURCE.md recommends the sanitized file where exactness matters.
- mt-bench, spec-bench: the `turns`, in order; the runner feeds each run's own answer back as the
  assistant turn before the next user turn.

Local layout (`--data-dir DIR`; default `default_data_dir()`), as in the project's shared data folder:
`gsm8k/test.jsonl`, `math500/test.jsonl`, `aime2024/test.jsonl`, `aime2025/test.jsonl`, `humaneval/HumanEval.jsonl.gz`,
`mbpp/sanitized-mbpp.json`, `mt_bench/question.jsonl`, `spec_bench/question.jsonl`.

Model hub: the same sets are fetched with `huggingface_hub` (no `datasets` dependency); parquet files need
`pyarrow`. Spec-Bench has no canonical hub copy, so it is local only.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from blockspec.errors import BlockspecError

MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
HUMANEVAL_TEMPLATE = ("Write a solution to the following problem and make sure that it passes the tests:\n"
                      "```python\n{prompt}\n```")
MBPP_TEST_TASK_IDS = range(11, 511)  # the standard MBPP test split: task ids 11..510

HUB = "hub"  # `--data-dir hub`: always download from the model hub


def default_data_dir() -> Path:
    """The data folder used when none is named: $BLOCKSPEC_DATA_DIR, else the project's shared data folder next
    to the repository (../shared/data)."""
    env = os.environ.get("BLOCKSPEC_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass(frozen=True)
class Sample:
    dataset: str  # canonical dataset name
    index: int  # position in the dataset (after the split filter), stable across runs and ranks
    id: str  # the dataset's own id (task_id, question_id, unique_id, ...) or the index
    turns: tuple[str, ...]  # user messages, formatted, in order
    reference: str | None = None  # reference final answer (math sets), for accuracy
    category: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    local: str  # file relative to the data folder
    parse: Callable[[str, list[dict], str], list[Sample]]  # (name, rows, source) -> samples
    hub_repo: str | None = None
    hub_files: str | None = None  # glob inside the hub repository
    graded: bool = False  # has reference answers: accuracy is reported
    aliases: tuple[str, ...] = field(default_factory=tuple)


# ---- field access ---------------------------------------------------------------------------------------------
def _get(row: dict, source: str, *names: str) -> object:
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    raise BlockspecError(f"{source}: a row has no {' / '.join(repr(n) for n in names)} field; is it the right file?")


def _text(row: dict, source: str, *names: str) -> str:
    value = _get(row, source, *names)
    if not isinstance(value, str):
        raise BlockspecError(f"{source}: field {names[0]!r} is {type(value).__name__}, expected text")
    return value


def gsm8k_reference(answer: str) -> str:
    """The final answer of a GSM8K solution: the text after the last '####', thousands commas removed."""
    return answer.split("####")[-1].strip().replace(",", "")


# ---- per-dataset parsers ----------------------------------------------------------------------------------------
def _math(question_fields: tuple[str, ...], reference: Callable[[dict, str], str], id_field: str | None):
    def parse(name: str, rows: list[dict], source: str) -> list[Sample]:
        out = []
        for i, row in enumerate(rows):
            question = _text(row, source, *question_fields)
            sample_id = str(row.get(id_field, i)) if id_field else str(i)
            out.append(Sample(name, i, sample_id, (question + MATH_SUFFIX,), reference(row, source)))
        return out
    return parse


def _parse_humaneval(name: str, rows: list[dict], source: str) -> list[Sample]:
    return [Sample(name, i, str(row.get("task_id", i)),
                   (HUMANEVAL_TEMPLATE.format(prompt=_text(row, source, "prompt")),))
            for i, row in enumerate(rows)]


def _parse_mbpp(name: str, rows: list[dict], source: str) -> list[Sample]:
    test = [row for row in rows if int(_get(row, source, "task_id")) in MBPP_TEST_TASK_IDS]
    return [Sample(name, i, str(row["task_id"]), (_text(row, source, "prompt"),)) for i, row in enumerate(test)]


def _parse_turns(name: str, rows: list[dict], source: str) -> list[Sample]:
    out = []
    for i, row in enumerate(rows):
        turns = _get(row, source, "turns", "prompt")
        if isinstance(turns, str):
            turns = [turns]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise BlockspecError(f"{source}: 'turns' must be a non-empty list of strings")
        out.append(Sample(name, i, str(row.get("question_id", i)), tuple(turns), category=row.get("category")))
    return out


DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("gsm8k", "gsm8k/test.jsonl",
                _math(("question",), lambda r, s: gsm8k_reference(_text(r, s, "answer")), None),
                "openai/gsm8k", "main/test-*.parquet", graded=True),
    DatasetSpec("math500", "math500/test.jsonl",
                _math(("problem",), lambda r, s: str(_get(r, s, "answer")), "unique_id"),
                "HuggingFaceH4/MATH-500", "test.jsonl", graded=True, aliases=("math-500",)),
    DatasetSpec("humaneval", "humaneval/HumanEval.jsonl.gz", _parse_humaneval,
                "openai/openai_humaneval", "openai_humaneval/test-*.parquet"),
    DatasetSpec("mbpp", "mbpp/sanitized-mbpp.json", _parse_mbpp,
                "google-research-datasets/mbpp", "sanitized/test-*.parquet"),
    DatasetSpec("mt-bench", "mt_bench/question.jsonl", _parse_turns,
                "HuggingFaceH4/mt_bench_prompts", "raw/question.jsonl", aliases=("mt_bench", "mtbench")),
    DatasetSpec("aime24", "aime2024/test.jsonl",
                _math(("problem", "question"), lambda r, s: str(_get(r, s, "answer")), "id"),
                "HuggingFaceH4/aime_2024", "data/train-*.parquet", graded=True, aliases=("aime2024",)),
    DatasetSpec("aime25", "aime2025/test.jsonl",
                _math(("problem",), lambda r, s: str(_get(r, s, "answer")), "id"),
                "math-ai/aime25", "test.jsonl", graded=True, aliases=("aime2025",)),
    DatasetSpec("spec-bench", "spec_bench/question.jsonl", _parse_turns, aliases=("spec_bench", "specbench")),
)}
DATASET_NAMES: tuple[str, ...] = tuple(DATASETS)
_ALIASES = {alias: spec.name for spec in DATASETS.values() for alias in (spec.name, *spec.aliases)}


def resolve_names(names: str | list[str]) -> list[str]:
    """Canonical dataset names from a comma-separated list (order kept, duplicates dropped)."""
    parts = names.split(",") if isinstance(names, str) else [p for n in names for p in n.split(",")]
    out: list[str] = []
    for part in (p.strip().lower() for p in parts):
        if not part:
            continue
        if part not in _ALIASES:
            raise BlockspecError(f"unknown dataset {part!r}; valid names: {', '.join(DATASET_NAMES)}")
        if _ALIASES[part] not in out:
            out.append(_ALIASES[part])
    if not out:
        raise BlockspecError(f"no dataset given; valid names: {', '.join(DATASET_NAMES)}")
    return out


# ---- file reading -----------------------------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict]:
    """Rows of a .jsonl, .jsonl.gz, .json (a list) or .parquet file."""
    name = path.name
    try:
        if name.endswith(".parquet"):
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise BlockspecError(f"reading {name} needs pyarrow (`pip install pyarrow`), or pass --data-dir "
                                     f"with a local copy of the dataset") from None
            return pq.read_table(str(path)).to_pylist()
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            if name.endswith(".json"):
                rows = json.load(f)
            else:
                rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise BlockspecError(f"cannot read dataset file {path} ({type(exc).__name__}: {exc})") from None
    except json.JSONDecodeError as exc:
        raise BlockspecError(f"dataset file {path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise BlockspecError(f"dataset file {path} must hold a list of JSON objects")
    return rows


def _hub_files(spec: DatasetSpec) -> list[Path]:
    if spec.hub_repo is None:
        raise BlockspecError(f"dataset {spec.name!r} has no model-hub copy: pass --data-dir DIR holding "
                             f"{spec.local} (see README, Benchmarking)")
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(spec.hub_repo, repo_type="dataset", allow_patterns=[spec.hub_files]))
    except Exception as exc:  # offline, unknown repo, HTTP errors: all one user-facing line
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise BlockspecError(f"cannot download dataset {spec.name!r} ({spec.hub_repo}) from the model hub "
                             f"({reason}); offline, pass --data-dir DIR holding {spec.local}") from None
    files = sorted(folder.glob(spec.hub_files))
    if not files:
        raise BlockspecError(f"the model-hub dataset {spec.hub_repo} has no file matching {spec.hub_files!r}; "
                             f"pass --data-dir DIR holding {spec.local}")
    return files


def locate(name: str, data_dir: str | Path | None) -> tuple[list[Path], str]:
    """The files of a dataset and a description of where they came from.

    data_dir None: the default data folder when it holds the dataset, else the model hub; "hub": the model hub;
    a folder: that folder only (a missing file is an error).
    """
    spec = DATASETS[name]
    if data_dir is None:
        local = default_data_dir() / spec.local
        if local.is_file():
            return [local], str(local)
        return _hub_files(spec), f"hub:{spec.hub_repo}/{spec.hub_files}"
    if str(data_dir) == HUB:
        return _hub_files(spec), f"hub:{spec.hub_repo}/{spec.hub_files}"
    directory = Path(data_dir).expanduser()
    if not directory.is_dir():
        raise BlockspecError(f"--data-dir {str(data_dir)!r} is not a directory")
    local = directory / spec.local
    if not local.is_file():
        raise BlockspecError(f"dataset {name!r} not found: expected {local} (or pass --data-dir hub to download it)")
    return [local], str(local)


def load_dataset(name: str, data_dir: str | Path | None = None) -> tuple[list[Sample], str]:
    """All samples of one dataset (canonical name) and their source."""
    spec = DATASETS[name]
    files, source = locate(name, data_dir)
    rows = [row for path in files for row in read_rows(path)]
    samples = spec.parse(name, rows, source)
    if not samples:
        raise BlockspecError(f"dataset {name!r} from {source} has no samples")
    return samples, source


def select(samples: list[Sample], max_samples: int | None, shuffle_seed: int | None = None) -> list[Sample]:
    """The first `max_samples` (or a seeded random subset, kept in dataset order)."""
    if max_samples is None or max_samples >= len(samples):
        return list(samples)
    if shuffle_seed is None:
        return list(samples[:max_samples])
    picked = random.Random(shuffle_seed).sample(range(len(samples)), max_samples)
    return [samples[i] for i in sorted(picked)]


def load_samples(names: str | list[str], data_dir: str | Path | None = None, max_samples: int | None = None,
                 shuffle_seed: int | None = None) -> tuple[list[Sample], dict[str, dict]]:
    """Samples of every requested dataset, in request order, and per-dataset info (source, sizes)."""
    if max_samples is not None and max_samples < 1:
        raise BlockspecError(f"--max-samples must be a positive integer, got {max_samples}")
    out: list[Sample] = []
    info: dict[str, dict] = {}
    for name in resolve_names(names):
        samples, source = load_dataset(name, data_dir)
        chosen = select(samples, max_samples, shuffle_seed)
        info[name] = {"source": source, "available": len(samples), "selected": len(chosen),
                      "graded": DATASETS[name].graded}
        out.extend(chosen)
    return out, info
