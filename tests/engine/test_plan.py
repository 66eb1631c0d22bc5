"""The memory plan (engine/plan.py): its numbers against measured peaks, its choices, and the CLI.

How peaks are measured on CPU: `LiveTensorBytes` is a `TorchDispatchMode` that sees every tensor
an aten op returns and keeps a weak reference to it, keyed by its storage; after each op it sums
the bytes of the storages that still have a live tensor. That is the memory PyTorch holds for
tensors at that moment (views share their storage and count once), sampled at every point where
a new tensor appears, so its maximum is the peak of live tensor storage. It does not depend on an
allocator (the CPU has no caching allocator with statistics, and tracemalloc does not see torch's
allocations); buffers a kernel uses internally and frees before it returns are not seen.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from longva_cli.engine.plan import (
    GIB,
    ModelShape,
    Settings,
    Workload,
    estimate,
    largest_frames,
    ladder,
    parse_size,
    plan_run,
)
from longva_cli.errors import LongVAError
from support import REPO

MIB = 2**20


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of live tensor storage while active (see the module docstring)."""

    def __init__(self, tensors) -> None:
        super().__init__()
        self.live: dict[int, tuple[int, list]] = {}  # storage address -> (bytes, weak refs to its tensors)
        for tensor in tensors:
            self._hold(tensor)
        self.peak = self.current()

    def _hold(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        if not address:
            return
        entry = self.live.get(address)
        if entry is None or all(ref() is None for ref in entry[1]):  # new, or the address was reused
            self.live[address] = (storage.nbytes(), [weakref.ref(tensor)])
        else:
            entry[1].append(weakref.ref(tensor))

    def current(self) -> int:
        for address in [a for a, (_, refs) in self.live.items() if all(ref() is None for ref in refs)]:
            del self.live[address]
        return sum(size for size, _ in self.live.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor):
                self._hold(value)
        self.peak = max(self.peak, self.current())
        return out


@pytest.fixture(scope="module")
def wide_longva(wide_checkpoint):
    from longva_cli import LongVA

    return LongVA.from_pretrained(wide_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def wide_shape(wide_checkpoint) -> ModelShape:
    return ModelShape.from_folder(wide_checkpoint)


def full_precision() -> Settings:
    return Settings("fp32", "fp32")


def test_plan_matches_the_measured_peak_of_a_whole_ask_run(wide_longva, wide_shape, video_file):
    """Encoding 32 frames (two batches) dominates this run's peak: weights, tower, pixels, projector."""
    from longva_cli.engine import MediaSpec, Session, drive

    frames, chunk, new_tokens = 32, 512, 4
    session = Session(wide_longva, [MediaSpec(video_file, frames)], prefill_chunk=chunk, cache=None)
    sampling = wide_longva.sampling_settings(max_new_tokens=new_tokens, temperature=0)
    tracker = LiveTensorBytes(list(wide_longva.model.parameters()) + list(wide_longva.model.buffers()))
    with tracker:
        answer = drive(session.ask("What happens?", sampling))
    work = Workload(frames, answer.prompt_tokens - answer.visual_tokens, new_tokens, chunk, element=4, device_type="cpu")
    planned = estimate(wide_shape, full_precision(), work)
    assert planned.encoding_peak > planned.prefill_peak
    assert planned.peak == pytest.approx(tracker.peak, rel=0.10), (planned.peak / MIB, tracker.peak / MIB)


def test_plan_matches_the_measured_peak_of_a_long_prefill(wide_longva, wide_shape):
    """The prefill phase alone (visual tokens given, nothing encoded): 120 frames prefilled in
    1024-token chunks, where KV cache, visual tokens and attention's copy of one layer's cached keys dominate, as
    they do at 3000 frames on a GPU."""
    from longva_cli.engine import Generate, PrefixCache, Visual, build, drive, prompt_parts, run
    from longva_cli.model.prompt import DEFAULT_SYSTEM, Turn, chat_prompt

    frames, chunk, new_tokens = 120, 1024, 4
    torch.manual_seed(0)
    visual = Visual(torch.randn(frames * wide_shape.tokens_per_image, wide_shape.language.hidden_size) * 0.1, "video", frames)
    prompt = chat_prompt([Turn("user", "<image>\nWhat happens?")], DEFAULT_SYSTEM)
    sampling = wide_longva.sampling_settings(max_new_tokens=new_tokens, temperature=0)
    tracker = LiveTensorBytes(list(wide_longva.model.parameters()) + [visual.embeds])
    with tracker:
        sequence = build(wide_longva, prompt_parts(prompt, [visual]))
        drive(run(wide_longva, PrefixCache(wide_longva.model.language_model, chunk), sequence, Generate(sampling)))
    work = Workload(frames, len(sequence) - len(visual), new_tokens, chunk, element=4, device_type="cpu")
    planned = estimate(wide_shape, full_precision(), work)
    # the tower is not part of this measurement: the prefill phase without it
    expected = planned.prefill_peak - planned.parts["vision tower and projector"]
    assert expected == pytest.approx(tracker.peak, rel=0.10), (expected / MIB, tracker.peak / MIB)


@pytest.mark.parametrize(
    "text, size",
    [("24GiB", 24 * 2**30), ("24GB", 24 * 10**9), ("24000MiB", 24000 * 2**20), ("1.5 TB", 15 * 10**11), ("512kib", 512 * 1024)],
)
def test_memory_sizes_are_read_in_decimal_and_binary_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["24", "GiB", "-3GiB", "0GB", "24 gigs", ""])
def test_a_memory_size_without_a_number_and_unit_is_one_sentence(text):
    with pytest.raises(LongVAError, match=r"--memory-budget .* is not a memory size; write a positive number and a unit"):
        parse_size(text)


def test_the_ladder_offers_fp8_only_when_the_engine_can_run_it_and_the_user_left_it_open():
    assert [s.kv_cache for s in ladder("bf16", "cuda", low_precision_kv=())] == ["bf16", "bf16", "bf16"]
    assert ladder("bf16", "cuda") == ladder("bf16", "cuda", low_precision_kv=("fp8",))  # the engine runs fp8
    assert {s.kv_cache for s in ladder("bf16", "cuda", kv_cache="bf16")} == {"bf16"}  # --kv-cache bf16
    assert {s.kv_cache for s in ladder("bf16", "cuda", kv_cache="fp8")} == {"fp8"}  # --kv-cache fp8
    with_fp8 = ladder("bf16", "cuda", low_precision_kv=("fp8",))
    assert [(s.weights, s.kv_cache, s.visual_tokens, s.vision_tower) for s in with_fp8] == [
        ("bf16", "bf16", "device", "resident"),
        ("bf16", "fp8", "device", "resident"),
        ("bf16", "fp8", "host", "released"),
        ("4bit", "fp8", "host", "released"),
    ]


def test_the_ladder_keeps_asked_weights_and_offers_on_cpu_only_what_runs_there():
    assert {s.weights for s in ladder("bf16", "cuda", quantize="8bit")} == {"8bit"}
    # no host tokens (already host), no int4 kernels; fp8 KV runs on a CPU
    assert ladder("fp32", "cpu") == [Settings("fp32", "fp32"), Settings("fp32", "fp8")]


def test_each_step_of_the_ladder_needs_less_memory(wide_shape):
    work = Workload(3000)
    peaks = [estimate(wide_shape, s, work).peak for s in ladder("bf16", "cuda", low_precision_kv=("fp8",))]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == len(peaks)


def test_the_largest_frame_count_is_the_last_that_fits(wide_shape):
    settings, work = Settings("bf16", "bf16"), Workload(1)
    budget = 3 * GIB // 10
    most = largest_frames(wide_shape, settings, work, budget)
    assert estimate(wide_shape, settings, replace(work, frames=most)).peak <= budget
    assert estimate(wide_shape, settings, replace(work, frames=most + 1)).peak > budget


def test_the_plan_chooses_the_first_setting_that_fits_and_refuses_naming_the_most_frames(wide_shape):
    work = Workload(2000)
    steps = ladder("bf16", "cuda", low_precision_kv=("fp8",))
    peaks = [estimate(wide_shape, s, work).peak for s in steps]
    plan = plan_run(wide_shape, work, (peaks[1] + peaks[2]) // 2, "cuda", "bf16", low_precision_kv=("fp8",))
    assert plan.chosen.settings == steps[2]
    refused = plan_run(wide_shape, work, peaks[-1] - 1, "cuda", "bf16", low_precision_kv=("fp8",))
    assert refused.chosen is None
    most = refused.largest[steps[-1]]
    assert 0 < most < 2000
    assert f"at most {most:,} fit: --frames {most})" in refused.refusal()


def test_the_readme_table_of_frames_that_fit_is_what_the_planner_computes():
    from longva_cli.engine.plan import frames_table

    root = REPO
    table = frames_table(ModelShape.from_folder(root / "assets" / "longva-7b-shapes"), [22.5, 46.5, 78.5])
    assert table in (root / "README.md").read_text()


# ---- the command line ------------------------------------------------------------------------


@pytest.fixture
def config_only(wide_checkpoint, tmp_path) -> Path:
    """The checkpoint's config files and nothing else: no weights, no tokenizer."""
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(wide_checkpoint / "config.json", folder / "config.json")
    shutil.copytree(wide_checkpoint / "vision_tower", folder / "vision_tower")
    config = (folder / "config.json").read_text().replace(str(wide_checkpoint / "vision_tower"), str(folder / "vision_tower"))
    (folder / "config.json").write_text(config)
    return folder


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from longva_cli.cli import main

    monkeypatch.setattr("sys.argv", ["longva", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, err


def test_plan_prints_the_table_from_config_files_alone_for_a_gpu_this_machine_lacks(monkeypatch, capsys, config_only, video_file):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = run_cli(
        monkeypatch, capsys, "ask", str(video_file), "What happens?", "--model", str(config_only), "--frames", "3000",
        "--device", "cuda", "--memory-budget", "300MiB", "--plan",
    )
    assert code == 0, err
    for part in ("language-model weights", "KV cache", "visual embeddings", "peak on the device", "max frames"):
        assert part in out
    assert "host" in out and "released" in out and "4bit" in out  # the GPU's ladder, planned on a CPU
    assert "ask for fewer frames (at most" in " ".join(out.split())  # 300 MiB cannot hold 3000 frames, even with an fp8 cache
    assert "Loaded" not in err


def test_plan_for_a_missing_gpu_without_a_budget_is_one_sentence(monkeypatch, capsys, config_only, video_file):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = run_cli(
        monkeypatch, capsys, "ask", str(video_file), "q", "--model", str(config_only), "--device", "cuda", "--plan"
    )
    assert code != 0 and "Traceback" not in err
    assert "give --memory-budget" in err


def test_a_bad_memory_budget_is_one_sentence(monkeypatch, capsys, config_only, video_file):
    code, _, err = run_cli(monkeypatch, capsys, "ask", str(video_file), "q", "--model", str(config_only), "--memory-budget", "lots")
    assert code != 0 and "Traceback" not in err
    assert "--memory-budget 'lots' is not a memory size" in err


def test_a_run_says_its_plan_and_one_that_cannot_fit_is_refused_naming_the_frames_that_would(
    monkeypatch, capsys, wide_checkpoint, video_file
):
    base = ["ask", str(video_file), "What happens?", "--model", str(wide_checkpoint), "--device", "cpu", "--no-cache",
            "--temperature", "0", "--max-new-tokens", "2", "--frames", "8"]
    code, _, err = run_cli(monkeypatch, capsys, *base, "--memory-budget", "2GiB")
    assert code == 0, err
    assert "Memory plan for 8 frames on cpu: fp32 weights, fp32 KV cache, visual tokens on the device: about" in " ".join(err.split())
    code, out, err = run_cli(monkeypatch, capsys, *base, "--memory-budget", "62MiB")
    assert code != 0 and "Traceback" not in err and out == "" and "Loaded" not in err
    sentence = " ".join(err.split())
    assert "8 frames need about" in sentence and "more than the 62 MiB budget" in sentence
    most = int(re.search(r"ask for fewer frames \(at most (\d+) fit: --frames \1\) or raise --memory-budget\.", sentence).group(1))
    assert 0 < most < 8


# ---- visual tokens in host memory ---------------------------------------------------------------


def test_host_held_visual_tokens_give_the_same_greedy_answer(tiny_longva, video_file, tmp_path):
    """On a CPU host memory is the device, so this pins the path (host allocation, per-chunk
    copies, tower release, embeddings read back from the disk cache) rather than the transfer."""
    from longva_cli.engine import MediaSpec, Session, drive
    from longva_cli.engine.visual_cache import disk_cache

    sampling = tiny_longva.sampling_settings(max_new_tokens=12, temperature=0)
    answers = []
    for on_host, cache in ((False, None), (True, None), (True, disk_cache(tmp_path, True)), (True, disk_cache(tmp_path, True))):
        session = Session(tiny_longva, [MediaSpec(video_file, 12)], cache=cache, prefill_chunk=256, visual_tokens_on_host=on_host)
        answers.append(drive(session.ask("What happens?", sampling)))
        assert session.visuals[0].embeds.device.type == "cpu"
    assert len({(a.answer, a.generated_tokens) for a in answers}) == 1


# ---- 4-bit and 8-bit weights through torchao ------------------------------------------------------

torchao_installed = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed (the quantize extra)")


@torchao_installed
def test_torchao_int8_weights_load_on_cpu_and_answer(tiny_checkpoint, video_file, monkeypatch):
    """torchao's int8 weight-only layers run on CPU: the decoder's linear layers are converted,
    the output layer is kept, and a greedy answer comes out."""
    from torchao.quantization import Int8Tensor

    # DeepSpeed's ZeRO-3 tests, earlier in the same process, can leave torch.nn.functional.linear
    # replaced by their autograd wrapper, which torchao's tensors do not implement: use torch's own.
    monkeypatch.setattr(torch.nn.functional, "linear", torch._C._nn.linear)

    from longva_cli import LongVA
    from longva_cli.engine import MediaSpec, Session, drive

    model = LongVA.from_pretrained(tiny_checkpoint, device="cpu", dtype="bfloat16", quantize="8bit")
    language_model = model.model.language_model
    assert isinstance(language_model.model.layers[0].mlp.up_proj.weight, Int8Tensor)
    assert not isinstance(language_model.lm_head.weight, Int8Tensor)
    session = Session(model, [MediaSpec(video_file, 4)], cache=None)
    answer = drive(session.ask("What happens?", model.sampling_settings(max_new_tokens=4, temperature=0)))
    assert answer.generated_tokens >= 1


@pytest.mark.parametrize(
    "quantize, backend, fragment",
    [
        ("4bit", "torchao", "torchao's 4-bit weights run on CUDA only"),
        ("8bit", "bitsandbytes", "bitsandbytes needs a CUDA GPU; on CPU use --quantize 8bit with --quantize-backend torchao"),
        ("8bit", "gptq", "--quantize-backend 'gptq' is not known; use torchao or bitsandbytes."),
        ("3bit", "torchao", "--quantize '3bit' is not known"),
    ],
)
def test_quantisation_that_cannot_run_here_is_one_sentence(quantize, backend, fragment):
    from longva_cli.engine.loader import quantization_config

    with pytest.raises(LongVAError, match=re.escape(fragment)):
        quantization_config(quantize, torch.bfloat16, torch.device("cpu"), backend)


def test_an_image_is_planned_as_its_unires_crops(monkeypatch, capsys, config_only, image_file):
    from PIL import Image

    from longva_cli.model.processing import select_best_resolution

    width, height = select_best_resolution(Image.open(image_file).size, ModelShape.from_folder(config_only).mm.image_grid_pinpoints)
    crops = (width // 336) * (height // 336)
    code, out, err = run_cli(
        monkeypatch, capsys, "ask", str(image_file), "Describe it.", "--model", str(config_only), "--device", "cpu",
        "--memory-budget", "1GiB", "--plan",
    )
    assert code == 0, err
    assert f"Memory plan: {crops} frames on cpu" in out and crops > 1
