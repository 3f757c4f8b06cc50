"""Model-hub ids: the real download path exists, and offline it fails with a one-line message."""

import pytest

from blockspec.cli import main
from blockspec.draft import load_draft
from blockspec.errors import BlockspecError
from blockspec.hub import looks_like_hub_id
from blockspec.target import load_target


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-blockspec-test-cache")


def test_hub_ids_are_recognised(tmp_path):
    assert looks_like_hub_id("z-lab/Qwen3-4B-DFlash-b16")
    assert not looks_like_hub_id(str(tmp_path))  # an existing path is a path
    assert not looks_like_hub_id("just-a-name")


@pytest.mark.parametrize("load", [lambda: load_draft("z-lab/Qwen3-4B-DFlash-b16"),
                                  lambda: load_target("Qwen/Qwen3-4B")])
def test_offline_hub_download_is_a_one_line_error(offline, load):
    with pytest.raises(BlockspecError) as info:
        load()
    message = str(info.value)
    assert "\n" not in message and "local directory" in message


def test_cli_offline_hub_draft_exits_2(offline, capsys):
    code = main(["generate", "--target", "Qwen/Qwen3-4B", "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("blockspec: error:") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
