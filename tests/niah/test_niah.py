"""`longva niah`: grids, file formats, exact KV reuse, resume, placement, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from support import REPO
from support.cli import fail_after
from support.media import write_image, write_video

from longva_cli.errors import LongVAError
from longva_cli.engine import PrefixCache, drive
from longva_cli.engine.encoder import encode_batches
from longva_cli.engine.runs import append_line, read_lines
from longva_cli.engine.visual_cache import CacheEntry, VisualCache
from longva_cli.niah import results as niah_results
from longva_cli.niah import scoring
from longva_cli.niah.settings import TextSettings, VideoSettings, check_video, depth_grid, size_grid
from longva_cli.niah.video import (
    VideoNeedlePrompts,
    embed_haystack,
    haystack_entry,
    haystack_frame_ids,
    load_haystack,
    load_needles,
    run_video,
    video_units,
)
from longva_cli.parallel.ranks import free_port

NEEDLES = [("\nWhat colour is the square? A. red B. blue", "B"), ("\nHow many mg does each tablet contain?", "200")]


@pytest.fixture(scope="module")
def haystack(tmp_path_factory) -> Path:
    """60 frames at 10 fps: 6 frames at 1 frame a second, 160x96 (not square, so padding shows)."""
    return write_video(tmp_path_factory.mktemp("niah") / "haystack.mp4", frames=60, fps=10)


@pytest.fixture(scope="module")
def needle_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("needles")
    lines = []
    for i, (question, answer) in enumerate(NEEDLES):
        write_image(folder / f"needle{i}.png", 120 + 80 * i, 90)
        lines.append(json.dumps({"image": f"needle{i}.png", "question": question, "answer": answer}))
    (folder / "needles.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def video_settings(tmp_path_factory, tiny_checkpoint, haystack, needle_dir) -> VideoSettings:
    root = tmp_path_factory.mktemp("runs")
    return VideoSettings(
        haystack=haystack, model=str(tiny_checkpoint), needles=str(needle_dir), output=root / "video",
        min_frames=2, max_frames=6, frame_step=2, depth_step=0.2, cache_dir=root / "cache", device="cpu",
    )


@pytest.fixture(scope="module")
def video_run(video_settings):
    return run_video(video_settings)


def encode_frames(longva, batches, count, pad_to_square=False):
    return drive(encode_batches(longva, batches, count, pad_to_square))


def cell_lines(folder: Path) -> list[dict]:
    return read_lines(folder / "results.jsonl")


# ---- grids and formats --------------------------------------------------------------------


def test_grids_follow_the_original_ranges():
    assert size_grid(200, 3000, 200, "frame") == list(range(200, 3001, 200))
    assert depth_grid(0.2) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert len(depth_grid(0.1)) == 11
    for bad in (lambda: size_grid(2, 6, 0, "frame"), lambda: size_grid(8, 6, 2, "frame"), lambda: depth_grid(0.3), lambda: depth_grid(0)):
        with pytest.raises(LongVAError):
            bad()


def test_video_run_writes_the_original_file_formats(video_run, video_settings):
    folder = video_settings.output
    rows = json.loads((folder / "all_accuracies.json").read_text())
    assert all(list(row) == ["Num. Frame", "Frame Depth", "Score"] for row in rows)
    assert sorted({row["Num. Frame"] for row in rows}) == [2, 4, 6]
    assert sorted({row["Frame Depth"] for row in rows}) == [0, 20, 40, 60, 80, 100]
    assert len(rows) == 18
    average = sum(row["Score"] for row in rows) / len(rows)
    assert (folder / "avg_accuracy.txt").read_text() == f"Average Accuracy: {average}\n"
    assert video_run.average == average
    cells = cell_lines(folder)
    assert len(cells) == 18 and all(len(cell["items"]) == len(NEEDLES) for cell in cells)
    item = cells[0]["items"][0]
    assert {"found", "answer", "predicted", "answer_ids", "predicted_ids"} <= set(item)
    assert cells[0]["score"] == sum(i["found"] for i in cells[0]["items"]) / len(NEEDLES)


def test_heatmap_is_a_17_5_by_8_inch_png(video_run, video_settings, tmp_path, longva_main):
    from PIL import Image

    path = video_settings.output / "heatmap.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(path).size == (1750, 800)  # 17.5 x 8 inches at matplotlib's 100 dpi
    redrawn = tmp_path / "again.png"
    done = longva_main("niah", "plot", str(video_settings.output), "--output", str(redrawn))
    assert done.returncode == 0, done.stderr
    assert Image.open(redrawn).size == (1750, 800)


# ---- exactness of the KV-reusing path ------------------------------------------------------


def run_prompts(longva, settings, needle_dir) -> VideoNeedlePrompts:
    """The prompts a video run over `settings` builds, made again from its haystack cache."""
    needles = load_needles(str(needle_dir))
    entry = haystack_entry(VisualCache(settings.cache_dir), longva, settings.haystack)
    haystack = load_haystack(entry, settings.max_frames, longva.model.device)
    needle_embeds = encode_frames(longva, [[n.image for n in needles]], len(needles), pad_to_square=True)
    return VideoNeedlePrompts(longva, haystack, needles, needle_embeds)


def test_kv_reuse_scores_equal_a_naive_full_forward_on_every_cell(video_run, video_settings, tiny_longva, needle_dir):
    """The run's per-needle predictions equal one plain forward over each whole sequence."""
    prompts = run_prompts(tiny_longva, video_settings, needle_dir)
    language_model = tiny_longva.model.language_model
    naive_tokens = 0
    for cell in cell_lines(video_settings.output):
        # each needle gets a prediction of its own, so scores reused from the cell's other needle would show
        assert len({tuple(item["predicted_ids"]) for item in cell["items"]}) == len(cell["items"]) > 1
        for item in cell["items"]:
            sequence = prompts.sequence(cell["num_frames"], cell["depth"], item["index"], with_answer=True)
            naive = scoring.naive_teacher_forced(language_model, sequence.embed(0, len(sequence)), len(item["answer_ids"]))
            assert item["predicted_ids"] == naive, (cell["num_frames"], cell["depth"], item["index"])
            assert item["found"] == (naive == prompts.answer_ids(item["index"]))
            naive_tokens += len(sequence)
    assert video_run.tokens_forwarded < 0.7 * naive_tokens  # the shared prefixes were reused


