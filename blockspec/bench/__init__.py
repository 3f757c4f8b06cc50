"""`blockspec bench`: autoregressive vs speculative decoding in one harness over the standard datasets.

- `blockspec.datasets` (shared with training): loaders and the exact prompt formats of SPEC section 7.
- `metrics`: final-answer extraction and matching, acceptance statistics, aggregation.
- `runner`: decodes every prompt twice in the same process (block size 1, then block size B) after a warm-up
  excluded from timing, feeding multi-turn conversations their own answers; shards prompts across
  `torchrun` ranks and gathers the records on rank 0.
- `report`: results.json, summary.md and PNG plots.
- `cli`: the `blockspec bench` subcommand.

Importing this package is cheap (no torch): the CLI parser imports `blockspec.bench.cli` for every command.
"""
