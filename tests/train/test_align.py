"""`longva align`: data and labels, DPO loss, the three trainings, checkpoints, resume, CLI.

Everything runs on CPU with the tiny LongVA of `write_tiny_example` (the data behind
recipes/align/tiny-cpu.yaml) and a few steps per run; ZeRO-2 over gloo.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from longva_cli.errors import LongVAError
from longva_cli.model.prompt import Turn, chat_prompt
from longva_cli.recipes import RECIPES_DIR, header, load_recipe
from longva_cli.train.align import AlignRecipe, align, build_model
from longva_cli.train.multimodal_data import (
    IGNORE,
    MEDIA_TOKEN,
    Media,
    Record,
    conversation_tokens,
    length_grouped_batches,
    preference_tokens,
    read_records,
)
from support import REPO

ALIGN = RECIPES_DIR / "align"


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    from longva_cli.train.tiny_example import write_tiny_example

    return write_tiny_example(tmp_path_factory.mktemp("align") / "example")


@pytest.fixture(scope="module")
def tokenizer(example):
    from longva_cli.model.checkpoint import load_tokenizer

    return load_tokenizer(example / "model")


def tiny(example: Path, output_dir: Path, *overrides: str) -> AlignRecipe:
    return load_recipe(AlignRecipe, ALIGN / "tiny-cpu.yaml", [
        f"model.name_or_path={example / 'model'}",
        f"data.path={example / 'conversations.json'}",
        f"data.image_folder={example / 'images'}",
        f"data.video_folder={example / 'videos'}",
        f"train.output_dir={output_dir}",
        "data.frames=2",
        *overrides,
    ])


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from longva_cli.model.files import weight_map

    out = {}
    for name in sorted(set(weight_map(folder).values())):
        out.update(load_file(folder / name))
    return out


def part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


TOWER, PROJECTOR = "model.vision_tower.", "model.mm_projector."


def language(state):
    return {k: v for k, v in state.items() if not k.startswith((TOWER, PROJECTOR))}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- recipes


def test_recipes_carry_the_original_numbers():
    from longva_cli.model.config import parse_pinpoints

    s1 = load_recipe(AlignRecipe, ALIGN / "stage1-projector.yaml")
    assert s1.model.tunable_parts == "mm_mlp_adapter" and s1.data.template == "plain"
    assert s1.data.path.name == "blip_laion_cc_sbu_558k.json"
    assert (s1.optimizer.lr, s1.optimizer.schedule, s1.optimizer.warmup_ratio) == (1e-3, "cosine", 0.03)
    assert (s1.train.micro_batch_size, s1.train.epochs, s1.data.max_length, s1.train.precision) == (16, 1, 8192, "bf16")

    s2 = load_recipe(AlignRecipe, ALIGN / "stage2-full.yaml")
    assert s2.model.tunable_parts == "mm_vision_tower,mm_mlp_adapter,mm_language_model"
    assert (s2.optimizer.lr, s2.optimizer.mm_vision_tower_lr, s2.optimizer.schedule, s2.optimizer.warmup_ratio) == (1e-5, 2e-6, "cosine", 0.03)
    assert (s2.train.micro_batch_size, s2.train.epochs, s2.data.max_length) == (4, 1, 32768)
    assert s2.data.template == "qwen_1_5" and s2.train.gradient_checkpointing and s2.parallel.zero_stage == 3
    assert (s2.model.image_aspect_ratio, s2.model.mm_patch_merge_type) == ("anyres", "unires")
    grids = parse_pinpoints(s2.model.image_grid_pinpoints)
    assert len(grids) == 49 and max(w * h for w, h in grids) == (7 * 336) ** 2 and (336, 336) in grids
    assert s2.model.pretrain_mm_mlp_adapter == Path("runs/align-stage1") == s1.train.output_dir

    d = load_recipe(AlignRecipe, ALIGN / "dpo.yaml")
    assert d.train.mode == "dpo" and d.dpo.beta == 0.1 and d.optimizer.lr == 5e-7
    assert (d.optimizer.schedule, d.optimizer.warmup_ratio, d.train.epochs, d.train.grad_accum) == ("linear", 0.1, 3, 16)
    assert parse_pinpoints(d.model.image_grid_pinpoints) == ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    assert d.model.name_or_path == "lmms-lab/LongVA-7B"


@pytest.mark.parametrize("name", ["stage1-projector", "stage2-full", "dpo", "tiny-cpu"])
def test_recipe_headers_say_how_to_launch(name):
    text = header(ALIGN / f"{name}.yaml")
    assert f"--recipe align/{name}" in text
    assert "=" in text.split(f"--recipe align/{name}", 1)[1]  # an override example follows


def test_unknown_recipe_key_is_named():
    with pytest.raises(LongVAError, match="unknown recipe key train.learning_rate"):
        load_recipe(AlignRecipe, ALIGN / "tiny-cpu.yaml", ["train.learning_rate=1"])


# ---------------------------------------------------------------- tokens and labels


def test_qwen_labels_cover_only_the_assistant_replies(tokenizer):
    record = Record("r1", [Media("image", Path("x.png"))], turns=[
        Turn("user", "<image>\nWhat shape is it?"), Turn("assistant", "A square."),
        Turn("user", "What colour is it?"), Turn("assistant", "It is red."),
    ])
    ids, labels = conversation_tokens(tokenizer, record, "qwen_1_5", "You are a helpful assistant.")
    assert (ids == MEDIA_TOKEN).sum() == 1 and labels[ids == MEDIA_TOKEN].item() == IGNORE
    # the text is exactly the ChatML prompt of `ask`, tokenised piecewise around <image>
    text = chat_prompt(record.turns, "You are a helpful assistant.", add_generation_prompt=False)
    assert tokenizer.decode(ids[ids != MEDIA_TOKEN]) == text.replace("<image>", "")
    expected = tokenizer("A square.<|im_end|>", add_special_tokens=False).input_ids
    expected += tokenizer("It is red.<|im_end|>", add_special_tokens=False).input_ids
    assert labels[labels != IGNORE].tolist() == expected
    # the labelled positions are the assistant replies themselves
    assert torch.equal(ids[labels != IGNORE], labels[labels != IGNORE])
    first = tokenizer("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n", add_special_tokens=False).input_ids
    assert ids[: len(first)].tolist() == first and ids[len(first)].item() == MEDIA_TOKEN


def test_plain_template_is_image_caption_newline(tokenizer):
    record = Record("c1", [Media("image", Path("x.png"))], turns=[Turn("user", "<image>\nDescribe it."), Turn("assistant", "A red square.")])
    ids, labels = conversation_tokens(tokenizer, record, "plain", None)
    caption = tokenizer("A red square.\n", add_special_tokens=False).input_ids
    assert ids.tolist() == [MEDIA_TOKEN] + caption
    assert labels.tolist() == [IGNORE] + caption


def test_preference_pair_shares_the_prompt_and_labels_only_the_answer(tokenizer):
    record = Record("p1", [Media("video", Path("v.mp4"))], prompt="<image>\nWhat moves?", chosen="A square.", rejected="Nothing.")
    (ids_c, lab_c), (ids_r, lab_r) = preference_tokens(tokenizer, record, "You are a helpful assistant.")
    prompt_len = (lab_c == IGNORE).sum().item()
    assert torch.equal(ids_c[:prompt_len], ids_r[:prompt_len])
    assert lab_c[prompt_len:].tolist() == tokenizer("A square.<|im_end|>", add_special_tokens=False).input_ids
    assert lab_r[lab_r != IGNORE].tolist() == tokenizer("Nothing.<|im_end|>", add_special_tokens=False).input_ids


def test_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"id": "a", "conversations": []}\n\n{"id": "b", oops}\n')
    with pytest.raises(LongVAError, match="line 3 is not valid JSON"):
        read_records(path)


def test_length_grouped_batches_cover_each_sample_once_with_similar_lengths():
    lengths = [10, 500, 12, 490, 11, 505, 9, 480]
    batches = length_grouped_batches(lengths, 2, 1, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert all(abs(lengths[b[0]] - lengths[b[1]]) < 100 for b in batches)
    assert batches == length_grouped_batches(lengths, 2, 1, seed=0, epoch=0)  # deterministic: resume finds its place


# ---------------------------------------------------------------- DPO


def test_dpo_loss_matches_a_hand_computed_example():
    from longva_cli.train.dpo import dpo_loss

    # pair 1: margin 0.1 * ((-10 + 11) - (-12 + 11)) = 0.2 -> -log sigmoid(0.2) = log(1 + e^-0.2) = 0.598139
    # pair 2: margin 0.1 * ((-5 + 4) - (-3 + 4)) = -0.2 -> log(1 + e^0.2) = 0.798139
    loss, stats = dpo_loss(torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -3.0]),
                           torch.tensor([-11.0, -4.0]), torch.tensor([-11.0, -4.0]), beta=0.1)
    assert loss.item() == pytest.approx((0.5981388693 + 0.7981388693) / 2, abs=1e-6)
    assert stats["reward_accuracy"] == 0.5 and stats["reward_margin"] == pytest.approx(0.0, abs=1e-6)


def test_sequence_logps_sum_the_labelled_tokens():
    from longva_cli.train.dpo import sequence_logps

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(2, 5, 8)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, IGNORE], [IGNORE, 1, 2, 3, 10]])
    full = head(hidden).log_softmax(-1)
    expected = [full[0, 2, 3] + full[0, 3, 4], full[1, 1, 1] + full[1, 2, 2] + full[1, 3, 3] + full[1, 4, 10]]
    assert torch.allclose(sequence_logps(hidden, labels, head), torch.stack(expected), atol=1e-6)


def test_padded_batch_scores_each_sequence_as_alone(example, tmp_path):
    """Right padding with an attention mask: batching changes no sequence's log-probability."""
    from longva_cli.train.multimodal_data import (
        AlignDataset,
        AlignModule,
        collate,
        load_records,
    )

    recipe = tiny(example, tmp_path, "train.mode=dpo", f"data.path={example / 'preferences.jsonl'}")
    model, tokenizer, processing = build_model(recipe, torch.float32, "sdpa")
    records, _ = load_records(recipe.data.path, "preference", recipe.data.image_folder, recipe.data.video_folder)
    dataset = AlignDataset(records[3:5], tokenizer, mode="dpo", template="qwen_1_5", system=recipe.data.system,
                           processing=processing, pinpoints=model.mm.image_grid_pinpoints, frames=2, tokens_per_image=144)
    module = AlignModule(model.eval(), "dpo", 64, visual_in_graph=False)
    with torch.no_grad():
        together = module(collate([dataset[0], dataset[1]], 4096, 144))
        alone = torch.cat([module(collate([dataset[i]], 4096, 144)) for i in range(2)])
    assert torch.allclose(together, alone, atol=1e-4)


