"""`longva eval ppl`: windowed perplexity equals a plain forward, the original's file layouts, resume, bad input."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from longva_cli.engine.runs import read_lines
from longva_cli.errors import LongVAError
from longva_cli.eval import ppl
from longva_cli.eval.ppl import PplSettings, evaluate_perplexity, window_spans
from support import REPO
from support.cli import fail_after

GRID = dict(min_tokens=32, max_tokens=128)  # 32, 64, 128


def write_text_model(folder: Path, seed: int) -> Path:
    from transformers import Qwen2ForCausalLM

    from longva_cli.model.tiny import build_tiny_tokenizer, save_tiny_tokenizer, tiny_configs

    torch.manual_seed(seed)
    Qwen2ForCausalLM(tiny_configs()[0]).save_pretrained(folder)
    save_tiny_tokenizer(build_tiny_tokenizer(), folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("ppl-models")
    return [write_text_model(root / "first", 0), write_text_model(root / "second", 1)]


@pytest.fixture(scope="module")
def tokenizer(models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models[0])


def book(seed: int, sentences: int) -> str:
    from longva_cli.niah.text import synthetic_haystack

    return synthetic_haystack(seed=seed, sentences=sentences)


@pytest.fixture(scope="module")
def books(tmp_path_factory) -> Path:
    """Three books of about 85, 330 and 510 tokens, and one too short for any context length."""
    folder = tmp_path_factory.mktemp("books")
    for index, sentences in enumerate([2, 8, 12]):
        (folder / f"book{index}.txt").write_text(book(index, sentences))
    (folder / "note.txt").write_text("Too short.")
    return folder


def settings(models, data, output, **changes) -> PplSettings:
    return PplSettings(models=[str(m) for m in models], data=str(data), output=output, device="cpu", prefill_chunk=16, **{**GRID, **changes})


def plain_window_nlls(language_model, tokens: np.ndarray, context: int, stride: int, start_ids: list[int]) -> list[float]:
    """Each window through one full forward with `labels`: the transformers loss of its scored tokens, summed."""
    nlls = []
    for start, stop, first in window_spans(len(tokens), context, stride, bool(start_ids)):
        ids = torch.tensor([*start_ids, *tokens[start:stop].tolist()])[None]
        labels = ids.clone()
        labels[0, : ids.shape[1] - (stop - first)] = -100
        with torch.no_grad():
            loss = language_model(input_ids=ids, labels=labels).loss
        nlls.append(float(loss) * (stop - first))
    return nlls


def token_arrays(tokenizer, folder: Path) -> list[np.ndarray]:
    texts = [path.read_text() for path in sorted(folder.glob("*.txt"))]
    return [np.asarray(tokenizer(text, add_special_tokens=False).input_ids) for text in texts]


# ---- windows ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("length, context, stride", [(200, 64, 64), (200, 64, 24), (64, 64, 64), (129, 64, 64), (300, 32, 7)])
@pytest.mark.parametrize("start_token", [False, True])
def test_every_token_is_scored_once_in_windows_of_the_full_length(length, context, stride, start_token):
    spans = window_spans(length, context, stride, start_token)
    scored = [i for _, stop, first in spans for i in range(first, stop)]
    assert scored == sorted(set(scored))  # in order, none twice
    # Left out: only a window's first token when no earlier window covered it and there is no
    # start token to predict it from (the original's windows leave out the same ones).
    uncovered = {start for index, (start, _, _) in enumerate(spans) if index == 0 or spans[index - 1][1] <= start}
    assert set(range(length)) - set(scored) == (set() if start_token else uncovered)
    assert all(stop - start == context for start, stop, _ in spans)
    assert spans[-1][1] == length
    assert [start for start, _, _ in spans[:-1]] == list(range(0, (len(spans) - 1) * stride, stride))


def test_windows_match_the_original_where_the_document_fits_them_exactly():
    """The original: begin every stride, end = min(begin + L, n), score end - previous end tokens."""
    length, context, stride = 64 + 5 * 24, 64, 24
    original, previous = [], 0
    for begin in range(0, length, stride):
        end = min(begin + context, length)
        original.append((begin, end, max(end - (end - previous), begin + 1)))
        previous = end
        if end == length:
            break
    assert window_spans(length, context, stride, False) == original


@pytest.mark.parametrize("text", ["one endless word " * 3 + "x" * 300, "line one\nline two\n\n" * 40, "words and more words " * 60])
def test_a_document_tokenized_in_pieces_gives_the_ids_of_the_whole(tokenizer, text):
    pieces = list(ppl.text_pieces(text, size=100))
    assert "".join(pieces) == text and all(len(piece) <= 100 for piece in pieces)
    ids = np.concatenate([tokenizer(piece, add_special_tokens=False).input_ids for piece in pieces])
    assert ids.tolist() == tokenizer(text, add_special_tokens=False).input_ids


def test_one_huge_line_is_tokenized_in_bounded_pieces(tokenizer):
    """One 50 MB line took 9.4 GB and did not finish: the tokenizer only ever sees pieces."""
    seen = []

    def measured(text, **kwargs):
        seen.append(len(text))
        return tokenizer(text, **kwargs)

    line = "word " * (ppl.PIECE_CHARS // 2)  # 2.5 pieces of one line
    ids = ppl.tokenize_document(measured, line)
    assert max(seen) <= ppl.PIECE_CHARS and len(seen) == 3
    assert len(ids) == len(tokenizer(line, add_special_tokens=False).input_ids)


def test_start_tokens_are_the_ones_the_tokenizer_adds(tokenizer):
    import copy

    from tokenizers.processors import TemplateProcessing

    tokenizer = copy.deepcopy(tokenizer)
    assert ppl.start_token_ids(tokenizer) == []  # Qwen2 adds none
    bos = tokenizer.convert_tokens_to_ids("<|endoftext|>")  # a Llama-like tokenizer puts a BOS first
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    assert ppl.start_token_ids(tokenizer) == [bos]


# ---- the numbers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [64, 24])
@pytest.mark.parametrize("start_ids", [[], [481]])
def test_chunked_windowed_nll_equals_a_full_forward_with_labels(models, tokenizer, books, stride, start_ids):
    from longva_cli.engine import PrefixCache, load

    model = load(str(models[0]), kind="causal-lm", device="cpu")
    runner = PrefixCache(model.language_model, chunk=16)  # several chunks per window, logits only where scored
    tokens = token_arrays(tokenizer, books)[2]
    ours = [nll for nll, _ in ppl.score_document(model, runner, tokens.astype(np.uint32), 64, stride, start_ids)]
    plain = plain_window_nlls(model.language_model, tokens, 64, stride, start_ids)
    assert len(ours) == len(plain) > 3
    assert ours == pytest.approx(plain, rel=1e-4)


def test_a_model_whose_loss_overflows_reports_infinite_perplexity_not_a_crash():
    broken = ppl.Measurement(nll=1e6, tokens=10, window_means=[1e5], documents=1)
    assert broken.perplexity == broken.window_mean_perplexity == math.inf


@pytest.fixture(scope="module")
def run(models, books, tmp_path_factory):
    output = tmp_path_factory.mktemp("ppl-run") / "run"
    warnings = []
    result = evaluate_perplexity(settings(models, books, output, samples=3, min_doc_tokens=40), on_warning=warnings.append)
    return result, warnings


def test_perplexity_is_exp_of_the_token_weighted_mean_and_the_original_mean_too(run, models, books, tokenizer):
    from transformers import AutoModelForCausalLM

    result, _ = run
    record = next(r for r in result.records if r["model"] == str(models[1]) and r["context_length"] == 64)
    language_model = AutoModelForCausalLM.from_pretrained(models[1]).eval()
    nlls, counts, means = 0.0, 0, []
    for tokens in token_arrays(tokenizer, books)[:3]:
        if len(tokens) < 64:
            continue
        windows = plain_window_nlls(language_model, tokens, 64, 64, [])
        spans = window_spans(len(tokens), 64, 64, False)
        nlls += sum(windows)
        counts += sum(stop - first for _, stop, first in spans)
        means += [nll / (stop - first) for nll, (_, stop, first) in zip(windows, spans)]
    assert record["tokens_scored"] == counts and record["windows"] == len(means) and record["documents"] == 3
    assert record["perplexity"] == pytest.approx(math.exp(nlls / counts), rel=1e-4)
    assert record["window_mean_perplexity"] == pytest.approx(math.exp(sum(means) / len(means)), rel=1e-4)


@pytest.mark.integration
def test_sequence_parallel_ranks_give_the_one_process_perplexities(run, models, books, tmp_path):
    """Two gloo processes split every window (DeepSpeed Ulysses over the 2 KV heads)."""
    from longva_cli.parallel.ranks import free_port

    output = tmp_path / "sequence-parallel"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
         "-m", "longva_cli", "eval", "ppl", *[part for model in models for part in ("--model", str(model))], "--data", str(books),
         "--min-tokens", "32", "--max-tokens", "128", "--samples", "3", "--min-doc-tokens", "40", "--prefill-chunk", "16",
         "--sequence-parallel", "2", "--device", "cpu", "--output", str(output)],
        check=False, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    one = {(r["model"], r["context_length"]): r for r in run[0].records}
    split = {(r["model"], r["context_length"]): r for r in read_lines(output / "ppl.jsonl")}
    assert len(one) == 6 and set(split) == set(one)
    for key, record in split.items():
        assert (record["tokens_scored"], record["windows"]) == (one[key]["tokens_scored"], one[key]["windows"])
        assert record["perplexity"] == pytest.approx(one[key]["perplexity"], rel=1e-4)


def test_eval_ppl_with_an_fp8_kv_cache_records_it_and_stays_within_a_stated_bound(run, models, books, tmp_path):
    result, _ = run
    fp8 = evaluate_perplexity(settings(models[:1], books, tmp_path / "fp8", samples=3, min_doc_tokens=40, kv_cache="fp8"))
    reference = {r["context_length"]: r for r in result.records if r["model"] == str(models[0])}
    assert fp8.records and all(record["kv_cache"] == "float8_e4m3fn" for record in fp8.records)
    assert {r["kv_cache"] for r in result.records} == {"float32"}
    for record in fp8.records:
        expected = reference[record["context_length"]]
        assert record["perplexity"] != expected["perplexity"]  # the keys and values really went through float8
        # these tiny models' perplexity moves by 2.2e-4 relative at most with fp8 (measured); bound 1e-2
        assert record["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-2)


def test_outputs_follow_the_original_layout(run, models):
    result, warnings = run
    folder = result.folder
    lines = (folder / "ppl.csv").read_text().splitlines()
    assert lines[0] == ",32,64,128"
    records = {(r["model"], r["context_length"]): r for r in read_lines(folder / "ppl.jsonl")}
    assert len(records) == 6 and len(result.scored_now) == 6
    for line, model in zip(lines[1:], models):
        name, *values = line.split(",")
        assert name == str(model)
        assert [float(v) for v in values] == [records[(name, length)]["perplexity"] for length in (32, 64, 128)]
    record = records[(str(models[0]), 128)]
    assert {"tokens_scored", "seconds", "tokens_per_s", "window_mean_perplexity", "documents"} <= set(record)
    assert record["documents"] == 2  # the ~150-token book is shorter than 128: left out there, and said so
    assert any("left out" in warning for warning in warnings)
    assert (folder / "ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_redraws_the_curve_from_the_csv(run, tmp_path):
    from longva_cli.eval.ppl_plot import draw_curves

    lengths, rows = ppl.read_table(run[0].folder / "ppl.csv")
    assert lengths == [32, 64, 128] and len(rows) == 2
    path = draw_curves(lengths, {**rows, "partial": [5.0, None, 4.0]}, tmp_path / "curve.png", title="tiny")
    assert path.read_bytes()[:4] == b"\x89PNG"


# ---- resuming ------------------------------------------------------------------------------------


def test_a_killed_run_continues_where_it_stopped(run, models, books, tmp_path, monkeypatch):
    output = tmp_path / "killed"
    real_measure = fail_after(monkeypatch, ppl, "measure", 2)  # killed on the third
    with pytest.raises(KeyboardInterrupt):
        evaluate_perplexity(settings(models, books, output, samples=3, min_doc_tokens=40))
    with open(output / "ppl.jsonl", "ab") as handle:
        handle.write(b'{"model": "half a line\xff\x00\xfe')  # a write the kill cut short, ending in binary garbage
    monkeypatch.setattr(ppl, "measure", real_measure)

    resumed = evaluate_perplexity(settings(models, books, output, samples=3, min_doc_tokens=40))
    assert resumed.scored_now == [(str(models[0]), 128), (str(models[1]), 32), (str(models[1]), 64), (str(models[1]), 128)]
    clean = {(r["model"], r["context_length"]): r["perplexity"] for r in run[0].records}
    assert {(r["model"], r["context_length"]): r["perplexity"] for r in resumed.records} == pytest.approx(clean, rel=1e-9)
    assert (output / "ppl.csv").read_text().splitlines()[0] == ",32,64,128"
    assert (output / "ppl.jsonl.damaged").read_bytes() == b'{"model": "half a line\xff\x00\xfe\n'  # kept, set aside

    monkeypatch.setattr(ppl, "load_for_scoring", lambda *a: pytest.fail("a finished run loaded a model"))
    again = evaluate_perplexity(settings(models, books, output, samples=3, min_doc_tokens=40))
    assert again.scored_now == [] and len(again.records) == 6


def test_ctrl_c_on_the_command_line_says_what_is_saved_and_how_to_continue(models, books, tmp_path, monkeypatch, longva_main):
    fail_after(monkeypatch, ppl, "measure", 2)
    output = tmp_path / "run"
    command = ["eval", "ppl", "--model", models[0], "--data", books, "--min-tokens", "32", "--max-tokens", "128", "--samples", "3",
               "--min-doc-tokens", "40", "--device", "cpu", "--output", output]
    stopped = longva_main(*command)
    assert stopped.returncode == 130 and stopped.stdout == ""
    again = "longva " + " ".join(map(str, command))
    assert stopped.stderr.splitlines()[-1] == (
        f"interrupted: 2 (model, length) results are saved in {output}/ppl.jsonl; run the same command to continue: {again}"
    )


def test_other_settings_are_refused_unless_overwrite(run, models, books, tmp_path):
    folder = shutil.copytree(run[0].folder, tmp_path / "run")
    with pytest.raises(LongVAError, match="--overwrite"):
        evaluate_perplexity(settings(models[:1], books, folder, samples=3, min_doc_tokens=40, stride=16))
    replaced = evaluate_perplexity(settings(models[:1], books, folder, samples=3, min_doc_tokens=40, stride=16, max_tokens=32), overwrite=True)
    assert replaced.scored_now == [(str(models[0]), 32)] and len(replaced.records) == 1


# ---- models and data -----------------------------------------------------------------------------


def test_a_longva_checkpoint_is_scored_by_its_language_model(tiny_checkpoint, books, tmp_path):
    from transformers import AutoTokenizer

    from longva_cli.model.checkpoint import load_longva

    result = evaluate_perplexity(settings([tiny_checkpoint], books, tmp_path / "longva", max_tokens=64, samples=1, min_doc_tokens=300))
    language_model = load_longva(tiny_checkpoint, dtype=torch.float32, attn_implementation="sdpa").language_model.eval()
    tokens = token_arrays(AutoTokenizer.from_pretrained(tiny_checkpoint), books)[1]
    for record in result.records:
        context = record["context_length"]
        expected = sum(plain_window_nlls(language_model, tokens, context, context, [])) / record["tokens_scored"]
        assert record["perplexity"] == pytest.approx(math.exp(expected), rel=1e-4)


def test_text_files_jsonl_parquet_and_saved_datasets_give_the_same_documents(tokenizer, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [book(7, 6), book(8, 9)]
    (tmp_path / "txt").mkdir()
    for index, text in enumerate(texts):
        (tmp_path / "txt" / f"{index}.txt").write_text(text)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"id": i, "content": t}) + "\n" for i, t in enumerate(texts)))
    pq.write_table(pa.table({"content": texts}), tmp_path / "docs.parquet")
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"content": texts})}).save_to_disk(str(tmp_path / "saved"))

    expected = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    for source, field in [("txt", "text"), ("docs.jsonl", "content"), ("docs.parquet", "content"), ("saved", "content")]:
        opened = ppl.open_source(str(tmp_path / source), field, "test")
        documents = ppl.tokenized_documents(opened, tokenizer, min_doc_tokens=0, samples=None, cache_dir=tmp_path / "cache")
        assert [d.tolist() for d in documents.tokens] == expected, source
        if field != "text":  # a .txt file is all text: it has no fields to name
            with pytest.raises(LongVAError, match="no 'body' .*--text-field"):
                list(ppl.open_source(str(tmp_path / source), "body", "test").texts())


def test_documents_are_tokenized_once_and_the_cache_follows_the_content(tokenizer, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": book(i, 5 + 5 * i)}) + "\n" for i in range(4)))
    cache = tmp_path / "cache"

    def documents(tokenizer, **selection):
        selection = {"min_doc_tokens": 0, "samples": None, **selection}
        return ppl.tokenized_documents(ppl.open_source(str(data), "text", "test"), tokenizer, cache_dir=cache, **selection)

    first = documents(tokenizer, min_doc_tokens=100, samples=2)
    assert len(first.tokens) == 2 and all(len(d) >= 100 for d in first.tokens) and len(list(cache.iterdir())) == 1

    class Refuses:  # the same tokenizer, but tokenizing again fails the test
        backend_tokenizer, eos_token_id = tokenizer.backend_tokenizer, tokenizer.eos_token_id

        def __call__(self, *args, **kwargs):
            pytest.fail("cached documents were tokenized again")

    again = documents(Refuses(), min_doc_tokens=100, samples=2)
    assert [d.tolist() for d in again.tokens] == [d.tolist() for d in first.tokens] and again.longest == first.longest

    data.write_text(data.read_text() + json.dumps({"text": book(9, 30)}) + "\n")
    assert len(documents(tokenizer).tokens) == 5 and len(list(cache.iterdir())) == 2


# ---- bad input -----------------------------------------------------------------------------------


def test_context_lengths_double_or_step_as_the_original():
    assert ppl.context_lengths(4096, 262144, None) == [4096 * 2**i for i in range(7)]
    assert ppl.context_lengths(32000, 512000, 32000) == list(range(32000, 512001, 32000))


@pytest.mark.parametrize(
    "changes, fragment",
    [
        (dict(max_tokens=16), "--max-tokens 16 is below --min-tokens 32"),
        (dict(stride=40), "--stride must be between 1 and the smallest context length 32"),
        (dict(samples=0), "--samples must be at least 1"),
        (dict(token_step=0), "--token-step must be a positive"),
        (dict(data="/no/such/books"), "--data /no/such/books does not exist"),
        (dict(min_tokens=1024, max_tokens=2048), "shorter than the smallest context length 1,024 (the longest has"),
        (dict(min_doc_tokens=5000), "no document of --data"),
        (dict(text_field="body", data="JSONL"), "has no 'body' field"),
        (dict(data="EMPTY"), "holds no documents"),
        (dict(kv_cache="fp8", sequence_parallel=2), "--kv-cache is for runs that keep a KV cache; --sequence-parallel runs each"),
        (dict(kv_cache="fp4"), "--kv-cache 'fp4' is not known; use auto, bf16, fp8."),
    ],
)
def test_bad_input_is_one_sentence_before_any_model_loads(models, books, tmp_path, monkeypatch, changes, fragment):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.jsonl").write_text("\n")
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "A short document."}) + "\n")
    paths = {"EMPTY": tmp_path / "empty", "JSONL": tmp_path / "docs.jsonl"}
    data = changes.pop("data", books)
    monkeypatch.setattr(ppl, "load_for_scoring", lambda *a: pytest.fail("a model was loaded despite bad input"))
    with pytest.raises(LongVAError, match=re.escape(fragment)):
        evaluate_perplexity(settings(models[:1], paths.get(data, data), tmp_path / "out", cache_dir=tmp_path / "cache", **changes))


def test_lengths_past_max_position_embeddings_warn_and_still_run(models, books, tmp_path):
    short = shutil.copytree(models[0], tmp_path / "short-context")
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 48}))
    warnings = []
    result = evaluate_perplexity(settings([short], books, tmp_path / "out", max_tokens=64, samples=2), on_warning=warnings.append)
    assert any("beyond its max_position_embeddings (48)" in w and "64" in w for w in warnings)
    assert [r["beyond_max_position_embeddings"] for r in result.records] == [False, True]


# ---- the command line ----------------------------------------------------------------------------


def readme_commands() -> list[list[str]]:
    """The `longva ...` commands of the README's perplexity section, as argument lists (comments dropped)."""
    import shlex

    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text.split("\n### Perplexity against context length\n", 1)[1], re.S).group(1)
    return [shlex.split(line, comments=True)[1:] for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_the_readme_commands_run_as_written(models, tmp_path, monkeypatch):
    """The issue's three commands, word for word: hub models and the hub dataset are tiny stand-ins."""
    import datasets
    from typer.testing import CliRunner

    from longva_cli import hub
    from longva_cli.cli import app

    commands = readme_commands()
    assert [command[:3] for command in commands] == [["eval", "ppl", "--model"]] * 2 + [["eval", "ppl", "plot"]]
    monkeypatch.chdir(tmp_path)
    shutil.copytree(models[0], "runs/extend-qwen2-7b-224k/step_1000")
    hub_models = {"Qwen/Qwen2-7B-Instruct": models[1], "lmms-lab/Qwen2-7B-Instrcuct-224K": models[0]}
    monkeypatch.setattr(hub, "cached", lambda name, revision=None, repo_type=None: hub_models.get(name))
    pg19 = {"emozilla/pg19-test": datasets.Dataset.from_dict({"text": [book(20, 120), book(21, 130)]})}
    monkeypatch.setattr(ppl, "load_hub_dataset", lambda name, split, *settings: pg19[name])
    Path("pg19").mkdir()
    for index in range(2):
        Path(f"pg19/{index}.txt").write_text(book(index, 240))  # about 9,500 tokens: 4K and 8K of the grid

    runner = CliRunner()
    doubling = runner.invoke(app, commands[0])
    assert doubling.exit_code == 0, doubling.output
    lines = Path("runs/ppl/ppl.csv").read_text().splitlines()
    assert lines[0] == ",4096,8192"  # 16K to 256K: no book is that long; they are named, then left out
    assert [line.split(",")[0] for line in lines[1:]] == ["runs/extend-qwen2-7b-224k/step_1000", "Qwen/Qwen2-7B-Instruct"]
    assert "perplexity against context length" in doubling.stdout and "Qwen/Qwen2-7B-Instruct" in doubling.stdout  # the table: the result
    assert "16,384" in doubling.stderr
    stepped = runner.invoke(app, commands[1])
    assert stepped.exit_code == 0, stepped.output
    assert Path("runs/ppl-pg19-test/ppl.csv").read_text().splitlines()[0] == ",4096"  # no --output: a folder of its own
    Path("runs/ppl/ppl.png").unlink()
    plotted = runner.invoke(app, commands[2])
    assert plotted.exit_code == 0, plotted.output
    assert Path("runs/ppl/ppl.png").is_file()


@pytest.mark.integration
def test_bad_input_on_the_command_line_is_one_line_without_a_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "longva_cli", "eval", "ppl", "--model", "m", "--data", str(tmp_path / "nothing")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: --data") and done.stdout == ""
