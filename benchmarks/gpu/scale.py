"""Scale stage: a LongVA-7B-shaped model answers about a 3000-frame video on one GPU.

    python benchmarks/gpu/scale.py --results OUT/gpu-results.json --work DIR [--attn auto] [--frames 1000 3000] [--fp8-frames 500]   # GPU
    python benchmarks/gpu/scale.py --results OUT/gpu-results.json --work DIR --tiny     # CPU dry run

The model has LongVA-7B's exact shapes (Qwen2-7B: 28 layers, hidden 3584, 28 heads / 4 KV
heads, MLP 18944, vocab 152,064; CLIP ViT-L/14-336; 2-layer projector) and random bf16
weights, built directly on the GPU: no 15 GB download, and the work per token is the real
one. The tokenizer is the built-in tiny one (484 tokens): its ids are valid rows of the
152,064-row embedding, and the ids the random model generates past them decode to nothing, so
the answer text is empty while the token count and timings are real.

Figures go to `stages.scale` of the results file after each step (the card's peaks, video,
components, each ask, the attention kernels chosen, each V-NIAH cell, the fp8 KV comparison),
so a stage cut off at its time limit still reports what it measured.

`kv_fp8`: teacher-forced V-NIAH (three needles with answers of several tokens, depth 0.9) with
the KV cache in bf16 and in fp8 (`--kv-cache fp8`): argmax agreement at every answer position,
the largest logit difference, and the bytes of each cache. At 500 frames by default (two passes
of about 72K tokens fit the stage's budget); `--fp8-frames 3000` compares at 3000 frames.

Against the card, not a constant: at the start a bf16 8192^3 matmul and a 4 GiB device-to-device
copy are timed (`peaks`). Prefill reports its TFLOP/s as a share of that matmul peak; decode
reports its tokens/s as a share of the memory-bound limit: every token reads the language
model's weights and the whole KV cache once, so the copy bandwidth (bytes read + written per
second) divided by those bytes is the most tokens a second the card can decode.

Prefill FLOPs are counted, not profiled: per position 2 x (weights of the q/k/v/o projections
and the MLP) for the matmuls, plus causal attention 4 x heads x head_dim x (keys it sees) for
QK^T and AV, summed over the layers; the vocabulary projection counts only for the positions
whose logits are computed. Masked-out attention work is not counted (the kernels skip it).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch

import record

QUESTION = "What is moving in the video?"


# ---- model --------------------------------------------------------------------------------------


def configs(tiny: bool):
    """(language, vision, multimodal) configs: LongVA-7B's, or tiny ones for the CPU dry run."""
    from transformers import CLIPVisionConfig, Qwen2Config

    from longva_cli.model.config import CLIP_L_336_VISION, MultimodalConfig
    from longva_cli.model.tiny import tiny_configs

    if tiny:
        return tiny_configs(vision_tower="openai/clip-vit-large-patch14-336")
    language = Qwen2Config(
        vocab_size=152_064, hidden_size=3584, intermediate_size=18_944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=224_000, rope_theta=1e9,
        rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False, bos_token_id=None,
    )
    return language, CLIPVisionConfig(**CLIP_L_336_VISION), MultimodalConfig()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def build(tiny: bool, device: torch.device, dtype: torch.dtype, attn: str = "auto"):
    """A random LongVA built in place on `device` (nothing is allocated elsewhere first)."""
    import importlib.util

    from longva_cli.model.attention import use_mask_free_attention
    from longva_cli.model.checkpoint import build_longva
    from longva_cli.model.kernel_choice import KernelChoice
    from longva_cli.model.config import vision_settings
    from longva_cli import LongVA
    from longva_cli.model.tiny import build_tiny_tokenizer

    language, vision, mm = configs(tiny)
    flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        network = build_longva(language, vision, mm, attn_implementation="flash_attention_2" if flash else "sdpa").eval()
    use_mask_free_attention(network.language_model, KernelChoice.parse(attn))
    _, processing = vision_settings(mm)
    return LongVA(network, build_tiny_tokenizer(), processing, name="random LongVA-7B" if not tiny else "random tiny LongVA")