def test_chunked_cache_reuse_equals_naive_for_teacher_forcing_and_greedy(tiny_longva, needle_dir):
    """Small prefill chunks, sequences in grid order, teacher-forced and generated ids both exact."""
    torch.manual_seed(0)
    haystack = torch.randn(6, 144, tiny_longva.model.config.hidden_size)
    needles = load_needles(str(needle_dir))
    prompts = VideoNeedlePrompts(tiny_longva, haystack, needles, torch.randn(len(needles), 144, haystack.shape[-1]))
    language_model = tiny_longva.model.language_model
    cache = PrefixCache(language_model, chunk=256)  # sequences of 450-900 tokens: 2 to 4 chunks
    units = sorted(video_units([3, 5], [0.0, 1.0], len(needles)), key=lambda u: u.order)
    for unit in units:
        sequence = prompts.sequence(unit.size, unit.depth, unit.index, with_answer=True)
        answer = prompts.answer_ids(unit.index)
        naive = scoring.naive_teacher_forced(language_model, sequence.embed(0, len(sequence)), len(answer))
        assert scoring.teacher_forced(cache, sequence, answer) == naive
    answers = set()
    for unit in units[:3]:
        prompt = prompts.sequence(unit.size, unit.depth, unit.index, with_answer=False)
        expected = scoring.greedy(tiny_longva, PrefixCache(language_model), prompt, 6)  # from an empty cache
        assert scoring.greedy(tiny_longva, cache, prompt, 6) == expected
        answers.add(tuple(expected))
    assert len(answers) == 3  # three prompts, three answers: a cache answering another prompt would show


def test_generate_scoring_run_keeps_the_generated_text(video_run, video_settings, tiny_longva, needle_dir, tmp_path):
    """Each item holds what transformers' own greedy `generate` gives on the whole prompt."""
    settings = replace(video_settings, output=tmp_path / "generate", min_frames=2, max_frames=2, depth_step=1.0, scoring="generate", max_new_tokens=4)
    run = run_video(settings)
    cells = cell_lines(settings.output)
    assert run.scored_now == 4 and sum(len(cell["items"]) for cell in cells) == 4
    prompts = run_prompts(tiny_longva, settings, needle_dir)
    stop_ids = sorted(tiny_longva.stop_ids)
    for cell in cells:
        for item in cell["items"]:
            prompt = prompts.sequence(cell["num_frames"], cell["depth"], item["index"], with_answer=False)
            with torch.inference_mode():
                generated = tiny_longva.model.language_model.generate(
                    inputs_embeds=prompt.embed(0, len(prompt))[None], do_sample=False, max_new_tokens=4,
                    eos_token_id=stop_ids, pad_token_id=0, repetition_penalty=1.0, top_k=None, top_p=None, temperature=None,
                )[0].tolist()
            expected = generated[:-1] if generated[-1] in stop_ids else generated
            assert item["predicted_ids"] == expected
            assert item["predicted"] == tiny_longva.tokenizer.decode(expected, skip_special_tokens=True).strip()
            assert item["found"] == scoring.answer_matches(item["predicted"], item["answer"])