def test_each_trained_part_gets_its_learning_rate(example, tmp_path):
    from longva_cli.train.align import set_trainable

    model = build_model(tiny(example, tmp_path), torch.float32, "sdpa")[0]
    groups = set_trainable(model, ["mm_vision_tower", "mm_language_model"],
                           {"mm_vision_tower": 2e-6, "mm_mlp_adapter": 1e-3, "mm_language_model": 1e-5})
    assert {g["name"]: g["lr"] for g in groups} == {"mm_vision_tower": 2e-6, "mm_language_model": 1e-5}
    assert not any(p.requires_grad for p in model.mm_projector.parameters())
    assert all(p.requires_grad for p in model.vision_tower.parameters())


def test_stage1_can_start_from_a_text_model_and_a_clip_tower(tmp_path):
    from transformers import CLIPVisionModel, Qwen2ForCausalLM

    from longva_cli.model.tiny import (
        build_tiny_tokenizer,
        save_tiny_tokenizer,
        tiny_configs,
    )

    language, vision, _ = tiny_configs()
    Qwen2ForCausalLM(language).save_pretrained(tmp_path / "lm")
    save_tiny_tokenizer(build_tiny_tokenizer(), tmp_path / "lm")
    CLIPVisionModel(vision).save_pretrained(tmp_path / "clip")
    recipe = load_recipe(AlignRecipe, ALIGN / "stage1-projector.yaml", [
        f"model.language_model={tmp_path / 'lm'}", f"model.vision_tower={tmp_path / 'clip'}"])
    model, _, _ = build_model(recipe, torch.float32, "sdpa")
    lm = Qwen2ForCausalLM.from_pretrained(tmp_path / "lm")
    assert torch.equal(model.language_model.model.embed_tokens.weight, lm.model.embed_tokens.weight)
    assert model.mm.vision_tower == str(tmp_path / "clip") and model.mm.mm_hidden_size == 32
    assert model.mm.tunable_parts == "mm_mlp_adapter" and model.mm.tokenizer_model_max_length == 8192
    assert model.mm_projector[0].weight.shape == (64, 32)


