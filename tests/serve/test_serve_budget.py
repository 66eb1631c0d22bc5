"""`longva serve --memory-budget`: the native engine is planned for the largest request the limits
let in (--max-frames, --max-tokens-limit) before it loads, and refused when nothing fits."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'longva[serve]'")
pytest.importorskip("uvicorn", reason="needs the serve extra: pip install 'longva[serve]'")

from support.media import write_video  # noqa: E402
from support.server import Server, data_url, media_part, request, text, user  # noqa: E402

from longva_cli.parallel.ranks import free_port  # noqa: E402

# On the wide checkpoint (tests/conftest.py) at 2 new tokens, 48 MiB holds a request of 2 frames
# only with an fp8 KV cache (their fp32 cache would not fit), and one of 4 frames under no setting.
BUDGET = "48MiB"


def test_limits_too_large_for_the_memory_budget_are_refused_before_loading(wide_checkpoint, monkeypatch, longva_main):
    monkeypatch.setattr("longva_cli.engine.loader.load", lambda *a, **k: pytest.fail("the model was loaded"))
    refused = longva_main("serve", "--model", wide_checkpoint, "--port", free_port(), "--device", "cpu", "--max-frames", "4",
                          "--max-tokens-limit", "2", "--memory-budget", BUDGET, "--cache-gb", "0")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    sentence = " ".join(refused.stderr.split())
    assert sentence.startswith("error: 4 frames need about") and sentence.count(". ") == 0
    assert sentence.endswith("ask for fewer frames (at most 2 fit: --max-frames 2) or raise --memory-budget.")


def test_the_cache_of_recent_requests_comes_out_of_the_memory_budget(wide_checkpoint, monkeypatch, longva_main):
    monkeypatch.setattr("longva_cli.engine.loader.load", lambda *a, **k: pytest.fail("the model was loaded"))
    common = ("serve", "--model", wide_checkpoint, "--port", free_port(), "--device", "cpu", "--max-frames", "2",
              "--max-tokens-limit", "2", "--memory-budget", BUDGET)
    crowded = longva_main(*common, "--cache-gb", "0.04")  # 41 MiB of the 48 kept for follow-ups: 2 frames no longer fit
    assert crowded.returncode == 1 and "raise --memory-budget" in crowded.stderr and "Traceback" not in crowded.stderr
    whole = longva_main(*common, "--cache-gb", "1")
    assert whole.returncode == 1
    assert whole.stderr.strip() == "error: the cache of recent requests (--cache-gb, 1.00 GiB) takes the whole 48 MiB memory budget; lower --cache-gb or raise --memory-budget."


def test_the_memory_budget_is_a_native_engine_flag(monkeypatch, longva_main):
    from longva_cli.serve import cli as serve_cli

    monkeypatch.setattr(serve_cli, "resolve_engine", lambda engine: "vllm")  # as if vLLM were here
    refused = longva_main("serve", "--engine", "vllm", "--memory-budget", "24GiB")
    assert refused.returncode == 1
    assert refused.stderr.strip() == "error: --memory-budget applies to --engine native; this server runs on the vllm engine."


@pytest.mark.integration
def test_a_budget_that_needs_an_fp8_kv_cache_serves_with_one(wide_checkpoint, tmp_path):
    video = write_video(tmp_path / "clip.mp4", frames=8, width=96, height=64)
    server = Server(wide_checkpoint, tmp_path, "--device", "cpu", "--max-frames", "2", "--max-tokens-limit", "2", "--memory-budget", BUDGET,
                    "--cache-gb", "0")
    try:
        body = {"messages": [user(media_part("video_url", data_url(video, "video/mp4")), text("What happens?"))], "video": {"frames": 2}}
        status, answer = request(server, "POST", "/v1/chat/completions", body)
        assert status == 200, answer
        assert answer["usage"]["completion_tokens"] <= 2
    finally:
        server.stop()
    assert "Memory plan for 2 frames on cpu: fp32 weights, fp8 KV cache, visual tokens on the device: about" in " ".join(server.log().split())