def test_an_fp8_kv_cache_scores_almost_every_cell_as_the_float32_run_and_is_part_of_the_identity(video_run, video_settings, tmp_path):
    """Teacher-forced V-NIAH with `--kv-cache fp8` (the same grid, prefix reuse and crops): the
    float32 run's predicted ids on (nearly) every needle of every cell. The tiny checkpoint's
    sharp random attention turns small key errors into a few flipped argmaxes; the bound says how
    many may flip (what real weights do is measured on the GPU: benchmarks/gpu/scale.py)."""
    def predictions(folder: Path) -> dict:
        return {(cell["num_frames"], cell["depth"], item["index"]): item["predicted_ids"] for cell in cell_lines(folder) for item in cell["items"]}

    fp8 = replace(video_settings, output=tmp_path / "fp8", kv_cache="fp8")
    run_video(fp8)
    ours, reference = predictions(fp8.output), predictions(video_settings.output)
    assert ours.keys() == reference.keys() and len(ours) > 30
    pairs = [(a, b) for key in ours for a, b in zip(ours[key], reference[key], strict=True)]
    agreement = sum(a == b for a, b in pairs) / len(pairs)
    print(f"fp8 vs float32 teacher-forced argmax agreement: {agreement:.3f} over {len(pairs)} ids")
    assert agreement >= 0.6  # measured 0.72 on the tiny checkpoint (2026-12-07)
    with pytest.raises(LongVAError, match="other settings"):  # fp8 moves scores a little: a run does not mix the two
        run_video(replace(fp8, kv_cache="auto"))
    with pytest.raises(LongVAError, match="--kv-cache is for runs that keep a KV cache"):
        check_video(replace(fp8, sequence_parallel=2))
    with pytest.raises(LongVAError, match="--kv-cache 'fp4' is not known"):  # before the run folder is written
        check_video(replace(fp8, kv_cache="fp4"))


def test_generate_scoring_compares_normalised_text():
    assert scoring.answer_matches("B. UC San Diego", "B")
    assert scoring.answer_matches("(b)", "B")
    assert not scoring.answer_matches("a panda is there", "C")
    assert scoring.answer_matches("The balloon is YELLOW!", "Yellow")
    assert scoring.answer_matches("Each tablet: 200 mg.", "200")
    assert not scoring.answer_matches("2000 mg", "200")


# ---- haystack and needles -----------------------------------------------------------------


@pytest.mark.parametrize("frames, depth, index", [(5, 0.5, 2), (6, 0.2, 1), (4, 0.6, 2), (6, 1.0, 6), (2, 0.0, 0)])
def test_needle_goes_in_at_int_depth_times_frames(tiny_longva, needle_dir, frames, depth, index):
    needles = load_needles(str(needle_dir))
    haystack = torch.randn(6, 144, tiny_longva.model.config.hidden_size)
    needle_embeds = torch.randn(len(needles), 144, haystack.shape[-1])
    prompts = VideoNeedlePrompts(tiny_longva, haystack, needles, needle_embeds)
    sequence = prompts.sequence(frames, depth, 1, with_answer=True)
    start = len(prompts.prefix) + index * 144
    assert np.array_equal(sequence.keys[start : start + 144], prompts.needles[1].keys())
    assert np.array_equal(sequence.keys[len(prompts.prefix) : start], prompts.haystack.keys()[: index * 144])
    assert torch.equal(sequence.embed(start, start + 144), needle_embeds[1])
    assert len(sequence) == len(prompts.prefix) + (frames + 1) * 144 + len(prompts.questions[1]) + len(prompts.answers[1])


