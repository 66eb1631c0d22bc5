"""Greedy answers from vLLM's offline `LLM` for LongVA requests, for tests/vllm_plugin/test_vllm.py.

    python tests/vllm_plugin/vllm_answers.py CHECKPOINT REQUESTS.json ANSWERS.json

A request is {"question", "max_tokens"} plus {"video", "frames"} or {"image"}; with "chat": true
it goes through `LLM.chat` as an OpenAI-style message (the video by `file://` URL, sampled by
the plugin's loader at vLLM's default frame count), else through `LLM.generate` with the
native prompt and frames decoded by `load_video`. An answer is {"prompt_token_ids",
"token_ids", "text"}. `LLM` starts engine processes, so it is built under `__main__`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def generate_prompt(request: dict) -> dict:
    """The native `qwen_1_5` prompt, and media decoded by the plugin's own loader."""
    from PIL import Image

    from longva_cli.model.prompt import question_prompt
    from longva_cli.vllm.video import load_video

    if "video" in request:
        frames, _ = load_video(request["video"], frames=request["frames"])
        media = {"video": frames}
    else:
        media = {"image": Image.open(request["image"]).convert("RGB")}
    return {"prompt": question_prompt(request["question"]), "multi_modal_data": media}


def chat_messages(request: dict) -> list[dict]:
    kind = "video" if "video" in request else "image"
    part = {"type": f"{kind}_url", f"{kind}_url": {"url": Path(request[kind]).as_uri()}}
    return [{"role": "user", "content": [part, {"type": "text", "text": request["question"]}]}]


def main(checkpoint: str, requests_path: str, answers_path: str) -> None:
    from vllm import LLM, SamplingParams

    requests = json.loads(Path(requests_path).read_text())
    media_folders = {str(Path(request.get("video") or request["image"]).parent) for request in requests}
    # float32 as the native engine on CPU; eager, since compiling costs more than these few tokens.
    llm = LLM(
        checkpoint, dtype="float32", max_model_len=8192, enforce_eager=True, seed=0,
        allowed_local_media_path=media_folders.pop() if len(media_folders) == 1 else None,
    )
    outputs = {}
    for chat in (False, True):
        chosen = [i for i, request in enumerate(requests) if request.get("chat", False) == chat]
        if not chosen:
            continue
        params = [SamplingParams(temperature=0, max_tokens=requests[i]["max_tokens"]) for i in chosen]
        if chat:
            results = llm.chat([chat_messages(requests[i]) for i in chosen], params)
        else:
            results = llm.generate([generate_prompt(requests[i]) for i in chosen], params)
        outputs.update(zip(chosen, results))
    answers = [
        {"prompt_token_ids": list(out.prompt_token_ids), "token_ids": list(out.outputs[0].token_ids), "text": out.outputs[0].text}
        for _, out in sorted(outputs.items())
    ]
    Path(answers_path).write_text(json.dumps(answers))


if __name__ == "__main__":
    main(*sys.argv[1:])
