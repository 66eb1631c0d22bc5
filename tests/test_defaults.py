"""The defaults several commands share are written once (longva_cli/defaults.py)."""

from longva_cli import defaults
from longva_cli.serve import cli as serve_cli


def test_serve_refuses_a_native_only_flag_given_at_its_default_value(longva_main, monkeypatch):
    """`--prefill-chunk 4096` does nothing on vLLM: said as for any other value, not taken for
    the flag's absence."""
    monkeypatch.setattr(serve_cli, "resolve_engine", lambda engine: "vllm")  # reach the check without vLLM installed
    done = longva_main("serve", "--engine", "vllm", "--prefill-chunk", str(defaults.PREFILL_CHUNK))
    assert done.returncode != 0
    assert "--prefill-chunk applies to --engine native" in " ".join(done.stderr.split())


def test_help_pages_show_the_shared_defaults(longva_main):
    ask = " ".join(longva_main("ask", "--help").stdout.split())
    assert f"Tokens per prefill step (smaller uses less memory). [default: {defaults.PREFILL_CHUNK}]" in ask
    assert f"(the original demo used 0.5). [default: {defaults.TEMPERATURE}]" in ask
    assert f"144 tokens each. [default: {defaults.FRAMES}]" in ask
    local = " ".join(longva_main("eval", "local", "--help").stdout.split())
    assert f"(144 tokens each). [default: {defaults.FRAMES}]" in local
