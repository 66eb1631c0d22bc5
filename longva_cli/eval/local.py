"""`longva eval local`: multiple-choice video QA on a folder on disk, no hub, no harness.

Two layouts are read:

- Video-MME: an annotation parquet (or JSON) at the data root or in `videomme/`, with the
  columns video_id, duration, domain, sub_category, url, videoID, question_id, task_type,
  question, options (["A. ...", "B. ...", ...]), answer (a letter); videos in
  `data/{videoID}.mp4` (or .mkv).
- Generic JSONL, one question a line: {"video": path, "question": ..., "options": [...],
  "answer": "B"} with optional "id", "category" and "duration"; video paths are relative to
  the JSONL file.

Each video is decoded, encoded and prefilled once for all its questions (Video-MME asks
three; its embeddings are also kept in the visual cache for the next run), answers are greedy,
and every answer is appended to `samples.jsonl` as soon as it exists, so a rerun skips what is
done.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from longva_cli import defaults
from longva_cli.checks import check_number
from longva_cli.errors import LongVAError
from longva_cli.eval.answers import (
    LETTERS,
    DegenerateGuard,
    degenerate_kind,
    extract_letter,
)
from longva_cli.eval.report import run_info

DEFAULT_EVAL_MODEL = "lmms-lab/LongVA-7B"  # the checkpoint the paper's benchmark numbers are for
VIDEO_SUFFIXES = (".mp4", ".mkv", ".MP4", ".webm", ".avi", ".mov")
SAMPLES_FILE = "samples.jsonl"
RESULTS_FILE = "results.json"
RUN_FILE = "run.json"
# what a samples.jsonl line needs to be counted; a line without them is set aside and asked again
SAMPLE_FIELDS = ("id", "status", "response", "correct")

# `videomme` is Video-MME's own frames-only prompt. `lmms-eval` is what lmms-eval's videomme
# task builds (0.3 to 0.7.x) for models without their own settings: it mentions subtitles
# that are not there and ends with another instruction; use it to compare with harness runs.
PROMPTS = {
    "videomme": (
        "Select the best answer to the following multiple-choice question based on the video. "
        "Respond with only the letter ({letters}) of the correct option.\n{question}\n{options}\nThe best answer is:"
    ),
    "lmms-eval": (
        "Select the best answer to the following multiple-choice question based on the video and the subtitles. "
        "Respond with only the letter ({letters}) of the correct option.\n{question}\n{options}\n"
        "\nAnswer with the option's letter from the given choices directly."
    ),
}


@dataclass
class Sample:
    """One multiple-choice question about one video."""

    id: str
    video: Path | None  # None: the annotation names a video that is not on disk
    video_name: str  # how the annotation names it, for messages and records
    question: str
    options: list[str]  # "A. ...", one per option
    answer: str  # a letter
    duration: str | None = None
    category: str | None = None  # Video-MME's task_type
    domain: str | None = None
    sub_category: str | None = None


# ---- reading annotations ---------------------------------------------------------------------


def find_annotations(data: Path) -> Path | list[Path]:
    """The annotation file(s) of a data folder: parquet shards, else one JSON, else one JSONL."""
    if not data.exists():
        raise LongVAError(f"data folder {data} does not exist; give the folder holding the annotations and data/ videos.")
    if data.is_file():
        return data
    ours = {RESULTS_FILE, RUN_FILE, SAMPLES_FILE}
    parquet = sorted(data.glob("*.parquet")) or sorted(data.glob("videomme/*.parquet"))
    if parquet:
        return parquet
    for suffix in (".json", ".jsonl"):
        found = sorted(p for p in data.glob(f"*{suffix}") if p.name not in ours)
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise LongVAError(f"{data} holds several {suffix} files ({names}); pick one with --annotations.")
    raise LongVAError(
        f"{data} has no annotation file (*.parquet, videomme/*.parquet, *.json or *.jsonl); "
        "give the Video-MME folder or a JSONL file with --annotations."
    )


def read_rows(path: Path | list[Path]) -> list[tuple[str, dict]]:
    """(where, row) pairs; `where` names the file and line or row for error messages."""
    if isinstance(path, list):
        return [pair for shard in path for pair in read_rows(shard)]
    if not path.is_file():
        raise LongVAError(f"annotation file {path} does not exist; check --annotations.")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise LongVAError("reading parquet annotations needs pyarrow: `pip install 'longva[eval]'` (or pyarrow).") from None
        try:
            table = pq.read_table(path)
        except Exception as err:  # noqa: BLE001 - arrow raises several types for bad files
            raise LongVAError(f"{path} is not a readable parquet file ({err}); re-download it.") from None
        return [(f"{path} row {i + 1}", row) for i, row in enumerate(table.to_pylist())]
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise LongVAError(f"{path} line {number} is not valid JSON ({err.msg}); fix or remove that line.") from None
            if not isinstance(row, dict):
                raise LongVAError(f"{path} line {number} is not a JSON object; each line needs video, question, options and answer.")
            rows.append((f"{path} line {number}", row))
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise LongVAError(f"{path} is not valid JSON (line {err.lineno}: {err.msg}); fix the file.") from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise LongVAError(f"{path} must hold a JSON list of question objects; see `longva eval local --help`.")
    return [(f"{path} item {i + 1}", row) for i, row in enumerate(rows)]


def with_letters(options: list[str]) -> list[str]:
    """Options as "A. text"; lists that already carry their letters are kept as they are."""
    if all(option.lstrip().upper().startswith((f"{letter}.", f"{letter})", f"({letter})")) for letter, option in zip(LETTERS, options)):
        return [option.strip() for option in options]
    return [f"{letter}. {option.strip()}" for letter, option in zip(LETTERS, options)]


def find_video(folder: Path, stem: str) -> Path | None:
    for suffix in VIDEO_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def parse_row(where: str, row: dict, root: Path) -> Sample:
    """A Video-MME row (has videoID) or a generic row (has video) -> Sample."""
    videomme = "videoID" in row
    required = ("videoID", "question_id", "question", "options", "answer") if videomme else ("video", "question", "options", "answer")
    for key in required:
        if row.get(key) in (None, ""):
            raise LongVAError(f"{where} lacks {key!r}; each question needs {', '.join(required)}.")
    options = row["options"]
    if hasattr(options, "tolist"):
        options = options.tolist()
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
        raise LongVAError(f"{where}: 'options' must be a list of at least two strings, got {options!r}.")
    if len(options) > len(LETTERS):
        raise LongVAError(f"{where} has {len(options)} options; at most {len(LETTERS)} are supported.")
    letters = LETTERS[: len(options)]
    answer = str(row["answer"]).strip().strip("().").upper()
    if answer not in letters:
        raise LongVAError(f"{where}: answer {row['answer']!r} is not one of the option letters {', '.join(letters)}.")
    if videomme:
        video_name = f"data/{row['videoID']}.mp4"
        video = find_video(root / "data", str(row["videoID"]))
        sample_id = str(row["question_id"])
        category = row.get("task_type")
    else:
        video_name = str(row["video"])
        video = Path(video_name).expanduser()
        video = video if video.is_absolute() else root / video
        video = video if video.is_file() else None
        sample_id = str(row.get("id") or where.rsplit(" ", 1)[-1])
        category = row.get("category")
    return Sample(
        id=sample_id,
        video=video,
        video_name=video_name,
        question=str(row["question"]).strip(),
        options=with_letters(options),
        answer=answer,
        duration=row.get("duration"),
        category=category,
        domain=row.get("domain"),
        sub_category=row.get("sub_category"),
    )


def load_samples(data: Path, annotations: Path | None = None) -> tuple[list[Sample], Path | list[Path]]:
    """All questions of a data folder (or a JSONL file), checked before any model is loaded."""
    data = Path(data).expanduser()
    source = Path(annotations).expanduser() if annotations else find_annotations(data)
    rows = read_rows(source)
    if not rows:
        raise LongVAError(f"{source} holds no questions; check the file.")
    first = source[0] if isinstance(source, list) else source
    # Video-MME keeps data/ next to the annotations (or one level up from videomme/).
    root = data if data.is_dir() else first.parent
    if not (root / "data").is_dir() and (first.parent / "data").is_dir():
        root = first.parent
    samples = []
    for where, row in rows:
        row_root = root if "videoID" in row else first.parent
        samples.append(parse_row(where, row, row_root))
    seen: set[str] = set()
    for sample in samples:
        if sample.id in seen:
            raise LongVAError(f"question id {sample.id!r} appears twice in {first}; ids must be unique for resuming.")
        seen.add(sample.id)
    return samples, source


# ---- prompting and scoring -------------------------------------------------------------------


def letters_phrase(count: int) -> str:
    letters = list(LETTERS[:count])
    return letters[0] if count == 1 else ", ".join(letters[:-1]) + (", or " if count > 2 else " or ") + letters[-1]


def build_question(sample: Sample, style: str = "videomme") -> str:
    """The user text after the video: instruction, question, options one per line, answer cue."""
    if style not in PROMPTS:
        raise LongVAError(f"--prompt {style!r} is not known; use {' or '.join(PROMPTS)}.")
    return PROMPTS[style].format(
        letters=letters_phrase(len(sample.options)), question=sample.question, options="\n".join(sample.options)
    )


def accuracy(correct: int, total: int) -> dict:
    return {"correct": correct, "total": total, "accuracy": round(100.0 * correct / total, 2) if total else None}


def summarize(records: list[dict]) -> dict:
    """Accuracy (percent) overall and by duration, category (task type) and domain.

    Skipped questions (video missing or unreadable) are counted apart, not as wrong.
    """
    answered = [r for r in records if r["status"] == "ok"]
    summary = {
        "overall": accuracy(sum(r["correct"] for r in answered), len(answered)),
        "skipped": len(records) - len(answered),
    }
    for field in ("duration", "category", "domain"):
        groups: dict[str, list[bool]] = defaultdict(list)
        for record in answered:
            if record.get(field):
                groups[str(record[field])].append(record["correct"])
        if groups:
            summary[field] = {name: accuracy(sum(marks), len(marks)) for name, marks in sorted(groups.items())}
    return summary


# ---- the evaluation --------------------------------------------------------------------------


def evaluate_local(
    data: Path,
    *,
    model=DEFAULT_EVAL_MODEL,
    frames: int = defaults.FRAMES,
    output: Path | None = None,
    annotations: Path | None = None,
    prompt: str = "videomme",
    max_new_tokens: int = 16,
    limit: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    attn: str = "auto",
    kv_cache: str = "auto",
    memory_budget: str | None = None,
    revision: str | None = None,
    prefill_chunk: int = defaults.PREFILL_CHUNK,
    cache=None,
    overwrite: bool = False,
    stop_on_degenerate: bool = True,
    degenerate_threshold: float = 0.3,
    degenerate_min_samples: int = 10,
    on_warning: Callable[[str], None] | None = None,
    on_plan: Callable[[str], None] = lambda line: None,
    progress=None,
) -> dict:
    """Answer every question greedily, score, and write samples.jsonl, run.json and results.json.

    `model` is a checkpoint folder, hub id or short name, or a loaded `LongVA`; `cache` a
    `VisualCache` for the videos' embeddings. Returns the content of results.json. Questions
    already in `output/samples.jsonl` are not asked again.

    A model given by name is planned for `frames` frames a video before it loads (engine/plan.py):
    the cheapest settings that fit `memory_budget` (None: the device's free memory) are taken and
    `on_plan` gets the line that says so; a LongVAError names the most frames that fit when none do.
    """
    from longva_cli.engine.runs import RunStore

    for flag, count in {"--frames": frames, "--max-new-tokens": max_new_tokens, "--prefill-chunk": prefill_chunk}.items():
        check_number(flag, count, integer=True, at_least=1)
    check_number("--limit", limit, integer=True, at_least=1, nullable=True)
    check_number("--degenerate-threshold", degenerate_threshold, at_least=0, at_most=1)
    check_number("--degenerate-min-samples", degenerate_min_samples, integer=True, at_least=1)
    if prompt not in PROMPTS:
        raise LongVAError(f"--prompt {prompt!r} is not known; use {' or '.join(PROMPTS)}.")
    if memory_budget is not None:
        from longva_cli.engine.plan import parse_size

        parse_size(memory_budget)
    data = Path(data).expanduser()
    samples, source = load_samples(data, annotations)
    if limit is not None:
        samples = samples[:limit]
    output = run_folder(data, frames, output)
    model_name = model if isinstance(model, str) else getattr(model, "name", "longva")
    settings = {"model": str(model_name), "frames": frames, "prompt": prompt, "max_new_tokens": max_new_tokens}
    store = RunStore(output, RUN_FILE, fields={SAMPLES_FILE: SAMPLE_FIELDS})
    store.open(settings, overwrite=overwrite, results=(SAMPLES_FILE, RESULTS_FILE))

    records: dict[str, dict] = {}
    for record in store.read(SAMPLES_FILE):
        records[str(record["id"])] = record  # the last line of a question wins
    guard = DegenerateGuard(degenerate_threshold, degenerate_min_samples)
    for record in records.values():
        if record["status"] == "ok":
            guard.add(record["response"], record.get("degenerate"))
    todo = [s for s in samples if records.get(s.id, {}).get("status") != "ok"]

    run = store.stored().get("run")
    warned = False
    if todo:
        from longva_cli.engine.objectives import SamplingSettings
        from longva_cli.engine.runner import PrefixCache

        fitted = plan_loading(
            model, frames=frames, max_new_tokens=max_new_tokens, prefill_chunk=prefill_chunk, device=device, dtype=dtype,
            kv_cache=kv_cache, memory_budget=memory_budget, revision=revision, on_plan=on_plan,
        )
        longva, model_path = load_model(
            model, device=device, dtype=dtype, attn=attn, revision=revision, kv_cache=fitted.kv_cache, quantize=fitted.quantize
        )
        run = run_info(
            model=str(model_name),
            model_path=model_path,
            frames=frames,
            dtype=str(longva.model.dtype).removeprefix("torch."),
            prompt=prompt,
            max_new_tokens=max_new_tokens,
            annotations=[str(p) for p in source] if isinstance(source, list) else str(source),
        )
        store.note(run=run)
        sampling = SamplingSettings.defaults(longva.generation_config, max_new_tokens=max_new_tokens, temperature=0.0)
        with progress or contextlib.nullcontext():  # the bar shows only while questions are answered
            task = progress.add_task("Answering", total=len(todo)) if progress else None
            for video, group in group_by_video(todo):
                # The video's questions share the system prompt and video tokens: prefill them once.
                # Made before the video is encoded, so that the last video's KV cache is freed first
                # (the plan counts one video's).
                runner = PrefixCache(longva.model.language_model, prefill_chunk)
                visual, reason = encode_once(longva, video, group[0], frames, cache, on_host=fitted.visual_tokens_on_host)
                for sample in group:
                    if visual is None:
                        record = skipped_record(sample, reason)
                    else:
                        record = answer_one(longva, sample, visual, sampling, prompt, runner)
                        guard.add(record["response"], record["degenerate"])
                    store.append(SAMPLES_FILE, record)
                    records[sample.id] = record
                    if progress:
                        progress.advance(task)
                    if guard.tripped and record["status"] == "ok":
                        if stop_on_degenerate:
                            finish(store, samples, records, run, guard, stopped=True)
                            raise LongVAError(
                                f"stopped: {guard.message()}; rerun with --no-stop-on-degenerate to finish anyway."
                            )
                        if not warned and on_warning:
                            on_warning(guard.message())
                            warned = True
    elif guard.tripped and on_warning:
        on_warning(guard.message())
    return finish(store, samples, records, run, guard, stopped=False)


def run_folder(data: Path, frames: int, output: Path | None) -> Path:
    """--output, or runs/eval-local/<data>-<frames>f."""
    return Path(output) if output else Path("runs") / "eval-local" / f"{Path(data).expanduser().stem}-{frames}f"


def plan_loading(
    model, *, frames: int, max_new_tokens: int, prefill_chunk: int, device: str, dtype: str, kv_cache: str,
    memory_budget: str | None, revision: str | None, on_plan: Callable[[str], None],
):
    """The settings to load `model` with for `frames` frames a video (`plan.fit_budget`); a model
    handed in ready is taken as it is."""
    from longva_cli.engine.plan import Fitted, fit_budget, plan_for

    if not isinstance(model, str):
        return Fitted(None, kv_cache)
    return fit_budget(
        lambda: plan_for(
            model, None, images=frames, max_new_tokens=max_new_tokens, prefill_chunk=prefill_chunk, device=device, dtype=dtype,
            quantize=None, kv_cache=kv_cache, budget=memory_budget, revision=revision,
        ),
        on_plan, quantize=None, kv_cache=kv_cache,
    )


def load_model(model, *, device: str, dtype: str, attn: str, revision: str | None, kv_cache: str = "auto", quantize: str | None = None):
    """A LongVA and the folder it came from (None when it was handed in ready)."""
    if not isinstance(model, str):
        return model, None
    from longva_cli.engine.loader import load

    longva = load(model, device=device, dtype=dtype, attn=attn, revision=revision, kv_cache=kv_cache, quantize=quantize)
    return longva, longva.folder


def group_by_video(samples: list[Sample]) -> list[tuple[Path | None, list[Sample]]]:
    """Questions grouped by video in first-seen order, so each video is encoded and prefilled once."""
    groups: dict[object, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(sample.video or sample.video_name, []).append(sample)
    return [(group[0].video, group) for group in groups.values()]


def encode_once(longva, video: Path | None, sample: Sample, frames: int, cache, on_host: bool = False):
    """(Visual, None), or (None, why it was skipped) for a missing or unreadable video; with
    `on_host` its visual tokens stay in host memory (`encode_media`)."""
    from longva_cli.engine.answering import encode_media
    from longva_cli.engine.encoder import MediaSpec
    from longva_cli.engine.objectives import drive

    if video is None:
        return None, f"video {sample.video_name} not found"
    try:
        return drive(encode_media(longva, [MediaSpec(video, frames)], cache, on_host))[0], None
    except LongVAError as err:
        return None, str(err)


def answer_one(longva, sample: Sample, visual, sampling, style: str, runner) -> dict:
    from longva_cli.engine.answering import Request, answer
    from longva_cli.engine.objectives import Generate, drive
    from longva_cli.model.prompt import DEFAULT_SYSTEM, Turn

    started = time.perf_counter()
    request = Request([Turn("user", build_question(sample, style))], Generate(sampling), [visual], DEFAULT_SYSTEM)
    answered = drive(answer(longva, request, runner))
    generated = answered.result
    letter = extract_letter(generated.text, sample.options)
    return {
        **base_record(sample),
        "status": "ok",
        "response": generated.text,
        "prediction": letter,
        "correct": letter == sample.answer,
        "degenerate": degenerate_kind(generated.text, letter),
        "frames": visual.images,
        "prompt_tokens": answered.prompt_tokens,
        "generated_tokens": len(generated.token_ids),
        "seconds": round(time.perf_counter() - started, 3),
    }


def base_record(sample: Sample) -> dict:
    record = asdict(sample)
    record["video"] = str(sample.video) if sample.video else sample.video_name
    record.pop("video_name")
    return record


def skipped_record(sample: Sample, reason: str) -> dict:
    return {**base_record(sample), "status": "skipped", "reason": reason, "response": None, "prediction": None, "correct": False}


def finish(store, samples: list[Sample], records: dict, run, guard: DegenerateGuard, stopped: bool) -> dict:
    """Score the questions of this data set and write results.json."""
    wanted = [records[s.id] for s in samples if s.id in records]
    skipped = [{"id": r["id"], "video": r["video"], "reason": r["reason"]} for r in wanted if r["status"] == "skipped"]
    results = {
        "summary": summarize(wanted),
        "questions": len(samples),
        "status": "stopped: degenerate output" if stopped else ("complete" if len(wanted) == len(samples) else "partial"),
        "degenerate": guard.to_dict(),
        "skipped": skipped,
        "run": run,
        "samples_file": str(store.path(SAMPLES_FILE)),
    }
    store.write_json(RESULTS_FILE, results)
    return results
