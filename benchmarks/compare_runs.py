"""Issue 23's check: engine_limit runs of an older commit and of this one, made in one device call, side by side.

Reads engine_limit results JSONs (the main mode or --ab) of each commit, takes per context and path the median
ms of a step over that commit's runs (AR ms/token, the DFlash / DFlare step ms), and says whether the new commit
is within the tolerance of the old one on every path, with the spread between runs of the same commit beside it
(a difference below that spread is noise), and whether every graphed greedy token sequence equals the eager one
in every run.

    python -m benchmarks.compare_runs --old OLD1.json OLD2.json --new NEW1.json NEW2.json   # markdown
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def step_ms(record: dict) -> dict[tuple[str, str], float]:
    """(context, path) -> ms per step of one engine_limit record: AR per token, each draft's step."""
    if "ab" in record:
        ab = record["ab"]
        settings = list(ab["settings"])
        return {(ctx, path if len(settings) == 1 else f"{path} ({setting})"): m[setting]["ms"]
                for ctx, row in ab["contexts"].items() for path, m in row.items() for setting in settings}
    out = {}
    for ctx, row in record["contexts"].items():
        for path in ("ar", "ar_per_op"):
            if path in row:
                out[ctx, path] = row[path]["ms_per_token"]
        for path in ("dflash", "dflare"):
            if path in row:
                out[ctx, path] = row[path]["ms_per_step"]
    return out


def graph_checks(record: dict) -> dict[str, bool]:
    checks = record["ab"]["check"] if "ab" in record else record["check"]
    return {name: ok for name, ok in checks.items() if name.endswith("_graph_equals_eager")}


def spread(runs: list[dict[tuple[str, str], float]]) -> float:
    """The largest relative difference between two runs of the same commit on one path."""
    return max((max(r[key] for r in runs) / min(r[key] for r in runs) - 1 for key in runs[0]), default=0.0)


def compare(old: list[dict], new: list[dict], tolerance: float) -> dict:
    old_ms, new_ms = [step_ms(r) for r in old], [step_ms(r) for r in new]
    rows = []
    for key in old_ms[0]:
        if all(key in r for r in new_ms):
            before = statistics.median(r[key] for r in old_ms)
            after = statistics.median(r[key] for r in new_ms)
            rows.append({"context": key[0], "path": key[1], "old_ms": before, "new_ms": after,
                         "ratio": after / before, "within": abs(after / before - 1) <= tolerance})
    return {"old_commit": old[0]["commit"], "new_commit": new[0]["commit"], "device": new[0]["device"],
            "runs": (len(old), len(new)), "tolerance": tolerance, "rows": rows,
            "spread": (spread(old_ms), spread(new_ms)),
            "graphs_equal_eager": (all(all(graph_checks(r).values()) for r in old),
                                   all(all(graph_checks(r).values()) for r in new)),
            "checks": (sum(len(graph_checks(r)) for r in old), sum(len(graph_checks(r)) for r in new))}


def report(c: dict) -> str:
    tol = f"{c['tolerance'] * 100:g}%"
    lines = [f"Commit {c['old_commit']} ({c['runs'][0]} runs) against {c['new_commit']} ({c['runs'][1]} runs), one "
             f"call on {c['device']}; median ms per step; run-to-run spread within a commit up to "
             f"{c['spread'][0] * 100:.1f}% (old) and {c['spread'][1] * 100:.1f}% (new).", "",
             f"| context | path | old ms | new ms | new / old | within {tol} |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in c["rows"]:
        lines.append(f"| {row['context']} | {row['path']} | {row['old_ms']:.3f} | {row['new_ms']:.3f} | "
                     f"{row['ratio']:.3f} | {'yes' if row['within'] else 'NO'} |")
    slower = [f"{r['path']} at {r['context']}" for r in c["rows"] if not r["within"]]
    equal = c["graphs_equal_eager"]
    lines += ["", f"Every path within {tol}: " + ("yes." if not slower else f"NO ({', '.join(slower)})."),
              f"Graphed greedy tokens equal eager in every run: old {'yes' if equal[0] else 'NO'} ({c['checks'][0]} "
              f"checks), new {'yes' if equal[1] else 'NO'} ({c['checks'][1]} checks)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", nargs="+", required=True, help="engine_limit JSONs of the older commit")
    parser.add_argument("--new", nargs="+", required=True, help="engine_limit JSONs of this commit")
    parser.add_argument("--tolerance", type=float, default=0.02)
    args = parser.parse_args()
    for path in args.old + args.new:
        if not Path(path).is_file():
            parser.error(f"{path} is not a file: did that engine_limit run finish?")
    load = [json.loads(Path(p).read_text()) for p in args.old], [json.loads(Path(p).read_text()) for p in args.new]
    print(report(compare(*load, args.tolerance)))


if __name__ == "__main__":
    main()