# ---------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def stage1(example, tmp_path_factory):
    """Projector only, plain captions, fresh projector: 2 steps."""
    out = tmp_path_factory.mktemp("stage1") / "run"
    recipe = tiny(example, out, f"data.path={example / 'captions.json'}", "data.template=plain", "data.system=null",
                  "model.tunable_parts=mm_mlp_adapter", "model.fresh_projector=true", "train.max_steps=2", "train.save_every=2",
                  "optimizer.lr=1e-2")
    return out, align(recipe)


def test_stage1_trains_only_the_projector_and_writes_mm_projector_bin(example, stage1):
    out, summary = stage1
    before, after = weights(example / "model"), weights(out / "step_2")
    assert same(part(before, TOWER), part(after, TOWER)) and same(language(before), language(after))
    fresh = build_model(tiny(example, out, "model.fresh_projector=true"), torch.float32, "sdpa")[0]
    assert not torch.equal(fresh.mm_projector[0].weight, after[PROJECTOR + "0.weight"])  # it moved from its start
    projector = torch.load(out / "step_2" / "mm_projector.bin", weights_only=True)
    assert sorted(projector) == [PROJECTOR + k for k in ("0.bias", "0.weight", "2.bias", "2.weight")]
    assert json.loads((out / "step_2" / "config.json").read_text())["mm_tunable_parts"] == "mm_mlp_adapter"


