"""User-facing errors: one line that names the problem and the fix (the CLI prints it and exits 2)."""


class BlockspecError(Exception):
    """A user error (bad path, wrong config, mismatched draft and target, malformed request)."""
