from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Tests never reach the hub: a lookup that would download must fail at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Visual-embedding caches of the tests' runs stay out of the user's ~/.cache.
os.environ.setdefault("XDG_CACHE_HOME", tempfile.mkdtemp(prefix="longva-tests-cache-"))
# DeepSpeed's CPU communication op is compiled once (about a minute) into the checkout and shared by
# every test that starts DeepSpeed, run alone or in any order, rather than once per temporary cache.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".torch_extensions"))

from support.media import write_image, write_video  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random LongVA checkpoint in the exact hub layout (sharded safetensors, real key names)."""
    from longva_cli.model.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("checkpoints") / "tiny-longva")


@pytest.fixture(scope="session")
def wide_checkpoint(tmp_path_factory) -> Path:
    """Tiny in depth, wide enough (hidden 512, head dim 128) that weights, KV cache, visual tokens
    and activations are each megabytes, as their shares of a 7B run are gigabytes: the memory
    plan's tests (tests/engine/test_plan.py, and each command's --memory-budget)."""
    from longva_cli.model.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("wide") / "wide-longva", hidden_size=512, max_shard_size="50MB")


@pytest.fixture(scope="session")
def tiny_longva(tiny_checkpoint):
    from longva_cli import LongVA

    return LongVA.from_pretrained(str(tiny_checkpoint), device="cpu")


@pytest.fixture(scope="session")
def video_file(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("media") / "clip.mp4", frames=30)


@pytest.fixture(scope="session")
def image_file(tmp_path_factory) -> Path:
    return write_image(tmp_path_factory.mktemp("media") / "photo.png")


@pytest.fixture
def longva_main(monkeypatch, capsys):
    """Run `longva ARGS...` through the executable's own `main` in this process, as a finished
    process: a process each would cost seconds of imports (integration tests run the executable)."""
    from longva_cli.cli import main

    monkeypatch.setenv("COLUMNS", "200")  # main widens a terminal-less run through the environment

    def run(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["longva", *map(str, args)])
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        with pytest.raises(SystemExit) as exited:
            main()
        return subprocess.CompletedProcess(sys.argv, exited.value.code or 0, *capsys.readouterr())

    return run