def test_haystack_frames_are_1fps_padded_to_square_and_cached(tiny_longva, haystack, tmp_path):
    from longva_cli import media

    counts = []
    entry = CacheEntry(tmp_path, {"haystack": "test"})
    embed_haystack(tiny_longva, haystack, 4, entry, on_start=counts.append)
    embed_haystack(tiny_longva, haystack, 6, entry, on_start=counts.append)  # a larger grid adds 2 frames
    embed_haystack(tiny_longva, haystack, 6, entry, on_start=counts.append)  # all cached
    assert counts == [4, 2, 0]
    assert [(a, b) for a, b, _ in entry.blocks()] == [(0, 4), (4, 6)]
    cached = load_haystack(entry, 6, tiny_longva.model.device)
    video = media.open_video(haystack)
    ids = media.frame_ids_at_fps(video.num_frames, video.fps, 1.0)
    assert ids == [0, 10, 20, 30, 40, 50]
    padded = encode_frames(tiny_longva, video.batches(ids, 16), 6, pad_to_square=True)
    assert torch.equal(cached, padded)
    assert not torch.allclose(cached, encode_frames(tiny_longva, video.batches(ids, 16), 6))


def test_a_damaged_haystack_block_is_embedded_again_not_used(tiny_longva, haystack, tmp_path, capsys):
    from longva_cli.niah.video import prepare_haystack

    entry = CacheEntry(tmp_path, {"haystack": "test"})
    prepare_haystack(tiny_longva, haystack, 6, entry)
    intact = load_haystack(entry, 6, tiny_longva.model.device)
    block = entry.blocks()[0][2]
    data = bytearray(block.read_bytes())
    data[-8:] = bytes(255 - b for b in data[-8:])  # a bad disk flips the last frame's bytes
    block.write_bytes(bytes(data))
    with pytest.raises(LongVAError, match=r"does not match its checksum; it was deleted and will be computed again: run the same command again"):
        load_haystack(entry, 6, tiny_longva.model.device)
    block.write_bytes(bytes(data))
    capsys.readouterr()
    prepare_haystack(tiny_longva, haystack, 6, entry)  # what a rerun does before loading
    assert "does not match its checksum" in capsys.readouterr().err
    assert torch.equal(load_haystack(entry, 6, tiny_longva.model.device), intact)


def test_a_damaged_block_that_cannot_be_deleted_is_one_sentence_not_a_loop(tiny_longva, haystack, tmp_path, monkeypatch, capsys):
    """A read-only cache: the damaged block stays, so embedding again cannot mend it."""
    from longva_cli.niah.video import prepare_haystack

    entry = CacheEntry(tmp_path, {"haystack": "test"})
    prepare_haystack(tiny_longva, haystack, 6, entry)
    block = entry.blocks()[0][2]
    block.write_bytes(block.read_bytes()[:-8] + b"\xff" * 8)
    real_unlink = Path.unlink

    def read_only(self, **kwargs):
        if self == block:
            raise PermissionError(13, "Read-only file system")
        return real_unlink(self, **kwargs)

    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(LongVAError, match=r"stays damaged after embedding it again; delete that folder"):
        prepare_haystack(tiny_longva, haystack, 6, entry)
    assert "does not match its checksum; it is skipped and will be computed again" in " ".join(capsys.readouterr().err.split())


def test_a_full_disk_while_embedding_the_haystack_is_one_sentence(tiny_longva, haystack, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    from longva_cli.niah.video import prepare_haystack

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a block")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    entry = CacheEntry(tmp_path, {"haystack": "test"})
    with pytest.raises(LongVAError, match=r"could not write the haystack's embeddings to .* \(No space left on device\); free some space"):
        prepare_haystack(tiny_longva, haystack, 6, entry)
    assert not list(tmp_path.glob(".partial-*"))


def test_a_video_shorter_than_the_grid_says_how_many_frames_it_has(haystack):
    with pytest.raises(LongVAError, match="has 6 frames at 1 frame a second"):
        haystack_frame_ids(haystack, 8)


def test_needles_from_parquet_like_the_hub_set(tmp_path, needle_dir):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    images = []
    for i in range(2):
        buffer = io.BytesIO()
        from PIL import Image

        Image.open(needle_dir / f"needle{i}.png").save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
    table = pa.table({"image": images, "question": [q for q, _ in NEEDLES], "answer": [a for _, a in NEEDLES]})
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "test-00000-of-00001.parquet")
    needles = load_needles(str(tmp_path))
    assert [(n.question, n.answer) for n in needles] == NEEDLES
    assert needles[1].image.size == (200, 90)


# ---- resume -------------------------------------------------------------------------------


