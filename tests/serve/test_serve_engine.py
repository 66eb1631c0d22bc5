"""`longva serve --engine native|vllm|auto`: which engine serves, and what a user is told when
the chosen one cannot. The vLLM engine's answers are tested in tests/vllm_plugin/test_vllm.py, in the
environment that has vLLM."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys

import pytest
import torch

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'longva[serve]'")
pytest.importorskip("uvicorn", reason="needs the serve extra: pip install 'longva[serve]'")

from support.server import Server, request, text, user  # noqa: E402

from longva_cli.errors import LongVAError  # noqa: E402
from longva_cli.serve import cli as serve_cli  # noqa: E402


def serve_command(checkpoint, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longva_cli", "serve", "--model", str(checkpoint), *flags],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_engine_vllm_without_vllm_fails_in_one_sentence_naming_the_install(tiny_checkpoint):
    result = serve_command(tiny_checkpoint, "--engine", "vllm")
    assert result.returncode == 1
    assert result.stderr.strip() == "error: `longva serve --engine vllm` needs vLLM, which is not installed: pip install 'longva[vllm]'."


@pytest.mark.integration
def test_flags_of_the_other_engine_are_refused_before_loading(tiny_checkpoint):
    result = serve_command(tiny_checkpoint, "--engine", "native", "--tensor-parallel", "2", "--max-model-len", "4096")
    assert result.returncode == 1
    assert result.stderr.strip() == "error: --tensor-parallel, --max-model-len apply to --engine vllm; this server runs on the native engine."
    with pytest.raises(LongVAError, match=r"^--cache-gb applies to --engine native; this server runs on the vllm engine\.$"):
        serve_cli.check_engine_flags("vllm", native_only={"--cache-gb": True, "--device": False}, vllm_only={})


def test_auto_is_native_where_vllm_is_missing_or_broken_and_vllm_then_says_why(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU is visible: auto would take vLLM
    real_find, real_import = importlib.util.find_spec, importlib.import_module
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find(name, *a))
    assert serve_cli.resolve_engine("auto") == "native"
    with pytest.raises(LongVAError, match=r"pip install 'longva\[vllm\]'"):
        serve_cli.resolve_engine("vllm")

    def broken(name, *args):
        if name == "vllm":
            raise OSError("libc10_cuda.so: cannot open shared object file")
        return real_import(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real_find(name, *a))
    monkeypatch.setattr(importlib, "import_module", broken)
    assert serve_cli.resolve_engine("auto") == "native"
    with pytest.raises(LongVAError, match=r"^vLLM is installed but does not import \(OSError: libc10_cuda\.so"):
        serve_cli.resolve_engine("vllm")


def test_vllm_dtype_resolves_auto_as_the_native_engine_does(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert serve_cli.vllm_dtype("auto") == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (serve_cli.vllm_dtype("auto"), serve_cli.vllm_dtype("bf16"), serve_cli.vllm_dtype("half")) == ("bfloat16", "bfloat16", "float16")
    with pytest.raises(LongVAError, match="--dtype 'int8' is not known"):
        serve_cli.vllm_dtype("int8")


@pytest.mark.integration
@pytest.mark.skipif(torch.cuda.is_available(), reason="auto takes vLLM where a GPU is visible and vLLM imports")
def test_engine_auto_serves_on_the_native_engine_on_a_cpu_machine(tiny_checkpoint, tmp_path):
    server = Server(tiny_checkpoint, tmp_path, "--engine", "auto")
    try:
        assert request(server, "GET", "/health")[1]["engine"] == "native"
        status, answer = request(server, "POST", "/v1/chat/completions", {"messages": [user(text("hi"))], "max_tokens": 2})
        assert status == 200, answer
        assert answer["choices"][0]["finish_reason"] == ("length" if answer["usage"]["completion_tokens"] == 2 else "stop")
    finally:
        server.stop()
    assert "on the native engine" in server.log()