# ---- video --------------------------------------------------------------------------------------


def write_video(path: Path, frames: int, width: int = 224, height: int = 128, fps: int = 30) -> Path:
    """An H.264 video of a square moving over a colour ramp, written with PyAV."""
    import av

    ramp = np.stack(np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height)), -1).astype(np.uint8)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "g": "30"}
        for index in range(frames):
            frame = np.concatenate([ramp, np.full((height, width, 1), index % 256, np.uint8)], -1)
            left = (index * 3) % (width - 32)
            frame[height // 3 : height // 3 + 32, left : left + 32] = (255, 32, 32)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ---- measuring ----------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """Peak memory since the last reset: allocated and reserved on a GPU, the process's peak RSS on a CPU."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return {
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2),
            "device_total_gib": round(total / 2**30, 2),
            "peak_reserved_fraction": round(torch.cuda.max_memory_reserved(device) / total, 3),
        }
    return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def prefill_flops(config, tokens: int, past: int = 0, logit_rows: int = 1) -> float:
    """FLOPs of `tokens` new positions after `past` cached ones through a Qwen2 decoder (see module doc)."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_width, kv_width = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    matmul_weights = hidden * (2 * q_width + 2 * kv_width) + 3 * hidden * config.intermediate_size
    end = past + tokens
    keys_seen = (end * (end + 1) - past * (past + 1)) // 2  # sum over new positions i of (i + 1)
    attention = 4 * q_width * keys_seen
    return layers * (2 * matmul_weights * tokens + attention) + 2 * hidden * config.vocab_size * logit_rows


def device_peaks(device: torch.device, dtype: torch.dtype, tiny: bool) -> dict:
    """The card's measured limits: matmul TFLOP/s (8192^3, or 512^3 for the dry run) and
    device-to-device copy GB/s (bytes read plus written; 4 GiB, or 64 MiB), best of 5 after a warm-up."""
    size, copy_bytes = (512, 1 << 26) if tiny else (8192, 1 << 32)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    source = torch.empty(copy_bytes // 2, device=device, dtype=torch.float16)
    target = torch.empty_like(source)

    def best_seconds(call) -> float:
        call()
        times = []
        for _ in range(5):
            sync(device)
            started = time.perf_counter()
            call()
            sync(device)
            times.append(time.perf_counter() - started)
        return min(times)

    matmul_s = best_seconds(lambda: a @ b)
    copy_s = best_seconds(lambda: target.copy_(source))
    return {
        "matmul": f"{size}^3 {str(dtype).removeprefix('torch.')}",
        # significant figures, not decimals: a loaded CPU in the dry run measures well under 0.05
        "matmul_tflops": float(f"{2 * size**3 / matmul_s / 1e12:.4g}"),
        "copy_gib": copy_bytes / 2**30,
        "copy_gbps": float(f"{2 * copy_bytes / copy_s / 1e9:.4g}"),
    }


def throughput(flops: float, seconds: float, peaks: dict) -> dict:
    tflops = flops / seconds / 1e12
    return {
        "tflop": float(f"{flops / 1e12:.4g}"),
        "tflops_achieved": float(f"{tflops:.4g}"),
        "fraction_of_measured_matmul_peak": round(tflops / peaks["matmul_tflops"], 3),
    }


def decode_limit(language_model, context: int, peaks: dict) -> float:
    """Tokens/s if each token only read the weights and the KV cache of `context` positions at the measured copy bandwidth."""
    from longva_cli.engine.memory import kv_bytes_per_token

    weights = sum(p.numel() * p.element_size() for p in language_model.parameters())
    return peaks["copy_gbps"] * 1e9 / (weights + context * kv_bytes_per_token(language_model.config, language_model.dtype))


def components(longva, video: Path, frames: int, device: torch.device) -> dict:
    """Decode, preprocess and vision-encode `frames` frames, each phase timed on its own, in
    batches of 16 as `ask` takes them (this pass also warms the kernels up for `ask`)."""
    from longva_cli import media as media_io
    from longva_cli.model.processing import preprocess

    opened = media_io.open_video(video)
    ids = media_io.uniform_frame_ids(opened.num_frames, frames)
    seconds = {"decode_s": 0.0, "preprocess_s": 0.0, "vision_encode_s": 0.0}
    batches = opened.batches(ids, 16)
    with torch.inference_mode():
        while True:
            started = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            decoded = time.perf_counter()
            pixels = preprocess(list(batch), longva.processing)
            processed = time.perf_counter()
            longva.model.encode_pixels(pixels)
            sync(device)
            seconds["decode_s"] += decoded - started
            seconds["preprocess_s"] += processed - decoded
            seconds["vision_encode_s"] += time.perf_counter() - processed
    figures = {"frames": len(ids), **{k: round(v, 2) for k, v in seconds.items()}}
    figures["frames_per_s"] = {k.removesuffix("_s"): round(len(ids) / v, 1) for k, v in seconds.items() if v > 0}
    return figures


def ask(longva, video: Path, frames: int, device: torch.device, peaks: dict) -> dict:
    """One `LongVA.ask` at `frames` frames: phases, time to first token, decode speed, peak memory."""
    reset_peak(device)

    def answer(on_event):
        return longva.ask(str(video), QUESTION, frames=frames, temperature=0, max_new_tokens=32, on_event=on_event)

    return timed_answer(longva, answer, device, peaks, lambda context: decode_limit(longva.model.language_model, context, peaks))


def timed_answer(longva, answer, device: torch.device, peaks: dict, decode_limit_at) -> dict:
    """Run `answer(on_event)` (an ask that hands its engine events to `on_event` and returns the
    `Answer`): its phases, time to first token, decode speed against `decode_limit_at(context)`
    tokens/s, and the peak memory since the caller's `reset_peak`."""
    marks: dict = {"tokens": 0}
    notices: list[str] = []

    def on_event(event) -> None:  # token events come after the token's argmax, so the GPU is in sync
        kind = type(event).__name__
        if kind == "Token":
            now = time.perf_counter()
            marks.setdefault("first", now)
            marks["last"] = now
            marks["tokens"] += 1
        elif kind == "Notice":
            notices.append(event.message)

    chunks: list[int] = []  # prefill calls of the decoder, as the runner made them

    def on_decoder_call(module, args, kwargs) -> None:
        if kwargs.get("inputs_embeds") is not None:
            chunks.append(kwargs["inputs_embeds"].shape[1])

    hook = longva.model.language_model.model.register_forward_pre_hook(on_decoder_call, with_kwargs=True)
    started = time.perf_counter()
    try:
        answered = answer(on_event)
        sync(device)
    finally:
        hook.remove()
    total = time.perf_counter() - started
    figures = {
        "frames": answered.frames,
        "prompt_tokens": answered.prompt_tokens,
        "generated_tokens": answered.generated_tokens,
        "timings": answered.timings,
        "wall_s": round(total, 2),
        "prefill_chunks": {"calls": len(chunks), "largest": max(chunks, default=0), "last": chunks[-1] if chunks else 0},
        "notices": notices,
        **peak_memory(device),
    }
    if "first" in marks:
        first_token_s = marks["first"] - started
        # from the end of encoding to the first token (prompt assembly, prefill, first argmax), in
        # sync with the GPU: the engine's own prefill_s stops the clock before queued kernels finish
        prefill_s = first_token_s - answered.timings["encode_s"]
        figures.update(time_to_first_token_s=round(first_token_s, 2), prefill_to_first_token_s=round(prefill_s, 2))
        figures["prefill"] = throughput(prefill_flops(longva.model.config, answered.prompt_tokens), prefill_s, peaks)
        if marks["tokens"] > 1:
            rate = (marks["tokens"] - 1) / (marks["last"] - marks["first"])
            limit = decode_limit_at(answered.prompt_tokens)
            figures["decode_tokens_per_s"] = round(rate, 2)
            figures["decode_context_tokens"] = answered.prompt_tokens
            figures["decode_bandwidth_limit_tokens_per_s"] = round(limit, 2)
            figures["decode_fraction_of_bandwidth_limit"] = round(rate / limit, 3)
    return figures