def test_a_killed_run_resumes_without_losing_or_recomputing_a_cell(video_run, video_settings, tmp_path, monkeypatch):
    settings = replace(video_settings, output=tmp_path / "run", max_frames=4, depth_step=0.5)
    original = fail_after(monkeypatch, scoring, "teacher_forced", 5, RuntimeError("killed"))
    with pytest.raises(RuntimeError, match="killed"):
        run_video(settings)
    assert len(read_lines(settings.output / "items.jsonl")) == 5
    finished_before = cell_lines(settings.output)
    assert len(finished_before) == 2  # the depth-0 cells finish first (the shared-prefix order)
    with open(settings.output / "items.jsonl", "a") as handle:
        handle.write('{"num_frames": 4, "dep')  # a write cut by the kill

    calls = []
    monkeypatch.setattr(scoring, "teacher_forced", lambda *a, **k: calls.append(1) or original(*a, **k))
    resumed = run_video(settings)
    assert len(calls) == 12 - 5 and resumed.scored_now == 7
    cells = cell_lines(settings.output)
    assert len(cells) == 6 and cells[:2] == finished_before
    assert len({(c["num_frames"], c["depth"]) for c in cells}) == 6
    full = {(c["num_frames"], c["depth"]): c for c in cell_lines(video_settings.output)}
    for cell in cells:  # the cells both grids hold are identical
        if (cell["num_frames"], cell["depth"]) in full:
            assert cell == full[(cell["num_frames"], cell["depth"])]
    assert run_video(settings).scored_now == 0


def test_a_damaged_middle_line_is_set_aside_and_no_cell_is_lost_or_counted_twice(video_run, video_settings, tmp_path, capsys):
    """A corrupted middle line of results.jsonl made a rerun stop reading there and average 2 of 12 cells."""
    settings = replace(video_settings, output=tmp_path / "run", max_frames=4, depth_step=0.5)
    run_video(settings)
    results = settings.output / "results.jsonl"
    intact = {(c["num_frames"], c["depth"]): c for c in cell_lines(settings.output)}
    lines = results.read_bytes().splitlines(keepends=True)
    damaged = lines[1][:10] + b"\xff\xfe\x00" + lines[1][13:]  # a bad disk's bytes, the newline kept
    results.write_bytes(lines[0] + damaged + b"".join(lines[2:]) + b"[1, 2]\n")
    capsys.readouterr()
    run_video(settings)
    assert f"set aside 2 damaged lines of {results}" in " ".join(capsys.readouterr().err.split())
    assert (settings.output / "results.jsonl.damaged").read_bytes() == damaged + b"[1, 2]\n"
    cells = cell_lines(settings.output)
    assert len(cells) == len(intact) == 6 and {(c["num_frames"], c["depth"]): c for c in cells} == intact
def test_ctrl_c_says_what_is_kept_and_the_rerun_says_it_is_resuming(video_settings, tmp_path, monkeypatch, longva_main):
    s = video_settings
    output = tmp_path / "run"
    original = fail_after(monkeypatch, scoring, "teacher_forced", 5)
    command = ["niah", "video", "--haystack", s.haystack, "--needles", s.needles, "--model", s.model, "--device", "cpu",
               "--cache-dir", s.cache_dir, "--min-frames", "2", "--max-frames", "4", "--frame-step", "2", "--depth-step", "0.5",
               "--output", output]
    stopped = longva_main(*command)
    assert stopped.returncode == 130 and stopped.stdout == ""
    assert stopped.stderr.splitlines()[-1] == f"interrupted: 2 of 6 cells are saved in {output}; continue with: longva niah video --resume {output}"

    monkeypatch.setattr(scoring, "teacher_forced", original)
    resumed = longva_main("niah", "video", "--resume", output)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: 2 of 6 cells done in {output}" in resumed.stderr
    assert "video NIAH scores" in resumed.stdout and "Average Accuracy" in resumed.stdout  # the result table: stdout
    assert len(cell_lines(output)) == 6


def test_resuming_a_finished_run_says_it_is_complete(video_run, video_settings, capsys):
    assert run_video(video_settings).scored_now == 0
    err = capsys.readouterr().err
    assert "every cell is already scored" in err and "0/0" not in err


def test_a_folder_of_other_settings_is_refused_unless_overwrite(tmp_path):
    identity = {"model": "a", "max_frames": 6}
    niah_results.prepare_folder(tmp_path, "video", {}, identity, overwrite=False)
    append_line(tmp_path / "results.jsonl", {"num_frames": 2, "depth": 0.0, "score": 1.0, "items": []})
    with pytest.raises(LongVAError, match="other settings.*--overwrite"):
        niah_results.prepare_folder(tmp_path, "video", {}, {**identity, "max_frames": 8}, overwrite=False)
    assert niah_results.prepare_folder(tmp_path, "video", {}, identity, overwrite=False) == 1
    assert niah_results.prepare_folder(tmp_path, "video", {}, {**identity, "max_frames": 8}, overwrite=True) == 0


