"""Broken and hostile inputs: damaged checkpoints, decompression bombs, huge or truncated videos.

Each test makes its bad file itself and checks for one `LongVAError` sentence that names the
file and says what to do, raised before any large allocation.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from longva_cli import media
from longva_cli.errors import LongVAError
from longva_cli.model.checkpoint import load_longva, load_tokenizer
from longva_cli.model.files import weight_map
from longva_cli.model.config import ImageProcessing
from longva_cli.model.processing import preprocess
from support.media import frame_pattern, png_claiming, write_blank_video, write_video
from support.cli import assert_clean_error, longva

# ---- checkpoints -------------------------------------------------------------------------------


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path) -> Path:
    """A private copy of the tiny checkpoint to damage."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "tiny-longva"))


def load(folder: Path):
    return load_longva(folder, dtype=torch.float32, attn_implementation="sdpa")


def a_shard(folder: Path) -> Path:
    return folder / sorted(set(weight_map(folder).values()))[1]


def as_single_file(folder: Path) -> Path:
    """Rewrite a sharded checkpoint as one model.safetensors, as small checkpoints ship."""
    from safetensors.torch import load_file, save_file

    state = {}
    for name in sorted(set(weight_map(folder).values())):
        state.update(load_file(folder / name))
        (folder / name).unlink()
    (folder / "model.safetensors.index.json").unlink()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder / "model.safetensors"


DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "cut in its header": lambda data: data[:100],
    "empty": lambda data: b"",
    "random bytes": lambda data: np.random.default_rng(0).bytes(4000),
}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("layout", ["shard", "single file"])
def test_damaged_weight_file_is_named_with_what_to_do(checkpoint, damage, layout):
    weights = a_shard(checkpoint) if layout == "shard" else as_single_file(checkpoint)
    weights.write_bytes(DAMAGE[damage](weights.read_bytes()))
    with pytest.raises(LongVAError, match=rf"{weights.name} is truncated or not a safetensors file .*longva download"):
        load(checkpoint)


def test_damaged_weights_in_the_hub_cache_name_the_repo_to_download(checkpoint, tmp_path):
    snapshot = tmp_path / "hub" / "models--lmms-lab--LongVA-7B-DPO" / "snapshots" / "0123abcd"
    shutil.copytree(checkpoint, snapshot)
    shard = a_shard(snapshot)
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(LongVAError, match=r"run `longva download lmms-lab/LongVA-7B-DPO`, which fetches only what is missing"):
        load(snapshot)


def edit_config(folder: Path, **fields) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"hidden_size": "big"}, "'hidden_size' expected int, got str"),
        ({"num_hidden_layers": 0}, "'num_hidden_layers' must be a positive integer"),
        ({"mm_hidden_size": "wide"}, "'mm_hidden_size' must be an integer"),
        ({"image_grid_pinpoints": 5}, "'image_grid_pinpoints' must be a list of [width, height] pairs"),
        ({"mm_vision_tower": ["a", "b"]}, "'mm_vision_tower' must be a string"),
    ],
)
def test_config_field_of_the_wrong_type_is_named(checkpoint, fields, fragment):
    edit_config(checkpoint, **fields)
    with pytest.raises(LongVAError) as caught:
        load(checkpoint)
    assert fragment in str(caught.value) and str(checkpoint / "config.json") in str(caught.value)


