"""One loader for every command: LongVA checkpoints and plain causal language models.

A model is named by a folder, a hub id (`org/name`) or a short name (`LongVA-7B-DPO`); the
folder is found (or downloaded) by `hub.locate_model`, then the device, dtype, attention and
quantisation are resolved once, here, the same way for every command.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from longva_cli.errors import LongVAError

DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise LongVAError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise LongVAError("CUDA was asked for but no GPU is visible to PyTorch; use --device cpu or check the driver.")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise LongVAError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) are visible.")
    elif resolved.type != "cpu":
        raise LongVAError(f"--device {device!r} is not supported; use auto, cpu, cuda or cuda:N.")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise LongVAError(f"--dtype {dtype!r} is not known; use auto, bfloat16, float16 or float32.")
    return DTYPES[dtype]


def resolve_attention(attn: str, device: torch.device) -> str:
    """The transformers implementation `--attn` asks for: attention kernel names
    (model/kernel_choice.py) run inside longva's mask-free SDPA, so they load as "sdpa"."""
    if attn not in ("auto", "sdpa", "eager", "flash_attention_2"):
        from longva_cli.model.kernel_choice import KernelChoice

        KernelChoice.parse(attn).check(device)
        return "sdpa"
    if attn == "auto":
        if device.type == "cuda":
            try:
                import flash_attn  # noqa: F401

                return "flash_attention_2"
            except ImportError:
                pass
        return "sdpa"
    if attn == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise LongVAError("flash-attention is not installed; `pip install longva[gpu]` on a CUDA machine, or use --attn sdpa.") from None
    return attn


QUANTIZE_BACKENDS = ("torchao", "bitsandbytes")