def test_stage2_starts_from_the_stage1_projector(example, stage1, tmp_path):
    out, _ = stage1
    model = build_model(tiny(example, tmp_path, f"model.pretrain_mm_mlp_adapter={out}"), torch.float32, "sdpa")[0]
    saved = torch.load(out / "step_2" / "mm_projector.bin", weights_only=True)
    assert all(torch.equal(v, saved[PROJECTOR + k]) for k, v in model.mm_projector.state_dict().items())


@pytest.fixture(scope="module")
def stage2(example, tmp_path_factory):
    """Every part, two image samples, overfit for 6 steps, saving at 3 and 6."""
    root = tmp_path_factory.mktemp("stage2")
    records = json.loads((example / "conversations.json").read_text())
    (root / "two.json").write_text(json.dumps([r for r in records if r["id"] in ("img-0", "vid-0")]))
    recipe = tiny(example, root / "run", f"data.path={root / 'two.json'}", "train.max_steps=6", "train.save_every=3",
                  "optimizer.lr=3e-3", "optimizer.warmup_ratio=0")
    return root, recipe, align(recipe)


def test_stage2_loss_falls_and_every_part_trains(example, stage2):
    root, _, summary = stage2
    assert summary["losses"][-1] < summary["losses"][0] - 0.5
    before, after = weights(example / "model"), weights(root / "run" / "step_6")
    for select in (lambda s: part(s, TOWER), lambda s: part(s, PROJECTOR), language):
        assert not same(select(before), select(after))
    config = json.loads((root / "run" / "step_6" / "config.json").read_text())
    assert config["mm_tunable_parts"] == "mm_vision_tower,mm_mlp_adapter,mm_language_model"
    assert config["model_type"] == "llava_qwen" and config["mm_patch_merge_type"] == "unires"
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"samples_per_s", "tokens_per_s", "loss", "lr"} <= set(records[0])


def test_saved_checkpoint_reloads_with_the_same_logits(example, stage2):
    from longva_cli import LongVA

    root, _, summary = stage2
    loaded = LongVA.from_pretrained(str(root / "run" / "step_6"), device="cpu")
    trained = LongVA(summary["model"].eval(), loaded.tokenizer, loaded.processing)
    image = example / "images" / "red-on-blue.png"
    logits = []
    from longva_cli.engine import MediaSpec, build, drive, encode, prompt_parts

    for lv in (loaded, trained):
        with torch.no_grad():
            visual = drive(encode(lv, MediaSpec(image)))
            sequence = build(lv, prompt_parts(chat_prompt([Turn("user", "<image>\nWhat is in the image?")]), [visual]))
            logits.append(lv.model.language_model(inputs_embeds=sequence.embed(0, len(sequence))[None]).logits)
    assert torch.allclose(logits[0], logits[1], atol=1e-5)


def test_resume_continues_exactly(stage2, tmp_path):
    import shutil

    root, recipe, summary = stage2
    shutil.copytree(root / "run", tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "step_6")
    with open(tmp_path / "run" / "metrics.jsonl", "ab") as metrics:  # a bad disk's line and a kill's torn tail
        metrics.write(b"[1, 2]\n\xff\xfe{\"step\": 9")
    recipe = replace(recipe, train=replace(recipe.train, output_dir=tmp_path / "run"))
    resumed = align(recipe, resume=tmp_path / "run" / "step_3")
    assert resumed["steps_this_run"] == 3
    assert (tmp_path / "run" / "metrics.jsonl.damaged").read_bytes() == b"[1, 2]\n\xff\xfe{\"step\": 9\n"
    assert resumed["losses"] == pytest.approx(summary["losses"][3:], abs=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(weights(root / "run" / "step_6").values(),
                                                             weights(tmp_path / "run" / "step_6").values()))
    # the records of steps 4-6 of the first run were dropped before the resumed run wrote its own
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