@pytest.mark.parametrize("text, fragment", [("[1, 2]", "holds a JSON list"), ("{\"hidden_size\": ", "is not valid JSON"), ("\udcff", "is not JSON text")])
def test_config_that_is_not_a_json_object_is_named(checkpoint, text, fragment):
    (checkpoint / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(LongVAError, match=f"config.json {fragment}"):
        load(checkpoint)


def test_a_config_file_far_too_large_is_refused_before_it_is_parsed(checkpoint, monkeypatch):
    from longva_cli.model import config

    monkeypatch.setattr(config, "MAX_JSON_BYTES", 4096)  # the real bound is 64 MiB: the same check, on a small file
    edit_config(checkpoint, padding="x" * 5000)
    with pytest.raises(LongVAError, match=r"config.json is [\d,]+ bytes, far more than a checkpoint's JSON file holds \(4,096 at most\)"):
        load(checkpoint)


def test_damaged_vision_tower_config_is_named(checkpoint):
    edit_config(checkpoint, mm_vision_tower=str(checkpoint / "vision_tower"))
    tower_config = checkpoint / "vision_tower" / "config.json"
    intact = tower_config.read_text()
    tower_config.write_text('{"vision_config": {"patch_size": "14"}}')
    with pytest.raises(LongVAError, match=r"vision_tower/config.json: Field 'patch_size'"):
        load(checkpoint)
    tower_config.write_text(intact)
    (checkpoint / "vision_tower" / "preprocessor_config.json").write_text("{")
    with pytest.raises(LongVAError, match=r"vision_tower/preprocessor_config.json is not valid JSON"):
        load(checkpoint)


@pytest.mark.parametrize("outside", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../outside.safetensors"])
def test_a_weight_map_entry_outside_the_checkpoint_is_refused(checkpoint, outside):
    """An index naming `../../../etc/passwd` made loading open it: a name must stay inside the folder."""
    shutil.copy(a_shard(checkpoint), checkpoint.parent / "outside.safetensors")  # a real file there, not a missing one
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    victim = next(iter(index["weight_map"]))
    index["weight_map"][victim] = outside
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LongVAError, match=rf"names the weight file '{re.escape(outside)}', which is outside the checkpoint folder"):
        load(checkpoint)


@pytest.mark.parametrize("fields", [{"num_hidden_layers": 100_000}, {"hidden_size": 2**40}, {"intermediate_size": 2**40}])
def test_a_config_describing_a_huge_model_is_refused_before_anything_is_allocated(checkpoint, fields):
    """`num_hidden_layers: 100000` or `hidden_size: 2**40` allocated until the process was killed."""
    edit_config(checkpoint, **fields)
    with pytest.raises(LongVAError, match=r"config.json describes a language model of [\d,]+ parameters, but the weight files hold [\d,]+ numbers for it"):
        load(checkpoint)


@pytest.mark.parametrize("victim", ["model.layers.0.mlp.up_proj.weight", "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"])
def test_a_shard_tensor_of_the_wrong_shape_is_named(checkpoint, victim):
    from safetensors.torch import load_file, save_file

    shard = checkpoint / weight_map(checkpoint)[victim]
    tensors = load_file(shard)
    wanted = list(tensors[victim].shape)
    tensors[victim] = tensors[victim].t().contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(LongVAError, match=rf"tensor {re.escape(victim)} has shape \[{wanted[1]}, {wanted[0]}\] where config.json gives \[{wanted[0]}, {wanted[1]}\]"):
        load(checkpoint)


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"repetition_penalty": "x"}, "field 'repetition_penalty' must be a finite number above 0 or null, got 'x'"),
        ({"top_k": -5}, "field 'top_k' must be a whole number at least 0 or null, got -5"),
        ({"eos_token_id": ["<|im_end|>"]}, "eos_token_id"),
    ],
)
def test_a_generation_config_with_unusable_sampling_fields_is_named(checkpoint, fields, fragment):
    from longva_cli.model.config import read_generation_config

    path = checkpoint / "generation_config.json"
    path.write_text(json.dumps({**(json.loads(path.read_text()) if path.is_file() else {}), **fields}))
    with pytest.raises(LongVAError, match=re.escape(fragment)):
        read_generation_config(checkpoint)


