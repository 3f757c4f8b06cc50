"""The scripts behind every figure in docs/performance.md, run from the repository root as modules:
`python -m benchmarks.engine_limit ...`. What they share lives in `benchmarks.harness`; each script's
`--report FILE` renders its results JSON as the page's tables."""