def niah_cells(
    longva, frames: int, depths: list[float], device: torch.device, seconds_left, rate: float, on_cell, peaks: dict, haystack_on_host: bool = False
) -> None:
    """Teacher-forced V-NIAH cells at `frames` frames through one `PrefixCache`, in the grid's
    order: the second depth reuses the KV cache of the first up to the first needle. With
    `haystack_on_host` the haystack stays in (pinned) host memory and reaches the device a
    prefill chunk at a time, as `ask` holds visual tokens when the memory plan says so.

    The haystack and needle are random embeddings of the real shape ([frames, 144, d]): the
    vision tower's cost is measured by `ask`, and the prefill work does not depend on values.
    A cell that would not finish in `seconds_left()` at `rate` FLOP/s (the last one measured)
    is reported as skipped instead of being cut off half-way.
    """
    from PIL import Image

    from longva_cli.engine import PrefixCache
    from longva_cli.niah.scoring import teacher_forced
    from longva_cli.niah.video import Needle, VideoNeedlePrompts, video_units

    model = longva.model
    tokens = model.tokens_per_image
    shape = (frames, tokens, model.config.hidden_size)
    haystack = torch.randn(shape, device=device, dtype=model.dtype)  # drawn on the device, where it is fastest
    if haystack_on_host and device.type == "cuda":
        haystack = torch.empty(shape, dtype=model.dtype, pin_memory=True).copy_(haystack)
    needle = Needle(Image.new("RGB", (336, 336)), "\nWhat is written on the note?", "B")
    prompts = VideoNeedlePrompts(longva, haystack, [needle], torch.randn((1, *shape[1:]), device=device, dtype=model.dtype))
    cache = PrefixCache(model.language_model, 4096)
    answer_ids = prompts.answer_ids(0)
    for unit in sorted(video_units([frames], depths, 1), key=lambda u: u.order):
        name = f"depth_{round(unit.depth * 100)}pct"
        sequence = prompts.sequence(unit.size, unit.depth, unit.index, with_answer=True)
        reuse = min(cache.shared_with(sequence), len(sequence) - 1 - len(answer_ids))
        flops = prefill_flops(model.config, len(sequence) - 1 - reuse, past=reuse, logit_rows=len(answer_ids))
        if 1.1 * flops / rate > seconds_left():
            on_cell(name, {"skipped": f"needs about {flops / rate:.0f} s, {seconds_left():.0f} s of the stage's budget left"})
            continue
        reset_peak(device)
        before = cache.forwarded
        started = time.perf_counter()
        predicted = teacher_forced(cache, sequence, answer_ids)  # .tolist() inside waits for the GPU
        seconds = time.perf_counter() - started
        forwarded = cache.forwarded - before
        reused = len(sequence) - 1 - forwarded
        flops = prefill_flops(model.config, forwarded, past=reused, logit_rows=len(answer_ids))
        rate = flops / seconds
        on_cell(
            name,
            {
                "frames": unit.size, "depth": unit.depth, "sequence_tokens": len(sequence), "forwarded_tokens": forwarded,
                "reused_tokens": reused, "seconds": round(seconds, 2), "predicted_ids": predicted,
                **throughput(flops, seconds, peaks), **peak_memory(device),
            },
        )