def test_unreadable_weight_index_is_named(checkpoint):
    (checkpoint / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(LongVAError, match="model.safetensors.index.json holds a JSON list"):
        load(checkpoint)


@pytest.mark.parametrize(
    "name, text, fragment",
    [
        ("tokenizer.json", "<html>Bad gateway</html>", "tokenizer.json is not valid JSON"),
        ("tokenizer_config.json", "{oops", "tokenizer_config.json is not valid JSON"),
        ("tokenizer.json", "{}", "the tokenizer files in"),
    ],
)
def test_damaged_tokenizer_file_is_named(checkpoint, name, text, fragment):
    (checkpoint / name).write_text(text)
    with pytest.raises(LongVAError, match=fragment):
        load_tokenizer(checkpoint)


def test_ask_with_a_truncated_shard_prints_one_sentence(checkpoint, video_file):
    shard = a_shard(checkpoint)
    shard.write_bytes(shard.read_bytes()[:-10])
    result = longva("ask", str(video_file), "Q?", "--model", str(checkpoint), "--frames", "2")
    assert_clean_error(result, f"{shard.name} is truncated")


# ---- transformers' noise while loading ---------------------------------------------------------


def as_transformers_4_config(folder: Path, rope_scaling) -> None:
    """config.json as LongVA's hub checkpoints were written: rope_theta at the top, rope_scaling."""
    config = json.loads((folder / "config.json").read_text())
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    config.update(rope_scaling=rope_scaling, transformers_version="4.40.0.dev0")
    (folder / "config.json").write_text(json.dumps(config))


def test_ask_shows_one_loading_line_and_no_transformers_noise(checkpoint, video_file):
    as_transformers_4_config(checkpoint, None)
    result = longva("ask", str(video_file), "Q?", "--model", str(checkpoint), "--frames", "2", "--max-new-tokens", "2")
    assert result.returncode == 0, result.stderr
    assert "Loading weights" not in result.stderr
    assert "Warning" not in result.stderr and "site-packages" not in result.stderr
    assert result.stderr.count("Loaded") == 1


def test_loading_silences_only_its_own_noise_and_only_while_loading(checkpoint, capfd):
    import logging

    from transformers.utils import logging as transformers_logging

    as_transformers_4_config(checkpoint, {"type": "linear", "factor": 1.0})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load(checkpoint)
        load_tokenizer(checkpoint)
        warnings.warn("`rope_scaling` is deprecated (a later warning)", FutureWarning)
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == ["`rope_scaling` is deprecated (a later warning)"]
    assert "Loading weights" not in capfd.readouterr().err
    assert not logging.getLogger("transformers.configuration_utils").filters
    assert transformers_logging.set_tqdm_hook(None) is None  # no hook left behind


# ---- images ------------------------------------------------------------------------------------


@pytest.fixture
def no_image_decoding(monkeypatch):
    def refuse(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.mark.parametrize("side", [13000, 30000])
def test_huge_image_is_refused_from_its_header(tmp_path, side, no_image_decoding):
    path = tmp_path / f"bomb-{side}.png"
    path.write_bytes(png_claiming(side, side))
    with pytest.raises(LongVAError, match=rf"{path.name} is .*67-megapixel limit \(8192 x 8192\)"):
        media.open_image(path)
    with pytest.raises(LongVAError, match="needle.png is .*67-megapixel limit"):
        media.image_from_bytes(path.read_bytes(), "needle.png")


def test_long_thin_image_within_the_pixel_limit_is_read(tmp_path):
    path = tmp_path / "wide.png"
    Image.fromarray(frame_pattern(0, 9000, 40)).save(path)
    assert media.open_image(path).size == (9000, 40)


def test_truncated_image_is_reported(tmp_path, image_file):
    path = tmp_path / "cut.png"
    path.write_bytes(image_file.read_bytes()[:700])
    with pytest.raises(LongVAError, match="cut.png looks like an image but cannot be read"):
        media.open_image(path)


def test_ask_about_an_image_bomb_prints_one_sentence(tmp_path, tiny_checkpoint):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(30000, 30000))
    assert_clean_error(longva("ask", str(path), "Q?", "--model", str(tiny_checkpoint)), "67-megapixel limit")


# ---- videos ------------------------------------------------------------------------------------


@pytest.fixture(params=["decord", "pyav"])
def decoder(request, monkeypatch):
    """Run a test with decord and again with PyAV, the fallback where decord has no wheel."""
    if request.param == "pyav":
        monkeypatch.setitem(sys.modules, "decord", None)
    else:
        pytest.importorskip("decord")
    return request.param


@pytest.fixture
def no_frame_decoding(monkeypatch, decoder):
    def refuse(*args, **kwargs):
        raise AssertionError("frames were decoded")

    monkeypatch.setattr(media, "_PyAVReader", refuse)
    if decoder == "decord":
        import decord

        monkeypatch.setattr(decord, "VideoReader", refuse)


HUGE_FRAMES = {"59-megapixel": (7680, 7680), "wider than 8192": (8200, 64), "17:1": (1700, 96)}


@pytest.fixture(scope="module")
def huge_videos(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("huge")
    return {name: write_blank_video(folder / f"huge-{size[0]}x{size[1]}.mp4", *size) for name, size in HUGE_FRAMES.items()}


@pytest.mark.parametrize("name", HUGE_FRAMES)
def test_huge_frames_are_refused_from_the_container(huge_videos, name, no_frame_decoding):
    path, (width, height) = huge_videos[name], HUGE_FRAMES[name]
    assert path.stat().st_size < 200_000  # a small file claiming big frames, as the attack's 49 KB
    with pytest.raises(LongVAError, match=rf"{path.name} has {width} x {height} frames, beyond what longva decodes \(8K"):
        media.open_video(path)


def test_ask_about_a_video_of_huge_frames_prints_one_sentence(huge_videos, tiny_checkpoint):
    result = longva("ask", str(huge_videos["59-megapixel"]), "Q?", "--model", str(tiny_checkpoint))
    assert_clean_error(result, "7680 x 7680 frames")


def test_frame_limits_are_8k():
    media.check_frame_size(Path("ok.mp4"), 8192, 4352)
    media.check_frame_size(Path("ok.mp4"), 1600, 100)
    for width, height in [(8192, 4353), (8193, 600), (1601, 100)]:
        with pytest.raises(LongVAError):
            media.check_frame_size(Path("big.mp4"), width, height)


def test_video_tells_its_length_and_frame_size_before_decoding(tmp_path, decoder):
    path = write_video(tmp_path / "clip.mkv", frames=12, width=160, height=96)
    video = media.open_video(path)
    assert (video.num_frames, video.width, video.height) == (12, 160, 96)
    assert video.frame_bytes == 160 * 96 * 3


def write_faststart(path: Path, frames: int = 60) -> Path:
    """An MP4 with its index first (as web videos are), so a cut-off copy still opens."""
    with av.open(str(path), mode="w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 160, 96, "yuv420p"
        stream.options = {"g": "5"}
        for index in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame_pattern(index, 160, 96), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_truncated_video_says_what_to_do_without_decoder_internals(tmp_path, decoder):
    path = write_faststart(tmp_path / "movie.mp4")
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.98)])
    with pytest.raises(LongVAError) as caught:
        video = media.open_video(path)
        list(video.batches(media.uniform_frame_ids(video.num_frames, 60), 16))
    message = str(caught.value)
    assert "movie.mp4 is truncated or damaged" in message and "download it again" in message
    for internal in ("/io/", "/src/", ".cc", "github", "avcodec", "Check failed"):
        assert internal not in message