class Planted:
    """A pickle that runs a shell command when loaded, as one planted in a shared run folder would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("target", ["engine/rng_rank0.pt", "engine/state/mp_rank_00_model_states.pt"])
def test_a_planted_pickle_in_a_resumed_run_is_refused_and_never_runs(stage2, tmp_path, target):
    import shutil

    root, recipe, _ = stage2
    shutil.copytree(root / "run", tmp_path / "run")
    marker = tmp_path / "code-ran"
    torch.save({"state": Planted(marker)}, tmp_path / "run" / "step_3" / target)
    recipe = replace(recipe, train=replace(recipe.train, output_dir=tmp_path / "run"))
    with pytest.raises(LongVAError, match=r"^refusing to resume from .*step_3: .* holds Python objects that would run code"):
        align(recipe, resume=tmp_path / "run" / "step_3")
    assert not marker.exists()


def test_a_truncated_checkpoint_file_is_one_sentence(stage2, tmp_path):
    import shutil

    root, recipe, _ = stage2
    shutil.copytree(root / "run", tmp_path / "run")
    rng = tmp_path / "run" / "step_3" / "engine" / "rng_rank0.pt"
    rng.write_bytes(rng.read_bytes()[:200])
    recipe = replace(recipe, train=replace(recipe.train, output_dir=tmp_path / "run"))
    with pytest.raises(LongVAError, match=r"rng_rank0.pt is damaged and cannot be read .*; resume from an earlier step_<N> folder"):
        align(recipe, resume=tmp_path / "run" / "step_3")


def test_rng_state_is_stored_without_pickled_objects(tmp_path):
    """What resume loads with weights_only=True: the RNG states round-trip exactly."""
    import random

    import numpy as np

    from longva_cli.train.checkpoint import _rng_state, _set_rng_state

    torch.save(_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.random(), np.random.rand(), torch.rand(1)  # move every generator on
    _set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_rng_state_saved_by_earlier_releases_still_resumes(tmp_path):
    """Earlier releases pickled numpy's legacy state tuple (a uint32 array): allowed, and restored."""
    import random

    import numpy as np

    from longva_cli.train.checkpoint import _set_rng_state, check_loadable, weights_only_loading

    (tmp_path / "engine").mkdir()
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}, tmp_path / "engine" / "rng_rank0.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    check_loadable(tmp_path)
    with weights_only_loading():
        _set_rng_state(torch.load(tmp_path / "engine" / "rng_rank0.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_a_latest_file_naming_a_path_out_of_the_run_is_refused(tmp_path):
    from longva_cli.train import checkpoint

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest").write_text("../../elsewhere\n")
    with pytest.raises(LongVAError, match=r"latest should name a step_<N> folder but holds '../../elsewhere'"):
        checkpoint.resolve(tmp_path / "run")


def test_dpo_starts_at_log2_and_moves_the_policy(example, tmp_path):
    out = tmp_path / "dpo"
    recipe = tiny(example, out, "train.mode=dpo", f"data.path={example / 'preferences.jsonl'}", "train.max_steps=2",
                  "train.save_every=2", "optimizer.lr=1e-3", "train.micro_batch_size=1")
    summary = align(recipe)
    assert summary["losses"][0] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference before the first update
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "reward_margin" in records[-1]
    assert not same(language(weights(example / "model")), language(weights(out / "step_2")))


def _two_process_worker(rank: int, port: int, recipe: AlignRecipe) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    align(recipe)
    # Leave without C++ static teardown: gloo's threads sometimes abort a finished worker there.
    os._exit(0)


@pytest.mark.integration
def test_two_processes_train_with_zero3_on_gloo(example, tmp_path):
    import torch.multiprocessing as mp

    from longva_cli.parallel.ranks import free_port

    recipe = tiny(example, tmp_path / "run", "train.max_steps=1", "train.micro_batch_size=1", "parallel.zero_stage=3")
    mp.spawn(_two_process_worker, args=(free_port(), recipe), nprocs=2, join=True)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["samples"] == 2  # one sample from each rank
    assert (tmp_path / "run" / "latest").read_text().strip() == "step_1"
    saved, start = weights(tmp_path / "run" / "step_1"), weights(example / "model")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in start.items()}  # ZeRO-3 shards gathered whole


# ---------------------------------------------------------------- CLI


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "longva_cli", "align", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.integration
def test_cli_skips_missing_and_undecodable_media_and_reports_them(example, tmp_path):
    import shutil

    from support.media import write_video

    shutil.copytree(example, tmp_path / "runs/align-tiny-example")  # what `longva align --make-tiny-example` writes
    example = tmp_path / "runs/align-tiny-example"
    (example / "videos" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    write_video(example / "videos" / "fine.mp4", frames=6)
    records = [
        {"id": "gone-1", "image": "no-such.png", "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "broken-1", "video": "broken.mp4", "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "fine-1", "video": "fine.mp4", "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello."}]},
    ]
    (example / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    done = _cli("--recipe", str(ALIGN / "tiny-cpu.yaml"), f"data.path={example / 'bad.jsonl'}", "train.max_steps=1",
                "train.micro_batch_size=2", "data.frames=2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "Done:" in done.stderr
    assert "gone-1" in done.stderr and "broken-1" in done.stderr and "Skipped 2 samples" in done.stderr
    skipped = [json.loads(line)["id"] for line in (tmp_path / "runs/align-tiny/skipped.jsonl").read_text().splitlines()]
    assert skipped == ["gone-1", "broken-1"]


@pytest.mark.integration
def test_trained_tiny_checkpoint_loads_from_any_working_directory(tmp_path, monkeypatch):
    """The README's flow (tiny example and recipe, relative paths), then the checkpoint by its
    absolute path from another folder: config.json must not name the tower relative to the first."""
    from longva_cli import LongVA

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    made = _cli("--make-tiny-example", "runs/align-tiny-example", cwd=work)
    assert made.returncode == 0, made.stderr
    done = _cli("--recipe", "align/tiny-cpu", "train.max_steps=1", "data.frames=2", "--output", "runs/one", cwd=work)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "runs/one/step_1\n" and (work / "runs/one/latest").read_text().strip() == "step_1"
    monkeypatch.chdir(elsewhere)
    longva = LongVA.from_pretrained(str(work / "runs/one/step_1"), device="cpu")
    from longva_cli.engine import MediaSpec, drive, encode

    visual = drive(encode(longva, MediaSpec(work / "runs/align-tiny-example/images/red-on-blue.png")))
    assert visual.embeds.shape[-1] == longva.model.config.hidden_size


@pytest.mark.integration
def test_cli_refuses_to_train_over_a_run_and_names_impossible_numbers(example, stage1, tmp_path):
    out, _ = stage1
    data = [f"data.path={example / 'conversations.json'}", f"data.image_folder={example / 'images'}",
            f"data.video_folder={example / 'videos'}"]
    done = _cli("--recipe", str(ALIGN / "tiny-cpu.yaml"), *data, "--output", str(out), cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {out} already holds a run with checkpoints (up to step_2)")
    for override, key in [("optimizer.mm_vision_tower_lr=-1e-5", "optimizer.mm_vision_tower_lr"),
                          ("optimizer.lr=.nan", "optimizer.lr"), ("dpo.beta=-0.1", "dpo.beta")]:
        done = _cli("--recipe", str(ALIGN / "tiny-cpu.yaml"), override, cwd=tmp_path)
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith(f"error: recipe key {key} must be a finite number")


@pytest.mark.integration
@pytest.mark.parametrize(
    "lines, overrides, message",
    [
        (['{"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}', '{"id": "b", '],
         [], "line 2 is not valid JSON"),
        (['{"id": "two-img", "image": "x.png", "conversations": [{"from": "human", "value": "<image><image>\\nhi"}, {"from": "gpt", "value": "yo"}]}'],
         [], "sample two-img has 2 <image> placeholder(s) for 1 media file(s)"),
        ([], ["train.max_stepz=3"], "unknown recipe key train.max_stepz"),
    ],
)
def test_cli_bad_input_is_one_line_without_traceback(tmp_path, lines, overrides, message):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    done = _cli("--recipe", str(ALIGN / "tiny-cpu.yaml"), f"data.path={data}", *overrides, cwd=tmp_path)
    assert done.returncode == 1
    assert message in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
