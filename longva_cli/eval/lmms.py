"""LongVA as an lmms-eval model (`--model longva_cli`), built on the same `LongVA` core as `ask`.

    lmms-eval --model longva_cli --model_args pretrained=lmms-lab/LongVA-7B,max_frames_num=32 --tasks videomme

What differs from lmms-eval's own `longva` model, each a cause of scores users could not
reproduce:
- the chat template is qwen_1_5 unless told otherwise (the harness defaulted to vicuna_v1);
- weights load in bfloat16 on GPUs (float16 overflows into `!!!!` answers) and a guard
  stops the run when answers turn degenerate;
- `loglikelihood` returns the summed log-probability of the continuation (the harness
  returned the mean loss, a positive number), with logits only at continuation positions;
- requests about the same video reuse its embeddings and the KV cache of their shared
  prefix (the engine's visual cache and prefix cache), so each option of a multiple-choice
  question costs only its own tokens.

This is the only module that imports lmms_eval; the entry point in pyproject.toml names
`longva_cli.eval:lmms_manifest`, which points lmms-eval's registry here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from longva_cli.defaults import FRAMES
from longva_cli.errors import LongVAError
from longva_cli.eval.answers import DegenerateGuard, degenerate_kind
from longva_cli.eval.local import DEFAULT_EVAL_MODEL
from longva_cli.engine.runs import write_json
from longva_cli.eval.report import run_info
from longva_cli.engine.answering import Request, answer
from longva_cli.engine.encoder import MediaSpec
from longva_cli.engine.objectives import Generate, SamplingSettings, TeacherForce, drive
from longva_cli.engine.runner import DEFAULT_PREFILL_CHUNK, PrefixCache
from longva_cli.engine.visual_cache import VisualCache
from longva_cli.model.prompt import DEFAULT_SYSTEM, Turn

log = logging.getLogger("longva.eval")

CONV_TEMPLATES = ("qwen_1_5",)
VISUAL_MEMORY_BYTES = 4 * 2**30
# Arguments of lmms-eval's own `longva` model that people copy from the original command
# lines; they change nothing here (one decoder, one pooling, one prompt path).
IGNORED_ARGS = {
    "model_name", "video_decode_backend", "token_strategy", "truncation", "truncate_context", "use_cache",
    "device_map", "max_batch_size", "mm_spatial_pool_stride", "mm_spatial_pool_mode", "customized_config",
}


class LongVALmms(lmms):
    """lmms-eval's interface over `LongVA`: one request at a time, one replica per process."""

    is_simple = True

    def __init__(
        self,
        pretrained: str = DEFAULT_EVAL_MODEL,
        max_frames_num: int = FRAMES,
        conv_template: str = "qwen_1_5",
        device: str | None = None,
        dtype: str = "auto",
        attn_implementation: str = "auto",
        batch_size: int | str = 1,
        revision: str | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        stop_on_degenerate: bool = True,
        degenerate_threshold: float = 0.3,
        degenerate_min_samples: int = 10,
        longva=None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        unknown = set(kwargs) - IGNORED_ARGS
        if unknown:
            raise LongVAError(
                f"unknown model_args {', '.join(sorted(unknown))}; longva_cli takes pretrained, max_frames_num, conv_template, "
                "device, dtype, attn_implementation, revision, prefill_chunk, stop_on_degenerate."
            )
        if kwargs:
            log.info("ignoring %s (lmms-eval `longva` settings with no effect here)", ", ".join(sorted(kwargs)))
        if conv_template not in CONV_TEMPLATES:
            raise LongVAError(f"conv_template {conv_template!r} is not supported; LongVA was trained with qwen_1_5.")
        if int(max_frames_num) < 1:
            raise LongVAError(f"max_frames_num must be at least 1, got {max_frames_num}.")
        if str(batch_size) not in ("1", "auto"):
            log.warning("batch_size %s: longva_cli answers one request at a time", batch_size)

        from accelerate import Accelerator

        self.accelerator = Accelerator()
        if self.accelerator.num_processes > 1:
            # Data parallel as lmms-eval expects: every rank holds its own replica and gets
            # its share of the requests from the evaluator.
            device = f"cuda:{self.accelerator.local_process_index}" if torch.cuda.is_available() else "cpu"
            self._rank = self.accelerator.process_index
            self._world_size = self.accelerator.num_processes
        if longva is None:
            from longva_cli.engine.loader import load

            longva = load(str(pretrained), device=device or "auto", dtype=dtype, attn=attn_implementation, revision=revision)
            self.model_path = longva.folder
        else:
            self.model_path = None
        self.longva = longva
        self.pretrained = str(pretrained)
        self.max_frames_num = int(max_frames_num)
        self.conv_template = conv_template
        self.prefill_chunk = int(prefill_chunk)
        self.stop_on_degenerate = stop_on_degenerate
        self.guard = DegenerateGuard(float(degenerate_threshold), int(degenerate_min_samples))
        self._warned: set[str] = set()
        # Consecutive requests are mostly about the same video (its questions, a question's
        # options): keep recent embeddings in memory and the KV cache of the shared prefix.
        self.visual_cache = VisualCache(memory_bytes=VISUAL_MEMORY_BYTES)
        self.runner = PrefixCache(longva.model.language_model, self.prefill_chunk)

    # ---- what lmms-eval reads -----------------------------------------------------------------

    @property
    def model(self):
        return self.longva.model

    @property
    def tokenizer(self):
        return self.longva.tokenizer

    @property
    def config(self):
        return self.longva.model.config

    @property
    def device(self) -> torch.device:
        return self.longva.model.device

    @property
    def batch_size(self) -> int:
        return 1

    # ---- building inputs -----------------------------------------------------------------------

    def media_of(self, request: Instance) -> list[MediaSpec]:
        """The request's images and videos."""
        _, _, doc_to_visual, doc_id, task, split = request.args
        items = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        media = []
        for item in (items or []):
            if item is None:
                continue
            if isinstance(item, str):
                media.append(MediaSpec(Path(item), self.max_frames_num))
            elif hasattr(item, "convert"):  # a PIL image
                media.append(MediaSpec(item.convert("RGB")))
            else:
                raise LongVAError(f"{task}: visual input of type {type(item).__name__} is not supported (images and videos only).")
        return media

    def answer(self, request: Instance, context: str, objective):
        """The qwen_1_5 prompt of `context` about the request's media (one `<image>` each, placed
        first unless the task placed them), run with `objective`; the engine's result."""
        asked = Request([Turn("user", context)], objective, self.media_of(request), DEFAULT_SYSTEM)
        return drive(answer(self.longva, asked, self.runner, self.visual_cache)).result

    def sampling(self, gen_kwargs: dict):
        """The task's generation kwargs as core settings; temperature 0 or do_sample false is greedy."""
        if int(gen_kwargs.get("num_beams", 1) or 1) > 1:
            self._warn_once("num_beams", "beam search is not supported; decoding with one beam")
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        if gen_kwargs.get("do_sample") is False:
            temperature = 0.0
        top_p = gen_kwargs.get("top_p")
        return SamplingSettings.defaults(
            self.longva.generation_config,
            max_new_tokens=int(gen_kwargs.get("max_new_tokens", 1024)),
            temperature=temperature,
            top_p=None if top_p is None or float(top_p) >= 1.0 else float(top_p),
            top_k=gen_kwargs.get("top_k"),
        )

    # ---- the three request types -----------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        from tqdm import tqdm

        answers = []
        for request in tqdm(requests, disable=self.rank != 0, desc="longva generate"):
            context, gen_kwargs = request.args[0], dict(request.args[1] or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            objective = Generate(self.sampling(gen_kwargs), should_stop=(lambda text: any(stop in text for stop in until)) if until else None)
            text = self.answer(request, context, objective).text
            for stop in until:  # generation ends once one appears; the answer ends before it
                text = text.split(stop, 1)[0]
            answers.append(text.strip())
            self.check_degenerate(answers[-1])
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """log P(continuation | context) by teacher forcing: logits only where continuation tokens are predicted."""
        from tqdm import tqdm

        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="longva loglikelihood"):
            context, target, _, doc_id, task, split = request.args
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            ids = self.tokenizer(continuation, add_special_tokens=False).input_ids
            if not ids:
                results.append((0.0, True))
                continue
            scored = self.answer(request, context, TeacherForce(ids))
            results.append((scored.logprob, scored.greedy))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("longva_cli does not support multi-round generation tasks.")

    # ---- the degenerate-output guard -------------------------------------------------------------

    def check_degenerate(self, text: str) -> None:
        self.guard.add(text, degenerate_kind(text, None, multiple_choice=False))
        if not self.guard.tripped:
            return
        if self.stop_on_degenerate:
            raise LongVAError(f"stopped: {self.guard.message()}; pass stop_on_degenerate=False to finish anyway.")
        self._warn_once("degenerate", self.guard.message())

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            from longva_cli.console import stderr

            stderr.print(f"[bold red]warning:[/bold red] {message}")


def run_lmms_eval(
    tasks: list[str],
    *,
    model: str = DEFAULT_EVAL_MODEL,
    frames: int = FRAMES,
    output: Path = Path("runs/eval"),
    limit: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    attn: str = "auto",
    conv_template: str = "qwen_1_5",
    revision: str | None = None,
    stop_on_degenerate: bool = True,
    include_path: Path | None = None,
    longva=None,
) -> dict | None:
    """lmms-eval's `simple_evaluate` with a `LongVALmms`; writes results.json and samples_<task>.jsonl.

    `include_path` adds a folder of your own task YAML files. Returns what results.json holds
    (None on ranks other than 0, which write nothing).
    """
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from longva_cli.eval import LMMS_MODEL_ID

    # Task prompts may differ per model name; use ours, as `lmms-eval --model longva_cli` does.
    task_manager = TaskManager("WARNING", include_path=str(include_path) if include_path else None, model_name=LMMS_MODEL_ID)
    unknown = [name for name in tasks if not task_manager.match_tasks([name])]
    if unknown:
        raise LongVAError(f"unknown lmms-eval task(s) {', '.join(unknown)}; `lmms-eval --tasks list` shows the names.")
    lm = LongVALmms(
        pretrained=model, max_frames_num=frames, conv_template=conv_template, device=device, dtype=dtype,
        attn_implementation=attn, revision=revision, stop_on_degenerate=stop_on_degenerate, longva=longva,
    )
    results = simple_evaluate(
        model=lm, tasks=tasks, limit=limit, batch_size=1, device=str(lm.device), log_samples=True,
        task_manager=task_manager, bootstrap_iters=0,
    )
    if results is None or lm.rank != 0:
        return None
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    for task, samples in (results.get("samples") or {}).items():
        path = output / f"samples_{task}.jsonl"
        path.write_text("".join(json.dumps(sample, ensure_ascii=False, default=str) + "\n" for sample in samples))
    record = {
        "results": results.get("results", {}),
        "n-samples": results.get("n-samples"),
        "degenerate": lm.guard.to_dict(),
        "run": run_info(
            model=model,
            model_path=lm.model_path,
            frames=frames,
            dtype=str(lm.longva.model.dtype).removeprefix("torch."),
            with_lmms_eval=True,
            tasks=tasks,
            limit=limit,
            conv_template=conv_template,
        ),
    }
    write_json(output / "results.json", record)
    return record
