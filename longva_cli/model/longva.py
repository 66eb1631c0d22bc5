"""`LongVA`: load a checkpoint, turn media into visual tokens, answer questions.

    model = LongVA.from_pretrained("lmms-lab/LongVA-7B-DPO")
    answer = model.ask("movie.mp4", "What happens after the car stops?", frames=128)
    print(answer.answer, answer.visual_tokens)

This is the one place that joins the encoder, the prompt builder and the generator; `ask`,
`niah`, `serve` and `eval` all go through it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from longva_cli.errors import LongVAError
from longva_cli.hub import DEFAULT_MODEL
from longva_cli.model import media as media_io
from longva_cli.model.config import ImageProcessing, vision_settings
from longva_cli.model.generation import DEFAULT_PREFILL_CHUNK, SamplingSettings, generate, stream_text
from longva_cli.model.modeling import LongVAForCausalLM
from longva_cli.model.prefix_cache import PrefixCache, Sequence, generate_after, pieces_sequence
from longva_cli.model.processing import preprocess, unires_crops
from longva_cli.model.prompt import DEFAULT_SYSTEM, END_OF_TURN, question_prompt, tokenize_segments

DEFAULT_FRAMES = 32
VISION_BATCH = 16  # frames decoded, preprocessed and encoded together: bounds memory at any length

DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


@dataclass
class Visual:
    """Visual tokens of one media item, in the order they enter the prompt."""

    embeds: torch.Tensor  # [images * 144, d]
    kind: str  # "video" or "image"
    images: int  # frames of a video, crops of an image
    frame_ids: list[int] = field(default_factory=list)
    grid: tuple[int, int] | None = None  # (w, h) of the UniRes canvas, images only


@dataclass
class Answer:
    """What `ask` returns: the answer and how it was obtained (printed by `longva ask --json`)."""

    answer: str
    model: str
    media: str | None
    media_type: str | None
    frames: int
    visual_tokens: int
    prompt_tokens: int
    generated_tokens: int
    timings: dict[str, float]
    frame_ids: list[int] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise LongVAError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise LongVAError("CUDA was asked for but no GPU is visible to PyTorch; use --device cpu or check the driver.")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise LongVAError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) are visible.")
    elif resolved.type != "cpu":
        raise LongVAError(f"--device {device!r} is not supported; use auto, cpu, cuda or cuda:N.")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise LongVAError(f"--dtype {dtype!r} is not known; use auto, bfloat16, float16 or float32.")
    return DTYPES[dtype]


def resolve_attention(attn: str, device: torch.device) -> str:
    if attn == "auto":
        if device.type == "cuda":
            try:
                import flash_attn  # noqa: F401

                return "flash_attention_2"
            except ImportError:
                pass
        return "sdpa"
    if attn not in ("sdpa", "eager", "flash_attention_2"):
        raise LongVAError(f"--attn {attn!r} is not known; use auto, sdpa, eager or flash_attention_2.")
    if attn == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise LongVAError("flash-attention is not installed; `pip install longva[gpu]` on a CUDA machine, or use --attn sdpa.") from None
    return attn


def quantization_config(quantize: str | None, dtype: torch.dtype, device: torch.device):
    """bitsandbytes settings for the language model; the tower and projector stay in `dtype`."""
    if quantize is None:
        return None
    if quantize not in ("4bit", "8bit"):
        raise LongVAError(f"--quantize {quantize!r} is not known; use 4bit or 8bit.")
    if device.type != "cuda":
        raise LongVAError("4-bit and 8-bit loading need a CUDA GPU (bitsandbytes); drop --quantize on CPU.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LongVAError("--quantize needs bitsandbytes: `pip install bitsandbytes`.") from None
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")
    return BitsAndBytesConfig(load_in_8bit=True)


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors on `device`."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def kv_cache_bytes(config, tokens: int, dtype: torch.dtype) -> int:
    """Size of the KV cache for `tokens` positions: 2 x layers x kv heads x head dim per token."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
    return tokens * per_token * torch.tensor([], dtype=dtype).element_size()