def test_mp4_cut_before_its_index_is_called_truncated(tmp_path):
    path = write_video(tmp_path / "download.mp4", frames=30)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(LongVAError, match="download.mp4 is an MP4/MOV file whose index cannot be read: it is truncated"):
        media.open_video(path)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=40, width=320, height=180)


@pytest.mark.parametrize("pad_to_square", [False, True])
def test_pixel_batches_equal_preprocessing_the_full_frames(clip, decoder, pad_to_square):
    video = media.open_video(clip)
    ids = media.uniform_frame_ids(video.num_frames, 37)
    settings = ImageProcessing()
    expected = torch.cat([preprocess(list(frames), settings, pad_to_square=pad_to_square) for frames in video.batches(ids, 16)])
    # A budget below one frame: decoded one at a time, still handed on 16 at a time.
    batches = list(video.pixel_batches(ids, settings, batch_size=16, pad_to_square=pad_to_square, max_bytes=1))
    assert [len(b) for b in batches] == [16, 16, 5]
    assert torch.equal(torch.cat(batches), expected)


def test_batches_shrink_to_fit_a_byte_budget(clip, decoder):
    video = media.open_video(clip)
    sizes = [len(b) for b in video.batches(list(range(10)), 16, max_bytes=3 * video.frame_bytes)]
    assert sizes == [3, 3, 3, 1]
    assert [len(b) for b in video.batches(list(range(10)), 16, max_bytes=1)] == [1] * 10


def test_frames_above_4k_are_decoded_by_pyav_with_the_same_pixels(clip, monkeypatch):
    pytest.importorskip("decord")
    ids = [0, 7, 7, 30, 39]
    by_decord = next(media.open_video(clip).batches(ids, 16))
    monkeypatch.setattr(media, "DECORD_MAX_PIXELS", 320 * 180 - 1)
    video = media.open_video(clip)
    assert isinstance(video._reader, media._PyAVReader)
    assert np.array_equal(next(video.batches(ids, 16)), by_decord)


def test_tiny_video_under_default_budget_keeps_sixteen_frame_batches(clip, decoder):
    video = media.open_video(clip)
    batches = list(video.pixel_batches(list(range(40)), ImageProcessing()))
    assert [len(b) for b in batches] == [16, 16, 8]


def test_pyav_reads_batches_of_later_frames_in_one_pass(clip, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)
    video = media.open_video(clip)
    opened = []
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *args, **kwargs: opened.append(args) or real_open(*args, **kwargs))
    frames = np.concatenate(list(video.batches(list(range(0, 40, 3)), 4)))
    assert len(opened) == 1 and len(frames) == 14
    next(video.batches([0], 1))  # going back starts a new pass
    assert len(opened) == 2


# ---- which frames ------------------------------------------------------------------------------


def test_fps_cap_spreads_the_frames_over_the_whole_video():
    # 11 s at 30 fps, 2 frames a second capped at 12: the last frame is near the end, not at 5.5 s.
    ids = media.frame_ids_at_fps(330, 30.0, 2.0, max_frames=12)
    assert len(ids) == 12 and ids[0] == 0 and ids[-1] == 329
    assert ids == media.uniform_frame_ids(330, 12)
    assert media.frame_ids_at_fps(330, 30.0, 2.0, max_frames=30) == list(range(0, 330, 15))  # under the cap: every 15th


def test_fps_without_a_cap_keeps_every_sampled_frame_for_haystacks():
    assert media.frame_ids_at_fps(3600, 30.0, 1.0) == list(range(0, 3600, 30))


@pytest.mark.parametrize("fps, video_fps, fragment", [(float("nan"), 30.0, "--fps must be positive"), (1.0, 0.0, "no usable frame rate"), (1.0, float("nan"), "no usable frame rate")])
def test_fps_sampling_refuses_impossible_rates(fps, video_fps, fragment):
    with pytest.raises(LongVAError, match=fragment):
        media.frame_ids_at_fps(100, video_fps, fps, max_frames=8)