def quantization_config(quantize: str | None, dtype: torch.dtype, device: torch.device, backend: str = "torchao"):
    """Settings that quantise the language model's linear layers (torchao or bitsandbytes); the
    embeddings, the output layer, the tower and the projector stay in `dtype`."""
    if quantize is None:
        return None
    if quantize not in ("4bit", "8bit"):
        raise LongVAError(f"--quantize {quantize!r} is not known; use 4bit or 8bit.")
    if backend == "torchao":
        return torchao_config(quantize, dtype, device)
    if backend != "bitsandbytes":
        raise LongVAError(f"--quantize-backend {backend!r} is not known; use {' or '.join(QUANTIZE_BACKENDS)}.")
    if device.type != "cuda":
        raise LongVAError("bitsandbytes needs a CUDA GPU; on CPU use --quantize 8bit with --quantize-backend torchao, or drop --quantize.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LongVAError("--quantize-backend bitsandbytes needs bitsandbytes: `pip install bitsandbytes`.") from None
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")
    return BitsAndBytesConfig(load_in_8bit=True)


def torchao_config(quantize: str, dtype: torch.dtype, device: torch.device):
    """torchao weight-only quantisation: int4 in groups of 128 through the tinygemm kernels that
    ship inside PyTorch's CUDA build (no other kernel library), or int8 per output channel,
    which runs on CPU too."""
    if quantize == "4bit" and device.type != "cuda":
        raise LongVAError("torchao's 4-bit weights run on CUDA only (its int4 kernels are GPU kernels); on CPU use --quantize 8bit or drop --quantize.")
    if quantize == "4bit" and dtype != torch.bfloat16:
        raise LongVAError(f"torchao's 4-bit weights compute in bfloat16; drop --dtype {str(dtype).removeprefix('torch.')} or use --quantize 8bit.")
    try:
        import torchao.quantization as ao
    except ImportError:
        raise LongVAError("--quantize needs torchao: `pip install 'longva[quantize]'` (or --quantize-backend bitsandbytes on CUDA).") from None
    from transformers import TorchAoConfig

    if quantize == "4bit":
        scheme = ao.Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
    else:
        scheme = ao.Int8WeightOnlyConfig()
    return TorchAoConfig(scheme, modules_to_not_convert=["lm_head"])


def target_device(device: str, device_map: str | None) -> torch.device:
    """Where inputs go: the asked device, or (with a device map) the first GPU."""
    if device_map is None:
        return resolve_device(device)
    if device_map != "auto":
        raise LongVAError(f"--device-map {device_map!r} is not supported; use auto (split across the visible GPUs).")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fingerprint(folder: Path) -> str:
    """A checkpoint's identity for caches: its config and each weight file's name, size and time."""
    parts = [(folder / "config.json").read_text()]
    for file in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        stat = file.stat()
        parts.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


@dataclass
class TextModel:
    """A plain causal language model with its tokenizer (text NIAH, perplexity)."""

    language_model: torch.nn.Module
    tokenizer: object
    name: str
    folder: Path | None = None
    stop_ids: set[int] = field(default_factory=set)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        embedding = self.language_model.get_input_embeddings()
        return embedding(input_ids.to(embedding.weight.device))


def text_stop_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    return {i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id}


def load(
    name: str | Path,
    *,
    kind: str = "longva",
    device: str = "auto",
    dtype: str = "auto",
    attn: str = "auto",
    device_map: str | None = None,
    quantize: str | None = None,
    quantize_backend: str = "torchao",
    revision: str | None = None,
    download: bool = True,
    kv_cache: str = "auto",
):
    """A `LoadedLongVA` (kind "longva") or a `TextModel` (kind "causal-lm": any causal LM folder or hub
    id, and LongVA checkpoints too, whose language model is then used alone); its runners keep
    keys and values as `kv_cache` names (auto: the model's dtype, bf16, fp8; model/kv_cache.py)."""
    from longva_cli.hub import locate_model
    from longva_cli.model.attention import use_mask_free_attention
    from longva_cli.model.kernel_choice import KernelChoice
    from longva_cli.model.kv_cache import kv_storage, use_kv_cache

    started = time.perf_counter()
    target = target_device(device, device_map)
    torch_dtype = resolve_dtype(dtype, target)
    attention = resolve_attention(attn, target)
    quantization = quantization_config(quantize, torch_dtype, target, quantize_backend)
    kv_storage(kv_cache)  # a bad name fails before anything loads
    folder = locate_model(str(name), revision=revision, allow_download=download, kind=kind)
    if kind == "longva":
        model = load_longva_model(folder, str(name), torch_dtype, attention, target, device_map, quantization, started)
        language_model = model.model.language_model
    elif kind == "causal-lm":
        model = load_text_model(folder, str(name), torch_dtype, attention, target, device_map, quantization)
        language_model = model.language_model
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    # SDPA without flash-attn: chunks after a cached prefix attend without a dense mask, so
    # prefill keeps 4096-token chunks at any length, with the kernels --attn names or `auto`
    # measures (model/attention.py, model/kernel_choice.py).
    use_mask_free_attention(language_model, KernelChoice.parse(attn if attention == "sdpa" else "auto"))
    use_kv_cache(language_model, kv_cache)
    return model


def load_longva_model(folder: Path, name: str, dtype, attention, target, device_map, quantization, started: float):
    from longva_cli.model.checkpoint import load_longva, load_tokenizer
    from longva_cli.model.config import read_generation_config, vision_settings
    from longva_cli.model.longva import LoadedLongVA

    network = load_longva(
        folder, dtype=dtype, attn_implementation=attention, device=target, device_map=device_map, quantization_config=quantization
    )
    tokenizer = load_tokenizer(folder)
    _, processing = vision_settings(network.mm)
    return LoadedLongVA(
        network, tokenizer, processing, name, read_generation_config(folder), time.perf_counter() - started, folder=folder, fingerprint=fingerprint(folder)
    )


def load_text_model(folder: Path, name: str, dtype, attention, target, device_map, quantization) -> TextModel:
    """A causal LM; for a LongVA checkpoint, its language model alone (the tower is not loaded)."""
    from transformers import AutoModelForCausalLM

    from longva_cli.model.checkpoint import load_language_model, load_tokenizer, quiet_loading
    from longva_cli.model.config import read_config

    config = read_config(folder)
    tokenizer = load_tokenizer(folder)
    if config.get("model_type") == "llava_qwen":
        language_model = load_language_model(
            folder, dtype=dtype, attn_implementation=attention, device=target, device_map=device_map, quantization_config=quantization
        )
    else:
        with quiet_loading():
            language_model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, attn_implementation=attention, device_map=device_map if device_map is not None else target,
                quantization_config=quantization,
            )
    return TextModel(language_model.eval(), tokenizer, name, folder, text_stop_ids(tokenizer))