# Needles with answers of several tokens, so the fp8 comparison has more than one position per needle.
FP8_NEEDLES = [
    ("\nWhat is written on the note?", "The note says B."),
    ("\nWhat colour is the balloon?", "The balloon is yellow."),
    ("\nHow many milligrams are in each tablet?", "Each tablet holds 200 mg."),
]


def kv_fp8_agreement(longva, frames: int, depth: float, device: torch.device, seconds_left, rate: float) -> dict:
    """Teacher-forced V-NIAH at `frames` frames with the KV cache in the model's dtype, then in fp8
    (`--kv-cache fp8`): whether the argmax agrees at every answer position, the logit difference
    there, and the bytes each cache held. Three needles at one depth through one `PrefixCache` per
    storage (the second and third reuse the first's prefix). Skipped, not cut off, when both passes
    would not finish in `seconds_left()` at `rate` FLOP/s."""
    from PIL import Image

    from longva_cli.engine import PrefixCache
    from longva_cli.engine.runner import common_prefix
    from longva_cli.model.kv_cache import kv_storage_of, use_kv_cache
    from longva_cli.niah.video import Needle, VideoNeedlePrompts

    model = longva.model
    shape = (frames, model.tokens_per_image, model.config.hidden_size)
    generator = torch.Generator(device=device).manual_seed(0)
    haystack = torch.randn(shape, device=device, dtype=model.dtype, generator=generator)
    needles = [Needle(Image.new("RGB", (336, 336)), question, answer) for question, answer in FP8_NEEDLES]
    needle_embeds = torch.randn((len(needles), *shape[1:]), device=device, dtype=model.dtype, generator=generator)
    prompts = VideoNeedlePrompts(longva, haystack, needles, needle_embeds)
    sequences = [prompts.sequence(frames, depth, index, with_answer=True) for index in range(len(needles))]
    answers = [prompts.answer_ids(index) for index in range(len(needles))]
    reuse = [0] + [common_prefix(sequences[0].keys, sequence.keys) for sequence in sequences[1:]]
    flops = 2 * sum(prefill_flops(model.config, len(sequence) - 1 - past, past=past, logit_rows=len(answer))
                    for sequence, answer, past in zip(sequences, answers, reuse))
    if 1.1 * flops / rate > seconds_left():
        return {"frames": frames, "skipped": f"needs about {flops / rate:.0f} s, {seconds_left():.0f} s of the stage's budget left"}

    @torch.inference_mode()
    def answer_logits(runner, sequence, count: int) -> torch.Tensor:  # [count, vocab] at the positions predicting the answer
        stop = len(sequence) - 1
        rows = [chunk.hidden[max(stop - count - chunk.start, 0):] for chunk in runner.chunks(sequence, stop, stop - count)]
        return model.language_model.lm_head(torch.cat(rows)[-count:]).float()

    started = time.perf_counter()
    logits, held = {}, {}
    for kind in ("auto", "fp8"):
        use_kv_cache(model.language_model, kind)
        runner = PrefixCache(model.language_model, 4096)
        name = str(kv_storage_of(model.language_model)).removeprefix("torch.")
        logits[name] = torch.cat([answer_logits(runner, sequence, len(answer)) for sequence, answer in zip(sequences, answers)])
        held[name] = runner.cache.held_bytes()
        del runner
        gc.collect()
    use_kv_cache(model.language_model, "auto")
    (reference_name, reference), (fp8_name, fp8) = logits.items()
    gap = (fp8 - reference).abs()
    agree = int((fp8.argmax(-1) == reference.argmax(-1)).sum())
    return {
        "frames": frames, "depth": depth, "needles": len(needles), "sequence_tokens": len(sequences[0]), "answer_positions": len(gap),
        "argmax_agreement": agree, "all_argmax_agree": agree == len(gap),
        "max_abs_logit_diff": round(float(gap.max()), 5), "mean_abs_logit_diff": round(float(gap.mean()), 6),
        "reference_logit_span": round(float((reference.max(-1).values - reference.min(-1).values).max()), 3),
        "kv_bytes": held, "kv_bytes_ratio": round(held[fp8_name] / held[reference_name], 4), "seconds": round(time.perf_counter() - started, 2),
    }


