"""`longva extend-text`: recipes, data, sequence parallelism, training, checkpoints, CLI.

Everything runs on CPU with a random 2-layer Qwen2 and the built-in tiny tokenizer. The
DeepSpeed comm op is JIT-built once into the repo's .torch_extensions/ and reused.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from longva_cli.errors import LongVAError
from longva_cli.recipes import RECIPES_DIR, load_recipe
from longva_cli.train.extend_text import ExtendTextRecipe, extend_text
from support import REPO

TINY = RECIPES_DIR / "extend-text" / "tiny-cpu.yaml"
BIG = RECIPES_DIR / "extend-text" / "qwen2-7b-224k.yaml"

CORPUS = (
    "The lighthouse keeper counts the ships that pass the rocky point each night. "
    "She writes the number in a blue notebook and sleeps when the sun comes up.\n"
)


def tiny_recipe(output_dir: Path, *overrides: str) -> ExtendTextRecipe:
    return load_recipe(ExtendTextRecipe, TINY, [f"train.output_dir={output_dir}", *overrides])


def losses(run_dir: Path) -> list[float]:
    from longva_cli.train.metrics import read_metrics

    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "lighthouse.txt"
    path.write_text(CORPUS * 40)
    return path


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, corpus):
    """A tiny model trained 8 steps on a small repeated corpus, saving at steps 4 and 8."""
    root = tmp_path_factory.mktemp("text-run")
    recipe = tiny_recipe(
        root / "run",
        f"data.source={corpus}",
        f"data.cache_dir={root / 'cache'}",
        "data.seq_len=64",
        "train.max_steps=8",
        "train.save_every=4",
        "train.micro_batch_size=2",
        "train.grad_accum=1",
        "model.rope_theta=5e8",
    )
    summary = extend_text(recipe)
    return root, recipe, summary


# ---------------------------------------------------------------- recipes


def test_224k_recipe_carries_the_original_numbers():
    r = load_recipe(ExtendTextRecipe, BIG)
    assert r.model.name_or_path == "Qwen/Qwen2-7B-Instruct" and r.model.init == "pretrained"
    assert r.data.seq_len == 224_000 and r.model.max_position_embeddings == 224_000
    assert r.model.rope_theta == 1e9
    assert r.optimizer.lr == 1e-5 and r.optimizer.schedule == "constant" and r.optimizer.warmup_ratio == 0
    assert r.optimizer.betas == [0.9, 0.95] and r.optimizer.weight_decay == 0.1
    assert r.train.max_steps == 1000 and r.train.micro_batch_size == 1 and r.train.grad_accum == 4
    assert r.train.precision == "bf16" and r.train.gradient_checkpointing is True
    assert r.train.save_every == 200 and r.train.seed == 2024
    assert r.parallel.zero_stage == 3 and r.parallel.offload_params and r.parallel.offload_optimizer
    assert r.parallel.sequence_parallel == 8
    assert r.data.source == "LongVa/slimpajama_Qwen2_tokenized_upsample_4096_chunk_256K"
    assert r.data.column == "input_ids"


def test_recipe_headers_say_how_to_launch():
    from longva_cli.recipes import header

    for path in (TINY, BIG):
        text = header(path)
        assert "longva_cli extend-text --recipe" in text or "longva extend-text --recipe" in text
        assert "=" in text.split("verride", 1)[1]  # an override example follows the word "override"


def test_both_training_commands_share_one_spelling_of_each_setting():
    from longva_cli.train import settings
    from longva_cli.train.align import AlignRecipe

    for section, shared in [("optimizer", settings.OptimizerSettings), ("train", settings.TrainSettings),
                            ("parallel", settings.ParallelSettings), ("logging", settings.LoggingSettings)]:
        for recipe in (ExtendTextRecipe(), AlignRecipe()):
            assert isinstance(getattr(recipe, section), shared)
    # each command keeps its own defaults for the shared sections, also when a recipe sets some keys
    r = load_recipe(ExtendTextRecipe, None, ["optimizer.lr=2e-5", "train.precision=auto"])
    assert (r.optimizer.lr, r.optimizer.betas, r.optimizer.weight_decay, r.optimizer.schedule) == (2e-5, [0.9, 0.95], 0.1, "constant")
    assert (r.train.max_steps, r.train.grad_accum, r.train.seed, r.train.precision) == (1000, 4, 2024, "auto")
    a = load_recipe(AlignRecipe, None, ["optimizer.lr=2e-5"])
    assert (a.optimizer.betas, a.optimizer.schedule, a.optimizer.warmup_ratio, a.train.micro_batch_size) == ([0.9, 0.999], "cosine", 0.03, 4)
    with pytest.raises(LongVAError, match="optimizer.warmup_steps is now optimizer.warmup_ratio"):
        load_recipe(ExtendTextRecipe, TINY, ["optimizer.warmup_steps=10"])


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=-1", "optimizer.lr must be a finite number above 0, got -1.0"),
    ("optimizer.lr=.nan", "optimizer.lr must be a finite number, got nan"),
    ("optimizer.betas=[0.9, 1.2]", "optimizer.betas[1] must be a finite number at least 0 and below 1"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay must be a finite number at least 0"),
    ("optimizer.eps=0", "optimizer.eps must be a finite number above 0"),
    ("optimizer.warmup_ratio=1.5", "optimizer.warmup_ratio must be a finite number at least 0 and below 1"),
    ("optimizer.grad_clip=.inf", "optimizer.grad_clip must be a finite number or null, got inf"),
    ("optimizer.grad_clip=-1", "optimizer.grad_clip must be a finite number above 0 or null"),
    ("model.rope_theta=-5", "model.rope_theta must be a finite number above 0 or null"),
])
def test_impossible_numbers_are_named_before_training(override, message):
    from longva_cli.train.extend_text import check

    with pytest.raises(LongVAError, match=re.escape(message)):
        check(load_recipe(ExtendTextRecipe, TINY, [override]))


def test_overrides_and_validation_errors():
    r = load_recipe(ExtendTextRecipe, BIG, ["train.max_steps=10", "model.rope_theta=5e8"])
    assert r.train.max_steps == 10 and r.model.rope_theta == 5e8
    with pytest.raises(LongVAError, match="unknown recipe key train.max_stepz"):
        load_recipe(ExtendTextRecipe, BIG, ["train.max_stepz=10"])
    with pytest.raises(LongVAError, match="train.max_steps must be a whole number"):
        load_recipe(ExtendTextRecipe, BIG, ["train.max_steps=ten"])
    with pytest.raises(LongVAError, match="parallel.backend must be one of"):
        load_recipe(ExtendTextRecipe, BIG, ["parallel.backend=magic"])


def test_layout_errors_explain_the_fix():
    from longva_cli.parallel.sequence_attention import check_layout

    with pytest.raises(LongVAError, match="use data.seq_len=999 or 1002"):
        check_layout(1000, 3, "ulysses", num_kv_heads=6)
    with pytest.raises(LongVAError, match=r"KV heads do not divide by 8.*\[1, 2, 4\]"):
        check_layout(224_000, 8, "ulysses", num_kv_heads=4)
    with pytest.raises(LongVAError, match="2 x 8 zigzag chunks"):
        check_layout(224_008, 8, "ring", num_kv_heads=4)
    check_layout(224_000, 8, "ring", num_kv_heads=4)
    check_layout(224_000, 4, "ulysses", num_kv_heads=4)


# ---------------------------------------------------------------- data and sharding


def test_shards_cover_the_sequence_with_global_positions():
    import torch

    from longva_cli.parallel.ranks import ParallelState
    from longva_cli.parallel.sequence_attention import shard, shard_indices

    for backend in ("ulysses", "ring"):
        index = torch.cat([shard_indices(32, 4, r, backend) for r in range(4)])
        assert sorted(index.tolist()) == list(range(32))
    assert shard_indices(16, 2, 0, "ring").tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    tokens = torch.arange(17).unsqueeze(0)
    inputs, labels, positions = shard(tokens, ParallelState(sp_degree=2, sp_rank=1))
    assert inputs.tolist() == [list(range(8, 16))] and labels.tolist() == [list(range(9, 17))]
    assert positions.tolist() == inputs.tolist()  # RoPE sees real positions, not 0..7


def test_join_places_a_process_without_a_launcher_in_a_world_of_one(monkeypatch):
    import torch

    from longva_cli.parallel.ranks import join

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    state = join()
    assert (state.rank, state.world_size, state.local_rank, state.is_main, state.created_process_group) == (0, 1, 0, True, False)
    state.barrier()  # nothing to wait for, and no process group was needed
    state.close()
    assert state.device("auto") == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert state.device("cpu") == "cpu"
    with pytest.raises(LongVAError, match="1 processes cannot be split into sequence-parallel groups of 2; .* --sequence-parallel"):
        join(2)


def test_pretokenized_dataset_rows_are_truncated_and_short_rows_skipped(tmp_path):
    import datasets

    from longva_cli.train.data import local_batch, open_rows

    folder = tmp_path / "tokens"
    datasets.Dataset.from_dict({"input_ids": [list(range(100, 140)), list(range(5)), list(range(200, 230))]}).save_to_disk(folder)
    rows = open_rows(str(folder), 21)
    assert len(rows) == 2 and rows.read(1, 0, 21).tolist() == list(range(200, 221))
    inputs, labels, positions = local_batch(rows, [0], [(10, 20)])
    assert inputs.tolist() == [list(range(110, 120))] and labels.tolist() == [list(range(111, 121))]
    assert positions.tolist() == [list(range(10, 20))]
    with pytest.raises(LongVAError, match="too short for one step"):
        open_rows(str(folder), 100)
    with pytest.raises(LongVAError, match="does not exist"):
        open_rows(str(tmp_path / "missing.jsonl"), 21)


def test_text_is_packed_once_into_a_cached_memmap(tmp_path):
    from longva_cli.model.tiny import build_tiny_tokenizer
    from longva_cli.train.data import open_rows

    tok = build_tiny_tokenizer()
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": CORPUS}) for _ in range(5)))
    rows = open_rows(str(tmp_path / "a.jsonl"), 33, tokenizer=tok, cache_dir=tmp_path / "cache")
    [cache] = list((tmp_path / "cache").glob("*.npy"))
    assert len(rows) >= 2 and isinstance(rows.array, np.memmap)
    expected = (tok(CORPUS, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]) * 5
    assert rows.read(1, 0, 33).tolist() == expected[33:66]
    stamp = cache.stat().st_mtime_ns
    open_rows(str(tmp_path / "a.jsonl"), 33, tokenizer=tok, cache_dir=tmp_path / "cache")
    assert cache.stat().st_mtime_ns == stamp  # reused, not rebuilt
    open_rows(str(tmp_path / "a.jsonl"), 17, tokenizer=tok, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2  # the row length is part of the key
    with pytest.raises(LongVAError, match="too short for one row"):
        open_rows(str(tmp_path / "a.jsonl"), 10_000, tokenizer=tok, cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------- loss and sequence parallelism


def _tiny_model(seed: int = 0, cuda: bool = False):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.cuda().to(torch.bfloat16) if cuda else model


def test_chunked_cross_entropy_matches_full_logits():
    import torch

    from longva_cli.train.loss import chunked_cross_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, 37, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 37))
    labels[0, :3] = -100
    total, count = chunked_cross_entropy(hidden, labels, head, chunk_size=8)
    reference = torch.nn.functional.cross_entropy(head(hidden).flatten(0, 1), labels.flatten(), reduction="sum")
    assert count == 71 and torch.allclose(total, reference, atol=1e-4)
    grad = torch.autograd.grad(total, [hidden, head.weight])
    expected = torch.autograd.grad(reference, [hidden, head.weight])
    for a, b in zip(grad, expected):
        assert torch.allclose(a, b, atol=1e-5)


def _sp_worker(rank: int, port: int, tokens, out_dir: str, backend: str = "ulysses") -> None:
    import torch
    import torch.distributed as dist

    from longva_cli.parallel import ranks, sequence_attention
    from longva_cli.train.loss import CausalLMLoss

    torch.set_num_threads(1)
    cuda = backend == "ring"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        state = ranks.init_distributed(sp_degree=2, backend=backend)
        model = _tiny_model(cuda=cuda)
        sequence_attention.enable(model, state)
        inputs, labels, positions = (t.to(model.device) for t in sequence_attention.shard(tokens, state))
        loss = CausalLMLoss(model, chunk_size=16)(inputs, labels, positions)
        loss.backward()
        # what DeepSpeed does over all ranks: average the loss and the gradients
        flat = torch.cat([loss.detach().reshape(1)] + [p.grad.reshape(-1) for p in model.parameters()]).float()
        dist.all_reduce(flat)
        if rank == 0:
            torch.save(flat.cpu() / 2, Path(out_dir) / "flat.pt")
    finally:
        dist.destroy_process_group()
    # Leave without C++ static teardown: gloo's threads sometimes abort a finished worker there.
    os._exit(0)


def _one_process_reference(tokens, cuda: bool = False):
    import torch

    from longva_cli.parallel import sequence_attention
    from longva_cli.parallel.ranks import ParallelState
    from longva_cli.train.loss import CausalLMLoss

    model = _tiny_model(cuda=cuda)
    sequence_attention.enable(model, ParallelState())  # one process: SDPA over the whole sequence
    n = tokens.shape[1] - 1
    tokens = tokens.to(model.device)
    loss = CausalLMLoss(model, chunk_size=16)(tokens[:, :-1], tokens[:, 1:], torch.arange(n, device=model.device).expand(2, -1))
    loss.backward()
    return torch.cat([loss.detach().reshape(1)] + [p.grad.reshape(-1) for p in model.parameters()]).float().cpu()


@pytest.mark.integration
def test_ulysses_two_processes_match_one_process(tmp_path):
    """Loss and every gradient agree to atol 1e-5, rtol 1e-4 (fp32; DeepSpeed Ulysses over gloo)."""
    import torch
    import torch.multiprocessing as mp

    from longva_cli.parallel.ranks import free_port

    tokens = torch.randint(0, 512, (2, 65), generator=torch.Generator().manual_seed(1))
    mp.spawn(_sp_worker, args=(free_port(), tokens, str(tmp_path)), nprocs=2, join=True)
    expected = _one_process_reference(tokens)
    got = torch.load(tmp_path / "flat.pt")
    assert torch.allclose(got[0], expected[0], atol=1e-5)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.integration
@pytest.mark.gpu
def test_zigzag_ring_on_two_gpus_matches_one_process(tmp_path):
    """Ring backend (ring-flash-attn, bf16): loss to 2e-2, gradients to 5e-2 of one-GPU SDPA."""
    import torch
    import torch.multiprocessing as mp

    pytest.importorskip("ring_flash_attn")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    from longva_cli.parallel.ranks import free_port

    tokens = torch.randint(0, 512, (2, 129), generator=torch.Generator().manual_seed(1))
    mp.spawn(_sp_worker, args=(free_port(), tokens, str(tmp_path), "ring"), nprocs=2, join=True)
    expected = _one_process_reference(tokens, cuda=True)
    got = torch.load(tmp_path / "flat.pt")
    assert torch.allclose(got[0], expected[0], atol=2e-2)
    assert torch.allclose(got, expected, atol=5e-2, rtol=5e-2)


@pytest.mark.integration
def test_torchrun_two_process_run_matches_one_process_run(tmp_path):
    """The whole stack (DeepSpeed ZeRO-3 + Ulysses over gloo): same loss curve to 1e-4."""
    overrides = ["train.max_steps=3", "train.save_every=3", "data.seq_len=64", "parallel.zero_stage=3"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_port()),
         "-m", "longva_cli", "extend-text", "--recipe", str(TINY), *overrides,
         f"train.output_dir={tmp_path / 'two'}", "parallel.sequence_parallel=2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one = extend_text(tiny_recipe(tmp_path / "one", *overrides))
    assert losses(tmp_path / "two") == pytest.approx(one["losses"], abs=1e-4)
    from longva_cli.train.metrics import read_metrics

    norms = [[r["grad_norm"] for r in read_metrics(tmp_path / run / "metrics.jsonl")] for run in ("one", "two")]
    assert norms[1] == pytest.approx(norms[0], rel=1e-3)


def _port() -> int:
    from longva_cli.parallel.ranks import free_port

    return free_port()


# ---------------------------------------------------------------- training runs


def test_tiny_run_learns_and_saves_loadable_checkpoints(text_run):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    root, recipe, summary = text_run
    run = recipe.train.output_dir
    curve = losses(run)
    assert len(curve) == 8 and summary["steps"] == 8
    assert curve[-1] < curve[0] - 1.0, curve  # a repeated corpus is quickly learned
    assert (run / "latest").read_text().strip() == "step_8"
    assert not list(run.glob(".tmp-*"))
    config = AutoConfig.from_pretrained(run / "step_8")
    assert config.rope_parameters["rope_theta"] == 5e8 and config.max_position_embeddings == 64
    model = AutoModelForCausalLM.from_pretrained(run / "step_8")
    inv_freq = model.model.rotary_emb.inv_freq
    assert torch.allclose(inv_freq[1], torch.tensor(5e8) ** (-2 / 16))  # head_dim 16
    tokenizer = AutoTokenizer.from_pretrained(run / "step_8")
    ids = tokenizer(CORPUS[:60], return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], 512)
    state = json.loads((run / "step_8" / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["tokens"] == 8 * 2 * 64


def test_resume_reproduces_the_uninterrupted_loss_curve(text_run, tmp_path):
    import shutil
    from dataclasses import replace

    root, recipe, _ = text_run
    run = tmp_path / "resumed"
    shutil.copytree(recipe.train.output_dir / "step_4", run / "step_4")
    shutil.copy(recipe.train.output_dir / "metrics.jsonl", run / "metrics.jsonl")
    recipe = replace(recipe, train=replace(recipe.train, output_dir=run))
    summary = extend_text(recipe, resume=run / "step_4")
    assert summary["steps_this_run"] == 4
    assert summary["losses"] == pytest.approx(losses(root / "run")[4:], abs=1e-6)
    # the records after step 4 were dropped before the resumed run wrote its own: one per step
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


@pytest.mark.integration
def test_rerun_into_a_finished_run_is_refused_and_changes_nothing(text_run):
    root, recipe, _ = text_run
    run = recipe.train.output_dir

    def snapshot() -> dict:
        return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(run.rglob("*"))}

    before = snapshot()
    done = _cli("--recipe", str(TINY), "--output", str(run), "train.max_steps=8", cwd=root)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"error: {run} already holds a run with checkpoints (up to step_8)")
    assert "--resume" in line and "--overwrite" in line
    assert snapshot() == before


def test_overwrite_removes_only_what_a_run_wrote(tmp_path):
    from longva_cli.train.loop import prepare_output

    for folder in ("step_2", "step_4", ".tmp-step_6", "tensorboard", "notes"):
        (tmp_path / folder).mkdir()
    for name in ("latest", "metrics.jsonl", "notes/keep.txt", "data.txt"):
        (tmp_path / name).write_text("x")
    with pytest.raises(LongVAError, match="give only one of them"):
        prepare_output(tmp_path, tmp_path, overwrite=True)
    prepare_output(tmp_path, tmp_path / "step_4", overwrite=False)  # resuming: nothing to refuse
    prepare_output(tmp_path, None, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt", "notes"]
    (tmp_path / "metrics.jsonl").write_text("x")  # a run killed before its first checkpoint
    with pytest.raises(LongVAError, match=r"holds an earlier run \(metrics.jsonl, no checkpoint\); start over with --overwrite"):
        prepare_output(tmp_path, None, overwrite=False)


def test_pretrained_local_model_continues_under_zero3(tmp_path):
    """init: pretrained from a local HF folder (as from the hub), loaded partitioned under ZeRO-3."""
    import torch
    from transformers import AutoModelForCausalLM

    from longva_cli.model.tiny import build_tiny_tokenizer, save_tiny_tokenizer

    base = tmp_path / "base"
    _tiny_model(seed=3).save_pretrained(base)
    save_tiny_tokenizer(build_tiny_tokenizer(), base)
    recipe = tiny_recipe(
        tmp_path / "run", "model.init=pretrained", f"model.name_or_path={base}", "model.tokenizer=null",
        "model.rope_theta=2e7", "parallel.zero_stage=3", "data.seq_len=64", "train.max_steps=2",
    )
    extend_text(recipe)
    before = AutoModelForCausalLM.from_pretrained(base)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "step_2")
    assert after.config.rope_parameters["rope_theta"] == 2e7 and before.config.rope_parameters["rope_theta"] == 1e6
    moved = [not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters())]
    assert all(moved)  # every tensor was trained and gathered back from its ZeRO-3 shards


def test_disk_full_keeps_latest_on_the_previous_checkpoint(tmp_path, monkeypatch):
    from longva_cli.train import checkpoint

    class Engine:
        def save_checkpoint(self, folder, tag, client_state, save_latest):
            Path(folder, tag).mkdir(parents=True)

    def save_model(folder, weights):
        (folder / "model.safetensors").write_bytes(b"x")

    kwargs = dict(client_state={}, save_model=save_model, state_dict=lambda: {}, trainer_state={})
    checkpoint.save(Engine(), tmp_path, 1, **kwargs)
    assert (tmp_path / "latest").read_text().strip() == "step_1"

    def full(folder, weights):
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / ".tmp-step_9").mkdir()  # a crashed save's partial checkpoint: the next save removes it
    with pytest.raises(LongVAError, match=r"writing checkpoint step_2 failed \(No space left on device\); the partial checkpoint was removed.*previous complete one"):
        checkpoint.save(Engine(), tmp_path, 2, **{**kwargs, "save_model": full})
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 10)
    with pytest.raises(LongVAError, match="not enough disk space"):
        checkpoint.save(Engine(), tmp_path, 3, **kwargs, needed_bytes=10**9)
    assert (tmp_path / "latest").read_text().strip() == "step_1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_1"]
    assert checkpoint.resolve(tmp_path) == tmp_path / "step_1"


# ---------------------------------------------------------------- CLI


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "longva_cli", "extend-text", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )


@pytest.mark.integration
def test_cli_trains_the_tiny_recipe_end_to_end(tmp_path):
    done = _cli("--recipe", str(TINY), "train.max_steps=2", "train.save_every=1", "data.seq_len=64", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Done:" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "runs/extend-tiny/latest").read_text().strip() == "step_2"
    assert (tmp_path / "runs/extend-tiny/step_1/config.json").exists()


@pytest.mark.integration
def test_cli_keeps_stdout_for_results_and_builds_deepspeed_ops_in_the_documented_cache(tmp_path, monkeypatch):
    """--output wins over the recipe; DeepSpeed's build lines stay off stdout; without
    TORCH_EXTENSIONS_DIR the comm op is taken from (or built into) <cache>/longva/torch_extensions."""
    import shutil

    from longva_cli.parallel import deepspeed_comm

    cache, home = tmp_path / "cache", tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    env.update(XDG_CACHE_HOME=str(cache), HOME=str(home), PYTHONPATH=str(REPO), COLUMNS="200")
    with monkeypatch.context() as m:
        m.delenv("TORCH_EXTENSIONS_DIR")
        m.setenv("XDG_CACHE_HOME", str(cache))
        folder = deepspeed_comm.extension_cache()
    assert folder.is_relative_to(cache / "longva" / "torch_extensions")
    built = REPO / ".torch_extensions" / deepspeed_comm.COMM_OP
    if built.is_dir():  # reuse the suite's build (mtimes kept, so it is not rebuilt)
        shutil.copytree(built, folder / deepspeed_comm.COMM_OP)
    done = subprocess.run(
        [sys.executable, "-m", "longva_cli", "extend-text", "--recipe", str(TINY), "train.max_steps=1", "data.seq_len=32",
         "--output", "mine"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "mine/step_1\n" and "built successfully" not in done.stderr  # stdout: the result, nothing of DeepSpeed's
    assert ("compiling DeepSpeed's CPU communication op, once" in done.stderr) == (not built.is_dir())
    assert (folder / deepspeed_comm.COMM_OP / f"{deepspeed_comm.COMM_OP}.so").is_file()
    assert not (home / ".cache" / "torch_extensions").exists()
    assert (tmp_path / "mine" / "latest").read_text().strip() == "step_1" and not (tmp_path / "runs").exists()


def test_first_start_says_it_compiles_the_comm_op(tmp_path, monkeypatch, capsys):
    from longva_cli.parallel import deepspeed_comm

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "empty"))
    assert deepspeed_comm.comm_op_needs_build()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    monkeypatch.setattr(deepspeed_comm, "comm_op_needs_build", lambda: True)  # no real rebuild in the test
    extend_text(tiny_recipe(tmp_path / "run", "train.max_steps=1", "data.seq_len=32"))
    out, err = capsys.readouterr()
    assert "compiling DeepSpeed's CPU communication op, once; ~1 min" in err
    assert out == ""  # DeepSpeed's "built successfully" and its log lines stay off stdout


@pytest.mark.integration
@pytest.mark.parametrize(
    "args, message",
    [
        (["train.max_stepz=3"], "unknown recipe key train.max_stepz"),
        (["optimizer.lr=-1"], "recipe key optimizer.lr must be a finite number above 0, got -1.0."),
        (["data.source=./no/such/corpus.txt"], "data source ./no/such/corpus.txt does not exist"),
        (["data.seq_len=255", "parallel.sequence_parallel=2"], "needs that many processes"),
    ],
)
def test_cli_bad_input_is_one_line_without_traceback(tmp_path, args, message):
    done = _cli("--recipe", str(TINY), *args, cwd=tmp_path)
    assert done.returncode == 1
    assert message in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