def test_ranks_split_cells_without_overlap():
    from longva_cli.niah.grid import my_cells
    from longva_cli.parallel.ranks import ParallelState

    cells = [(n, d) for n in (2, 4, 6) for d in (0.0, 0.5, 1.0)]
    ranks = [ParallelState(rank=index, world_size=3, dp_rank=index, dp_world_size=3) for index in range(3)]
    shares = [my_cells(rank, cells) for rank in ranks]
    assert set().union(*shares) == set(cells) and sum(len(s) for s in shares) == len(cells)


# ---- text NIAH ----------------------------------------------------------------------------


# ---- --memory-budget ---------------------------------------------------------------------------------

# On the wide checkpoint (tests/conftest.py), 48 MiB holds a 2-frame haystack only with an fp8 KV
# cache (its fp32 cache would not fit), and a 4-frame one under no setting.
BUDGET = "48MiB"


def budgeted_niah(longva_main, checkpoint, haystack, needle_dir, output: Path, max_frames: int, budget: str = BUDGET):
    return longva_main("niah", "video", "--haystack", haystack, "--model", checkpoint, "--needles", needle_dir, "--output", output,
                       "--min-frames", "2", "--max-frames", max_frames, "--frame-step", "2", "--depth-step", "0.5", "--device", "cpu",
                       "--cache-dir", output.parent / "cache", "--memory-budget", budget, "--json")


def test_a_haystack_too_long_for_the_memory_budget_is_refused_before_loading(wide_checkpoint, haystack, needle_dir, tmp_path, monkeypatch, longva_main):
    monkeypatch.setattr("longva_cli.engine.loader.load", lambda *a, **k: pytest.fail("the model was loaded"))
    refused = budgeted_niah(longva_main, wide_checkpoint, haystack, needle_dir, tmp_path / "run", 4)
    assert refused.returncode == 1 and refused.stdout == "" and "Traceback" not in refused.stderr
    sentence = " ".join(refused.stderr.split())
    assert sentence.startswith("error: 4 frames need about") and sentence.count(". ") == 0
    assert sentence.endswith("ask for fewer frames (at most 2 fit: --max-frames 2) or raise --memory-budget.")


def test_a_budget_that_needs_an_fp8_kv_cache_scores_with_one_and_keeps_it_in_the_identity(
    wide_checkpoint, haystack, needle_dir, tmp_path, longva_main
):
    planned = budgeted_niah(longva_main, wide_checkpoint, haystack, needle_dir, tmp_path / "run", 2)
    assert planned.returncode == 0, planned.stderr
    assert "Memory plan for 2 frames on cpu: fp32 weights, fp8 KV cache, visual tokens on the device: about" in " ".join(planned.stderr.split())
    stored = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert stored["identity"]["kv_cache"] == "fp8" and "memory_budget" not in stored["identity"]
    assert len(json.loads(planned.stdout)["cells"]) == 3  # one haystack size, depths 0, 0.5 and 1
    # --resume keeps the stored fp8 KV cache whatever the budget; the same command with a budget
    # that plans the model's own KV storage would score differently, and is refused
    assert longva_main("niah", "video", "--resume", tmp_path / "run", "--memory-budget", "1GiB").returncode == 0
    roomier = budgeted_niah(longva_main, wide_checkpoint, haystack, needle_dir, tmp_path / "run", 2, budget="1GiB")
    assert roomier.returncode == 1 and "kv_cache = 'fp8', not 'auto'" in " ".join(roomier.stderr.split())


@pytest.fixture(scope="module")
def tiny_text_model(tmp_path_factory) -> Path:
    from transformers import Qwen2ForCausalLM

    from longva_cli.model.tiny import (
        build_tiny_tokenizer,
        save_tiny_tokenizer,
        tiny_configs,
    )

    folder = tmp_path_factory.mktemp("text-model")
    torch.manual_seed(0)
    Qwen2ForCausalLM(tiny_configs()[0]).save_pretrained(folder)
    save_tiny_tokenizer(build_tiny_tokenizer(), folder)
    return folder