def kernels_used(attn: str) -> dict:
    """The attention kernels the asks ran: what --attn named, cuDNN's version, and each shape class's
    measured choice with its timings and the candidates set aside (for `auto` on CUDA)."""
    from longva_cli.model import kernel_choice

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"attn": attn, "cudnn": cudnn, "measured": kernel_choice.measured()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True, help="folder for the generated video")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (the suite's dry run)")
    parser.add_argument("--frames", type=int, nargs="+", help="frame counts to ask about, in this order (default 1000 3000; 8 16 with --tiny); "
                        "the last is reported as `ask` and gets the V-NIAH cells")
    parser.add_argument("--attn", default="auto", help="attention kernels, as `longva ask --attn` takes them (default: auto, measured)")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.9, 1.0])
    parser.add_argument("--fp8-frames", type=int, help="frames of the fp8 KV cache comparison (default 500: it fits the stage's budget; 8 with --tiny)")
    parser.add_argument("--component-frames", type=int, default=512, help="frames of the phase-by-phase encoding pass")
    parser.add_argument("--deadline", type=float, help="when the stage's time is up (Unix time, from run.sh): V-NIAH cells that cannot finish by then are skipped")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    counts = args.frames or ([8, 16] if args.tiny else [1000, 3000])
    frames = max(counts)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def report(section: str, figures: dict) -> None:
        record.update(args.results, f"stages.scale.{section}", figures)
        print(f"scale {section}: {figures}", flush=True)

    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    video = write_video(args.work / "long.mp4", frames)
    report("video", {"frames": frames, "size": "224x128", "fps": 30, "bytes": video.stat().st_size, "write_s": round(time.perf_counter() - started, 2)})

    peaks = device_peaks(device, dtype, args.tiny)
    report("peaks", peaks)
    started = time.perf_counter()
    longva = build(args.tiny, device, dtype, args.attn)
    sync(device)
    lm = longva.model.language_model
    from longva_cli.model.attention import prefill_chunk

    report("model", {
        "shape": "tiny" if args.tiny else "LongVA-7B (Qwen2-7B + CLIP ViT-L/14-336)",
        "parameters": sum(p.numel() for p in longva.model.parameters()),
        "dtype": str(dtype), "device": str(device), "attention": lm.config._attn_implementation,
        "prefill_chunk_at_this_length": prefill_chunk(lm, frames * longva.model.tokens_per_image, 4096),
        "vocab_model": lm.config.vocab_size, "vocab_tokenizer": len(longva.tokenizer),
        "build_s": round(time.perf_counter() - started, 2), **peak_memory(device),
    })
    report("components", components(longva, video, min(frames, args.component_frames), device))
    for count in counts:
        asked = ask(longva, video, count, device, peaks)
        report("ask" if count == counts[-1] else f"ask_{count}_frames", asked)
        gc.collect()  # the answer's KV cache goes before the next one is built
    report("kernels", kernels_used(args.attn))

    def seconds_left() -> float:  # with a margin for writing the results
        return float("inf") if args.deadline is None else args.deadline - time.time() - 10

    rate = asked["prefill"]["tflops_achieved"] * 1e12 if "prefill" in asked else float("inf")
    niah_cells(longva, counts[-1], args.depths, device, seconds_left, rate, lambda name, figures: report(f"niah.{name}", figures), peaks)
    report("kv_fp8", kv_fp8_agreement(longva, args.fp8_frames or (8 if args.tiny else 500), args.depths[0], device, seconds_left, rate))


if __name__ == "__main__":
    main()