class LongVA:
    """A loaded LongVA model with its tokenizer and preprocessing."""

    def __init__(
        self,
        model: LongVAForCausalLM,
        tokenizer,
        processing: ImageProcessing,
        name: str = "longva",
        generation_config: dict | None = None,
        load_seconds: float = 0.0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.processing = processing
        self.name = name
        self.generation_config = generation_config or {}
        self.load_seconds = load_seconds
        eos = self.generation_config.get("eos_token_id", [])
        eos = eos if isinstance(eos, list) else [eos]
        self.stop_ids = {tokenizer.convert_tokens_to_ids(END_OF_TURN), *eos}

    # ---- loading ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path = DEFAULT_MODEL,
        *,
        device: str = "auto",
        dtype: str = "auto",
        attn_implementation: str = "auto",
        device_map: str | None = None,
        quantize: str | None = None,
        revision: str | None = None,
        download: bool = True,
    ) -> "LongVA":
        """Load a checkpoint folder or hub id (from the local cache, downloading it if missing)."""
        from longva_cli.hub import locate_model

        started = time.perf_counter()
        target = resolve_device(device) if device_map is None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device_map is not None and device_map != "auto":
            raise LongVAError(f"--device-map {device_map!r} is not supported; use auto (split across the visible GPUs).")
        torch_dtype = resolve_dtype(dtype, target)
        attention = resolve_attention(attn_implementation, target)
        quantization = quantization_config(quantize, torch_dtype, target)
        folder = locate_model(str(model), revision=revision, allow_download=download)
        from longva_cli.model.checkpoint import load_longva

        network = load_longva(
            folder,
            dtype=torch_dtype,
            attn_implementation=attention,
            device=target,
            device_map=device_map,
            quantization_config=quantization,
        )
        tokenizer = load_tokenizer(folder)
        _, processing = vision_settings(network.mm)
        generation_path = folder / "generation_config.json"
        generation_config = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
        return cls(network, tokenizer, processing, str(model), generation_config, time.perf_counter() - started)

    # ---- media -> visual tokens ------------------------------------------------------------

    @torch.inference_mode()
    def encode_frames(
        self,
        frames,
        count: int,
        pad_to_square: bool = False,
        on_progress: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """An iterable of [b, h, w, 3] frame batches (`count` frames in all) -> [count, 144, d].

        Each batch is preprocessed and encoded before the next is decoded, so memory holds one
        batch of pixels at a time whatever the video's resolution and length.
        """
        tokens = self.model.tokens_per_image
        out = torch.empty((count, tokens, self.model.config.hidden_size), dtype=self.model.dtype, device=self.model.device)
        filled = 0
        for batch in frames:
            pixels = preprocess(list(batch), self.processing, pad_to_square=pad_to_square)  # [b, 3, 336, 336]
            out[filled : filled + len(pixels)] = self.model.encode_pixels(pixels)
            filled += len(pixels)
            if on_progress:
                on_progress(len(pixels))
        return out

    def encode_video(
        self,
        path: str | Path,
        frames: int | None = None,
        fps: float | None = None,
        on_progress: Callable[[int], None] | None = None,
        on_start: Callable[[int], None] | None = None,
    ) -> Visual:
        """Sample a video and encode each frame to 144 tokens.

        Frames are spread uniformly (`frames`, 32 when None), or taken `fps` times a second
        with `frames` as a cap.
        """
        video = media_io.open_video(media_io.check_file(Path(path)))
        if fps is not None:
            ids = media_io.frame_ids_at_fps(video.num_frames, video.fps, fps, max_frames=frames)
        else:
            ids = media_io.uniform_frame_ids(video.num_frames, frames or DEFAULT_FRAMES)
        if on_start:
            on_start(len(ids))
        embeds = self.encode_frames(video.batches(ids, VISION_BATCH), len(ids), on_progress=on_progress)
        return Visual(embeds.flatten(0, 1), "video", len(ids), frame_ids=ids)

    @torch.inference_mode()
    def encode_image(self, image: Image.Image | str | Path) -> Visual:
        """UniRes: best pinpoint, resize and pad, 336 crops row by row, 144 tokens per crop."""
        if not isinstance(image, Image.Image):
            path = media_io.check_file(Path(image))
            image = media_io.open_image(path)
            if image is None:
                raise LongVAError(f"{path} is not an image that can be read.")
        crops, grid = unires_crops(image, self.processing, self.model.mm.image_grid_pinpoints)
        pixels = preprocess(crops, self.processing)  # [crops, 3, 336, 336]
        embeds = torch.cat([self.model.encode_pixels(pixels[i : i + VISION_BATCH]) for i in range(0, len(pixels), VISION_BATCH)])
        return Visual(embeds.flatten(0, 1), "image", len(crops), grid=grid)

    def encode_media(self, path: str | Path, frames: int | None = None, fps: float | None = None, **callbacks) -> Visual:
        """An image or a video, told apart by the file's content."""
        path = media_io.check_file(Path(path))
        image = media_io.open_image(path)
        if image is not None:
            return self.encode_image(image)
        return self.encode_video(path, frames=frames, fps=fps, **callbacks)

    # ---- prompt -> embeddings -> text ------------------------------------------------------

    def prompt_sequence(self, prompt: str, visuals: list[Visual]) -> tuple[Sequence, int]:
        """The prompt as a `Sequence` whose `<image>` placeholders take `visuals` in order, and
        the number of text tokens in it.

        Text positions are keyed by token id, visual ones by -(1 + their index among this
        prompt's visual tokens): prompts about the same media share the keys of their prefix,
        which is what a `PrefixCache` reuses.
        """
        segments = tokenize_segments(self.tokenizer, prompt)
        if len(segments) != len(visuals) + 1:
            raise LongVAError(f"the prompt has {len(segments) - 1} <image> placeholders for {len(visuals)} media items.")
        with torch.inference_mode():
            pieces = [(segments[0].numpy(), self.model.embed_tokens(segments[0]))]
            visual_count = 0
            for visual, text in zip(visuals, segments[1:]):
                keys = -1 - np.arange(visual_count, visual_count + len(visual.embeds))
                pieces += [(keys, visual.embeds.to(self.model.device)), (text.numpy(), self.model.embed_tokens(text))]
                visual_count += len(visual.embeds)
        return pieces_sequence(pieces), sum(len(s) for s in segments)

    def prompt_embeds(self, prompt: str, visuals: list[Visual]) -> tuple[torch.Tensor, int]:
        """[seq, d] embeddings of a prompt whose `<image>` placeholders take `visuals` in order,
        and the number of text tokens in it."""
        sequence, text_tokens = self.prompt_sequence(prompt, visuals)
        with torch.inference_mode():
            return sequence.embed(0, len(sequence)), text_tokens

    def check_fits(self, tokens: int) -> str | None:
        """A warning when the KV cache for `tokens` positions will not fit the free memory."""
        need = kv_cache_bytes(self.model.config, tokens, self.model.dtype)
        free = available_memory(self.model.device)
        if need > 0.9 * free:
            return (
                f"{tokens:,} tokens need about {need / 2**30:.1f} GiB of KV cache but only {free / 2**30:.1f} GiB is free; "
                "expect an out-of-memory error (use fewer frames or a bigger device)."
            )
        return None

    def generate_text(
        self,
        prompt: torch.Tensor | Sequence,
        sampling: SamplingSettings,
        on_text: Callable[[str], None] | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        timings: dict | None = None,
        on_token: Callable[[int], None] | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> tuple[str, int]:
        """Answer text (special tokens removed, stripped, as the original decodes) and its token count.

        `prompt` is [seq, d] embeddings, or with `prefix_cache` a `Sequence` (`prompt_sequence`)
        whose prefix shared with the cache's previous prompt is not computed again.
        `on_token` sees every generated id, also those whose text is held back (an exception
        raised there stops generation: `serve` uses it to cancel)."""
        timings = {} if timings is None else timings
        started = time.perf_counter()

        def prefilled() -> None:
            timings["prefill_s"] = time.perf_counter() - started

        if prefix_cache is None:
            tokens = generate(self.model.language_model, prompt, sampling, self.stop_ids, prefill_chunk, on_prefilled=prefilled)
        else:
            tokens = generate_after(prefix_cache, prompt, sampling, self.stop_ids, on_prefilled=prefilled)
        ids = []
        for token_id, text in stream_text(self.tokenizer, tokens):
            ids.append(token_id)
            if on_token:
                on_token(token_id)
            if on_text and text:
                on_text(text)
        timings.setdefault("prefill_s", time.perf_counter() - started)
        timings["generate_s"] = time.perf_counter() - started - timings["prefill_s"]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip(), len(ids)

    def sampling_settings(self, **overrides) -> SamplingSettings:
        """The original's sampling defaults (temperature 0.5, the checkpoint's top-k, else 50) with overrides."""
        settings = SamplingSettings(
            top_k=self.generation_config.get("top_k", 50),
            repetition_penalty=self.generation_config.get("repetition_penalty"),
        )
        for key, value in overrides.items():
            if value is not None:
                setattr(settings, key, value)
        return settings

    def ask(
        self,
        media: str | Path | Image.Image | None,
        question: str,
        *,
        frames: int | None = None,
        fps: float | None = None,
        system: str | None = DEFAULT_SYSTEM,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = 0,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        on_text: Callable[[str], None] | None = None,
        on_warning: Callable[[str], None] | None = None,
        **encode_callbacks,
    ) -> Answer:
        """Answer `question` about a video or image (or none), streaming text to `on_text`."""
        timings = {"load_s": round(self.load_seconds, 3)}
        started = time.perf_counter()
        visuals = []
        if isinstance(media, Image.Image):
            visuals.append(self.encode_image(media))
        elif media is not None:
            visuals.append(self.encode_media(media, frames=frames, fps=fps, **encode_callbacks))
        timings["encode_s"] = time.perf_counter() - started
        prompt = question_prompt(question, system, with_media=bool(visuals))
        embeds, text_tokens = self.prompt_embeds(prompt, visuals)
        warning = self.check_fits(len(embeds))
        if warning and on_warning:
            on_warning(warning)
        sampling = self.sampling_settings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
        sampling.seed = seed
        answer, generated = self.generate_text(embeds, sampling, on_text, prefill_chunk, timings)
        timings["total_s"] = time.perf_counter() - started + self.load_seconds
        if generated and timings["generate_s"] > 0:
            timings["tokens_per_s"] = generated / timings["generate_s"]
        visual = visuals[0] if visuals else None
        return Answer(
            answer=answer,
            model=self.name,
            media=None if media is None or isinstance(media, Image.Image) else str(media),
            media_type=visual.kind if visual else None,
            frames=visual.images if visual else 0,
            visual_tokens=len(visual.embeds) if visual else 0,
            prompt_tokens=len(embeds),
            generated_tokens=generated,
            timings={k: round(v, 3) for k, v in timings.items()},
            frame_ids=visual.frame_ids if visual else [],
        )


def load_tokenizer(folder: Path):
    """The checkpoint's own tokenizer; a clear error when the files are missing (a known hub defect)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").is_file():
        raise LongVAError(
            f"{folder} has no tokenizer files (tokenizer.json or vocab.json + merges.txt); copy them from Qwen/Qwen2-7B-Instruct into the folder."
        )
    return AutoTokenizer.from_pretrained(folder)


__all__ = ["LongVA", "Answer", "Visual", "DEFAULT_MODEL"]