def text_prompts(tokenizer, distractors: int = 0):
    from longva_cli.niah.text import TextNeedlePrompts, haystack_tokens, run_numbers

    numbers, others = run_numbers(7, 2, distractors)
    return TextNeedlePrompts(tokenizer, haystack_tokens(tokenizer, "synthetic", 600), numbers, others, seed=7)


def test_text_needle_goes_after_the_first_sentence_end_past_the_depth():
    from longva_cli.model.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    prompts = text_prompts(tokenizer)
    for length, depth in [(300, 0.5), (400, 0.3), (600, 0.9)]:
        book, at = prompts.book(length, depth, 0)
        start = int(length * depth)
        assert at > start and "." in tokenizer.decode([int(book[at - 1])])
        assert not any("." in tokenizer.decode([int(t)]) for t in book[start : at - 1])
        assert np.array_equal(book[at : at + len(prompts.needles[0])], prompts.needles[0])
    assert prompts.book(300, 0.0, 0)[1] == 0  # depth 0: the very start, as the original


def test_text_distractors_are_each_hidden_once():
    from longva_cli.model.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    prompts = text_prompts(tokenizer, distractors=3)
    book, _ = prompts.book(500, 0.4, 1)
    assert len(book) == 500 + len(prompts.needles[1]) + sum(len(d) for d in prompts.distractors)
    text = tokenizer.decode(book.tolist())
    assert text.count("special magic") == 4
    for city in ("New York", "London", "Paris"):
        assert text.count(f"special magic {city} number") == 1
    assert "Tokyo" not in text


@pytest.fixture(scope="module")
def text_settings(tiny_text_model, tmp_path_factory) -> TextSettings:
    return TextSettings(
        model=str(tiny_text_model), output=tmp_path_factory.mktemp("text") / "run", min_tokens=64, max_tokens=128,
        token_step=64, depth_step=0.5, samples=2, distractors=1, device="cpu",
    )


@pytest.fixture(scope="module")
def text_run(text_settings):
    """The one-process text run that the torchrun tests compare against, made once per module."""
    from longva_cli.niah.text import run_text

    return run_text(text_settings)


