"""User-facing errors: one line that names the problem and the fix (the CLI prints it and exits 2)."""


class BlockspecError(Exception):
    """A user error (bad path, wrong config, mismatched draft and target, malformed request)."""


def brief(value: object, limit: int = 40) -> str:
    """repr(value), cut to about `limit` characters: a message never echoes a huge input (a 4,000-digit
    seed, a megabyte model name) back in full."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
