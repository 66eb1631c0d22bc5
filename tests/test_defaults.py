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


def test_a_parameter_group_is_spelled_out_in_place_and_handed_over_whole():
    """`options.composed`: Typer sees a group's options where the signature names the group, in
    its order and with its defaults, and the command gets one instance of the group."""
    import typer
    from typer.testing import CliRunner

    from longva_cli import options

    got = {}
    app = typer.Typer(add_completion=False)

    @app.command()
    @options.composed
    def command(media_sampling: options.MediaSampling, model: options.Model = "tiny", *, loading: options.Loading) -> None:
        got.update(media_sampling=media_sampling, model=model, loading=loading)

    done = CliRunner().invoke(app, ["--frames", "8", "--device", "cpu"])
    assert done.exit_code == 0, done.output
    assert got == {"media_sampling": options.MediaSampling(frames=8), "model": "tiny", "loading": options.Loading(device="cpu")}
    names = [param.name for param in typer.main.get_command(app).params]
    assert names == ["frames", "fps", "model", "device", "dtype", "attn", "kv_cache", "device_map", "quantize", "quantize_backend"]


def test_help_pages_show_the_defaults_their_settings_hold(longva_main):
    """The numbers in help pages are read from the settings the commands build, not typed again."""
    from longva_cli.eval.settings import PplSettings
    from longva_cli.niah.settings import TextSettings, VideoSettings
    from longva_cli.serve.settings import RequestLimits

    def shown(*command: str) -> str:
        return " ".join(longva_main(*command, "--help").stdout.split())

    assert f"Most tokens to generate per answer. [default: {defaults.MAX_NEW_TOKENS}]" in shown("chat")
    serve = shown("serve")
    assert f"(144 tokens each). [default: {RequestLimits.max_frames}]" in serve
    assert f"also the default max_tokens. [default: {RequestLimits.max_tokens}]" in serve
    assert f"Smallest haystack, in frames [default: {VideoSettings.min_frames}]." in shown("niah", "video")
    assert f"Shortest haystack in tokens [default: {TextSettings.min_tokens}]." in shown("niah", "text")
    assert f"Smallest context length L. [default: {PplSettings.min_tokens}]" in shown("eval", "ppl")