def test_text_run_scores_equal_a_naive_forward_and_use_the_text_format(tiny_text_model, text_settings, text_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longva_cli.niah.text import TextNeedlePrompts, haystack_tokens, run_numbers

    settings, run = text_settings, text_run
    rows = json.loads((settings.output / "all_accuracies.json").read_text())
    assert [list(row) for row in rows] == [["Context Length", "Document Depth", "Score"]] * 6
    assert (settings.output / "heatmap.png").is_file() and run.scored_now == 12

    model = AutoModelForCausalLM.from_pretrained(tiny_text_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_text_model)
    numbers, others = run_numbers(settings.seed, 2, 1)
    prompts = TextNeedlePrompts(tokenizer, haystack_tokens(tokenizer, "synthetic", 128), numbers, others, settings.seed)
    for cell in cell_lines(settings.output):
        for item in cell["items"]:
            ids = prompts.token_ids(cell["context_length"], cell["depth"], item["index"], with_answer=True)
            embeds = model.get_input_embeddings()(torch.from_numpy(ids))
            assert item["predicted_ids"] == scoring.naive_teacher_forced(model, embeds, len(item["answer_ids"]))
            assert item["answer"] == str(numbers[item["index"]]) and len(item["answer"]) == 7


def test_device_map_auto_runs_the_same_cells(video_run, video_settings, tmp_path):
    # On a CPU accelerate keeps every layer on the one device; on GPUs the same path spreads one
    # sequence's layers and KV cache over all of them.
    settings = replace(video_settings, output=tmp_path / "device-map", device_map="auto", device="auto")
    run_video(settings)
    def predictions(folder):
        return {(c["num_frames"], c["depth"]): [i["predicted_ids"] for i in c["items"]] for c in cell_lines(folder)}

    assert predictions(settings.output) == predictions(video_settings.output)


# ---- the command line ---------------------------------------------------------------------


def test_bad_input_is_one_line_without_traceback(haystack, needle_dir, tmp_path, longva_main):
    no_answers = tmp_path / "needles"
    no_answers.mkdir()
    write_image(no_answers / "a.png")
    (no_answers / "needles.jsonl").write_text(json.dumps({"image": "a.png", "question": "\nWhat?"}) + "\n")
    grid = ["--min-frames", "2", "--max-frames", "6", "--frame-step", "2"]
    cases = {
        "give a haystack video": ["video", *grid],
        "does not exist": ["video", "--haystack", str(tmp_path / "missing.mp4"), *grid],
        "has no answer": ["video", "--haystack", str(haystack), "--needles", str(no_answers), *grid],
        "has 6 frames at 1 frame a second": ["video", "--haystack", str(haystack), "--max-frames", "8", "--min-frames", "2", "--frame-step", "2"],
        "larger than the largest": ["video", "--haystack", str(haystack), "--min-frames", "6", "--max-frames", "2"],
        "--token-step must be a whole number at least 1, got 0": ["text", "--token-step", "0"],
        "does not divide 1": ["text", "--depth-step", "0.3"],
        "--distractors (one per city) must be a whole number at least 0 and at most 6, got 7": ["text", "--distractors", "7"],
    }
    for expected, args in cases.items():
        done = longva_main("niah", *args, "--output", tmp_path / "out")
        assert done.returncode == 1, (args, done.stderr)
        assert expected in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1


def test_a_needle_that_is_not_an_image_file_gets_one_sentence(tmp_path):
    from support.media import png_claiming

    numbered = tmp_path / "numbered"
    numbered.mkdir()
    (numbered / "needles.jsonl").write_text(json.dumps({"image": 5, "question": "\nWhat?", "answer": "A"}) + "\n")
    with pytest.raises(LongVAError, match='"image" must be a file name'):
        load_needles(str(numbered))
    bomb = tmp_path / "bomb"
    bomb.mkdir()
    (bomb / "big.png").write_bytes(png_claiming(30000, 30000))
    (bomb / "needles.jsonl").write_text(json.dumps({"image": "big.png", "question": "\nWhat?", "answer": "A"}) + "\n")
    with pytest.raises(LongVAError, match="pixels"):
        load_needles(str(bomb))


def test_flags_override_the_recipe_and_resume_reads_the_folder(tmp_path):
    from longva_cli.niah.cli import settings_for
    from longva_cli.niah.results import prepare_folder
    from longva_cli.niah.settings import identity
    from longva_cli.recipes import to_dict

    recipe = REPO / "recipes" / "niah" / "v-niah-longva-7b.yaml"
    settings = settings_for("video", str(recipe), None, {"max_frames": 1200, "output": tmp_path})
    assert (settings.max_frames, settings.frame_step, settings.dtype) == (1200, 200, "bfloat16")
    prepare_folder(tmp_path, "video", to_dict(settings), identity(settings), overwrite=False)
    resumed = settings_for("video", None, str(tmp_path), {})
    assert settings_for("video", None, "", {"output": tmp_path}) == settings  # the bare switch of the last release
    assert resumed == settings
    with pytest.raises(LongVAError, match="video recipe"):
        settings_for("text", str(recipe), None, {})


def torchrun_text(settings: TextSettings, output: Path, *extra: str) -> None:
    """`longva niah text` with `settings` under torchrun, two gloo processes on CPU."""
    s = settings
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "longva_cli",
         "niah", "text", "--model", s.model, "--output", str(output), "--min-tokens", str(s.min_tokens), "--max-tokens",
         str(s.max_tokens), "--token-step", str(s.token_step), "--depth-step", str(s.depth_step), "--samples", str(s.samples),
         "--distractors", str(s.distractors), "--device", "cpu", *extra],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.integration
def test_torchrun_ranks_split_the_cells_and_match_one_process(text_settings, text_run, tmp_path):
    """Two gloo processes on CPU: each takes every other cell; the merged files equal a one-process run."""
    output = tmp_path / "two-ranks"
    torchrun_text(text_settings, output)
    one = {(c["context_length"], c["depth"]): c for c in cell_lines(text_settings.output)}
    two = {(c["context_length"], c["depth"]): c for c in cell_lines(output)}
    assert len(one) == 6 and two == one
    assert (output / "all_accuracies.json").read_text() == (text_settings.output / "all_accuracies.json").read_text()


@pytest.mark.integration
def test_sequence_parallel_ranks_score_like_one_process(text_settings, text_run, tmp_path):
    """Two gloo processes split every sequence (DeepSpeed Ulysses): the same predictions as one process."""
    output = tmp_path / "sequence-parallel"
    torchrun_text(text_settings, output, "--sequence-parallel", "2")

    def predictions(folder):
        return {(c["context_length"], c["depth"]): [i["predicted_ids"] for i in c["items"]] for c in cell_lines(folder)}

    assert len(predictions(text_settings.output)) == 6
    assert predictions(output) == predictions(text_settings.output)
    assert len(read_lines(output / "items.jsonl")) == len(read_lines(text_settings.output / "items.jsonl"))

