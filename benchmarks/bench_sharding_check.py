"""Compare the records of two `blockspec bench` results.json files apart from timing fields: a torchrun run
sharded over N ranks must give the records of a 1-process run.

    python -m benchmarks.bench_sharding_check ONE/results.json SHARDED/results.json
"""

from __future__ import annotations

import json
import sys

from blockspec.bench.metrics import without_timing


def main() -> int:
    one, sharded = (json.load(open(path)) for path in sys.argv[1:3])
    a, b = without_timing(one["records"]), without_timing(sharded["records"])
    same = a == b
    print(json.dumps({"records": len(a), "identical_apart_from_timing": same,
                      "world_sizes": [one["config"].get("world_size"), sharded["config"].get("world_size")],
                      "devices": [one["environment"].get("devices"), sharded["environment"].get("devices")]}))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
