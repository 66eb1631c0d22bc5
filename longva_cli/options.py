"""Command-line options that several commands share, declared once so they read the same everywhere.

One option: `revision: Revision = None` in a Typer command's signature. A parameter group (a
dataclass of options with their defaults, such as `Loading`): `loading: Loading` in the signature
of a command wrapped in `composed`, which spells the group's options out in that place and hands
the command one `Loading`.
"""

import copy
import dataclasses
import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional, get_args, get_type_hints

import typer

from longva_cli.defaults import FRAMES, MAX_NEW_TOKENS, TEMPERATURE

Device = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda or cuda:N (under torchrun each rank takes its own GPU).")]
Dtype = Annotated[Optional[str], typer.Option("--dtype", help="auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16 or float32.")]
Attention = Annotated[
    Optional[str],
    typer.Option("--attn", help="auto (flash-attention-2 when installed on CUDA, else the measured fastest SDPA kernels), sdpa, eager, "
                 "flash_attention_2, or kernels by name: cudnn, flash, efficient, flex, cpu-flash, math, or PREFILL/DECODE "
                 "such as cudnn/gemm (README, 'Long videos')."),
]
KVCache = Annotated[
    Optional[str],
    typer.Option("--kv-cache", help="How keys and values are stored: auto (the model's dtype), bf16, or fp8 (float8 e4m3 with a scale "
                 "per token and KV head: about half the memory of bf16; README, 'Long videos')."),
]
DeviceMap = Annotated[Optional[str], typer.Option("--device-map", help="'auto' splits the model across all visible GPUs.")]
Quantize = Annotated[
    Optional[str], typer.Option("--quantize", help="4bit or 8bit language-model weights (torchao; 4bit needs CUDA).")
]
QuantizeBackend = Annotated[
    str, typer.Option("--quantize-backend", help="torchao (default) or bitsandbytes (CUDA only) for --quantize.")
]
MemoryBudget = Annotated[
    Optional[str],
    typer.Option(
        "--memory-budget",
        help="Device memory the run may use, e.g. 24GiB, 24GB or 24000MiB [default: the device's free memory]; "
        "the cheapest settings that fit are chosen before loading.",
    ),
]
Revision = Annotated[Optional[str], typer.Option("--revision", help="Hub revision (branch, tag or commit) of the model.")]
PrefillChunk = Annotated[
    Optional[int], typer.Option("--prefill-chunk", help="Tokens per prefill step (smaller uses less memory).")
]
CacheDir = Annotated[
    Optional[Path],
    typer.Option("--cache-dir", help="Where visual embeddings are cached (by the media's content) [default: ~/.cache/longva/visual]."),
]
NoCache = Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the visual-embedding cache.")]

# `ask` and `chat`: the model, how the media is sampled, how answers are sampled
Model = Annotated[str, typer.Option("--model", "-m", help="Checkpoint folder, hub id or short name.")]
Frames = Annotated[Optional[int], typer.Option("--frames", "-n", help=f"Frames sampled uniformly from the video, 144 tokens each. [default: {FRAMES}]")]
Fps = Annotated[
    Optional[float],
    typer.Option("--fps", help="Sample this many frames per second instead; with --frames as a cap, the capped frames are spread over the whole video."),
]
MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", help="Most tokens to generate per answer.")]
Temperature = Annotated[float, typer.Option("--temperature", "-t", help="Sampling temperature; 0 = greedy (the original demo used 0.5).")]
TopP = Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling threshold (off by default, as in the original).")]
TopK = Annotated[Optional[int], typer.Option("--top-k", help="Top-k sampling (default: the checkpoint's generation config, else 50).")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed for sampling (each answer starts from it).")]
System = Annotated[Optional[str], typer.Option("--system", help="System prompt (default: 'You are a helpful assistant.'; '' for none).")]


# Parameter groups: each option with its default, in the order the help pages list them.
@dataclass
class Loading:
    """How the model is loaded and run; each field is the `engine.loader.load` keyword of its name."""

    device: Device = "auto"
    dtype: Dtype = "auto"
    attn: Attention = "auto"
    kv_cache: KVCache = "auto"
    device_map: DeviceMap = None
    quantize: Quantize = None
    quantize_backend: QuantizeBackend = "torchao"


@dataclass
class MediaSampling:
    """Which frames of a video are encoded (None and None: FRAMES uniform frames)."""

    frames: Frames = None
    fps: Fps = None


@dataclass
class Sampling:
    """How answers are sampled."""

    max_new_tokens: MaxNewTokens = MAX_NEW_TOKENS
    temperature: Temperature = TEMPERATURE
    top_p: TopP = None
    top_k: TopK = None
    seed: Seed = 0
    system: System = None


@dataclass
class EmbeddingCache:
    """Where the visual embeddings are kept between runs."""

    cache_dir: CacheDir = None
    no_cache: NoCache = False


def composed(command):
    """`command` as Typer reads it: each parameter typed with a parameter group is spelled out as
    the group's options, in its place; the command gets one instance of each group.

    Typer reads a command's options from its signature, so the wrapper shows the spelled-out one.
    """
    signature = inspect.signature(command, eval_str=True)
    groups = {name: p.annotation for name, p in signature.parameters.items() if dataclasses.is_dataclass(p.annotation)}
    parameters = []
    for parameter in signature.parameters.values():
        if parameter.name not in groups:
            parameters.append(parameter)
            continue
        types = get_type_hints(parameter.annotation, include_extras=True)
        parameters += [
            inspect.Parameter(field.name, parameter.kind, default=field.default, annotation=types[field.name])
            for field in dataclasses.fields(parameter.annotation)
        ]

    @functools.wraps(command)
    def run(**flags):
        for name, group in groups.items():
            flags[name] = group(**{field.name: flags.pop(field.name) for field in dataclasses.fields(group)})
        return command(**flags)

    run.__signature__ = signature.replace(parameters=parameters)
    return run


# Commands whose result is a table print it on stdout; this prints it as JSON there instead.
Json = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout instead of a table.")]


def default_shown(option, default) -> object:
    """`option` with `[default: …]` added to its help, for commands whose options default to None
    so that a flag given can be told from a default (`niah`, where a recipe comes between)."""
    kind, info = get_args(option)
    shown = copy.copy(info)
    shown.help = f"{info.help} [default: {default}]"
    return Annotated[kind, shown]

# Training commands (and `recipes validate`) take recipe overrides after their options.
Overrides = Annotated[
    Optional[list[str]],
    typer.Argument(metavar="KEY=VALUE", help="Recipe overrides: dotted keys, YAML values (train.max_steps=10 optimizer.betas=[0.9,0.95])."),
]
