"""`blockspec serve`: an OpenAI-compatible HTTP server with streaming and speculative metrics.

`blockspec.serve.app.create_app(target, draft)` builds the FastAPI app; `blockspec.serve.cli` is the
command. This package imports FastAPI only in `app`, so the rest of blockspec works without it.
"""

DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20  # larger request bodies get 413
