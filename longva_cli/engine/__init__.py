"""The inference engine: what `ask`, `chat`, `serve`, `eval` and `niah` share.

    model    = load("lmms-lab/LongVA-7B-DPO")                         # LongVA, or kind="causal-lm"
    visual   = drive(encode(model, MediaSpec(Path("movie.mp4"), frames=128), cache))
    sequence = build(model, ["<|im_start|>...user\\n", visual, "\\nWhat happens?<|im_end|>..."])
    result   = drive(run(model, PrefixCache(model.model.language_model), sequence, Generate(sampling)))

    # or all of it in one call: media and turns in, the prompt assembled one way for every command
    answered = drive(answer(model, Request([Turn("user", "What happens?")], Generate(sampling), [spec]), runner, cache))

- `load` (loader.py): LongVA checkpoints and plain causal LMs, by folder, hub id or short name.
- `encode` (encoder.py): media -> frames -> pixels -> 144 tokens per frame or crop; `VisualCache`
  (visual_cache.py) keeps the results in memory and on disk.
- `build` (sequence.py): text, token ids and visual tokens spliced into one keyed `Sequence`.
- `run` (objectives.py): an objective (`Generate`, `TeacherForce`) over a KV runner (runner.py:
  `PrefixCache` reuses the prefix consecutive sequences share; `RunnerPool` keeps several).
- `answer` (answering.py): encode, build, check and run a `Request`, the one way `Session`, serve,
  eval and the lmms-eval model assemble a prompt (V-NIAH splices its own sequences and calls `run`).
- `Session` (session.py): questions and chat turns about the same media.
- `RunStore` (runs.py): the resumable JSONL results folder of niah, eval and ppl.

Work comes back as generators of events (`Encoding`, `Prefilling`, `Token`, `Notice`) whose
return value is the result; `drive(generator, on_event)` runs one to the end. Stop iterating to
cancel: nothing more is computed.
"""

import importlib

# Public name -> the module that defines it, for users' `from longva_cli.engine import ...`; the
# package's own code imports the submodules directly, so readers and tools see every route.
# Loaded on first use: importing torch and transformers costs seconds, and light modules (runs,
# visual_cache) need neither.
_WHERE = {
    "Answered": "answering", "Built": "answering", "MediaError": "answering", "Request": "answering", "answer": "answering",
    "Encoding": "encoder", "MediaSpec": "encoder", "encode": "encoder", "media_pixels": "encoder",
    "TextModel": "loader", "load": "loader",
    "Generate": "objectives", "Generated": "objectives", "Prefilling": "objectives", "SamplingSettings": "objectives",
    "Scored": "objectives", "TeacherForce": "objectives", "Token": "objectives", "drive": "objectives", "run": "objectives",
    "DEFAULT_PREFILL_CHUNK": "runner", "Chunk": "runner", "KVRunner": "runner", "PrefixCache": "runner", "RunnerPool": "runner",
    "Sequence": "sequence", "Visual": "sequence", "build": "sequence", "prompt_parts": "sequence", "token_sequence": "sequence",
    "Answer": "session", "Notice": "objectives", "Session": "session",
    "RunStore": "runs",
    "VisualCache": "visual_cache", "default_cache_dir": "visual_cache",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(name)
    return getattr(importlib.import_module(f"longva_cli.engine.{_WHERE[name]}"), name)
