"""Reading and writing checkpoints in the hub layout of `lmms-lab/LongVA-7B`.

One set of sharded safetensors holds all three parts under the original key names:

    model.embed_tokens / model.layers.{i}.* / model.norm / lm_head   Qwen2, as transformers names it
    model.mm_projector.{0,2}.{weight,bias}                            the projector
    model.vision_tower.vision_tower.vision_model.*                    CLIP's vision model

transformers loads the language model and the tower from those files itself (so sharding,
dtype, device maps and quantisation are its own, well-tested code); we only say which keys
belong to which part. Loading is strict: a missing key is an error, never a random weight.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import warnings
from pathlib import Path

import torch
from transformers import CLIPVisionModel, Qwen2ForCausalLM

from longva_cli.errors import LongVAError
from longva_cli.model.config import (
    MultimodalConfig,
    language_config,
    language_parameters,
    multimodal_config,
    projector_parameters,
    read_config,
    read_json,
    refetch_hint,
    vision_parameters,
    vision_settings,
)
from longva_cli.model.files import check_weight_files, weight_map
from longva_cli.model.modeling import LongVAForCausalLM, build_projector

TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."
PROJECTOR_PREFIX = "model.mm_projector."
# A config may describe this many times the numbers its weight files hold (a pre-quantized
# checkpoint packs two or more weights into one) before it is taken for a config of another model.
SIZE_MARGIN = 4


class _LanguageModel(Qwen2ForCausalLM):
    # The projector and tower share the files; they are loaded separately below.
    _keys_to_ignore_on_load_unexpected = [r"^model\.mm_projector\.", r"^model\.vision_tower\."]


class _VisionTower(CLIPVisionModel):
    # After the key mapping, everything still under model./lm_head belongs to the other parts.
    _keys_to_ignore_on_load_unexpected = [r"^model\.", r"^lm_head\."]


@contextlib.contextmanager
def quiet_loading():
    """Hold back transformers' own output while a checkpoint loads, and nothing else: its
    "Loading weights" bars (commands show one status line of their own), the `rope_scaling`
    FutureWarning that configs written by transformers 4 raise (`rope_scaling: null` or a
    `{"type": ...}` dict), and its note that a `llava_qwen` config is read by a plain config
    class (LongVA's design)."""
    from transformers.utils import logging as transformers_logging

    def no_weight_bars(factory, args, kwargs):
        if kwargs.get("desc") == "Loading weights":
            return transformers_logging.EmptyTqdm(*args, **kwargs)
        return previous_hook(factory, args, kwargs) if previous_hook else factory(*args, **kwargs)

    def not_llava_note(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("You are using a model of type `llava_qwen`")

    config_logger = logging.getLogger("transformers.configuration_utils")
    previous_hook = transformers_logging.set_tqdm_hook(no_weight_bars)
    config_logger.addFilter(not_llava_note)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`rope_scaling` is deprecated", category=FutureWarning)
            yield
    finally:
        config_logger.removeFilter(not_llava_note)
        transformers_logging.set_tqdm_hook(previous_hook)


# Tokenizer files that are JSON: checked first, so a damaged one is named rather than a parser's traceback.
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json")


def load_tokenizer(folder: Path):
    """The checkpoint's own tokenizer; a clear error when its files are missing (a known hub
    defect) or damaged."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").is_file():
        raise LongVAError(
            f"{folder} has no tokenizer files (tokenizer.json or vocab.json + merges.txt); copy them from Qwen/Qwen2-7B-Instruct into the folder."
        )
    for name in TOKENIZER_JSON:
        if (folder / name).is_file():
            read_json(folder / name, folder)
    try:
        with quiet_loading():
            return AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # noqa: BLE001 - the tokenizers library raises a bare Exception for a malformed file
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LongVAError(f"the tokenizer files in {folder} cannot be loaded ({detail}); {refetch_hint(folder)}.") from None


def _read_tensors(folder: Path, files: dict[str, str], prefix: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors = {}
    for name in sorted(set(files[k] for k in files if k.startswith(prefix))):
        with safe_open(Path(folder) / name, framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    tensors[key.removeprefix(prefix)] = f.get_tensor(key)
    return tensors


def check_described_size(part: str, folder: Path, described: int, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a config that describes far more parameters than the files hold for `part`
    (`num_hidden_layers: 100000`, `hidden_size: 2**40`) before anything is allocated."""
    stored = sum(math.prod(shape) for shape in shapes.values())
    if described > SIZE_MARGIN * stored + 10**6:
        raise LongVAError(
            f"{folder / 'config.json'} describes a {part} of {described:,} parameters, but the weight files hold {stored:,} "
            f"numbers for it: the config does not belong to these weights; correct it, or {refetch_hint(folder)}."
        )


def check_shapes(part: str, folder: Path, model_class, config, shapes: dict[str, tuple[int, ...]], prefix: str = "") -> None:
    """Every stored tensor of `part` has the shape the config gives it, compared with the model
    built on the meta device (no memory); transformers would say it after allocating, in a table."""
    with torch.device("meta"):
        expected = {name: tuple(tensor.shape) for name, tensor in model_class(copy.deepcopy(config)).state_dict().items()}
    for key, shape in shapes.items():
        wanted = expected.get(key.removeprefix(prefix))
        if wanted is not None and wanted != tuple(shape):
            raise LongVAError(
                f"{folder}: the {part} tensor {key} has shape {list(shape)} where config.json gives {list(wanted)}; {refetch_hint(folder)}."
            )


def _part(shapes: dict[str, tuple[int, ...]], prefix: str | None) -> dict[str, tuple[int, ...]]:
    """The tensors under `prefix`; with None, the language model's (under neither other prefix)."""
    if prefix is None:
        return {k: v for k, v in shapes.items() if not k.startswith((TOWER_PREFIX, PROJECTOR_PREFIX))}
    return {k: v for k, v in shapes.items() if k.startswith(prefix)}


def _strict(part: str, folder: Path, info: dict) -> None:
    if info["missing_keys"] or info["mismatched_keys"]:
        bad = sorted(info["missing_keys"]) or sorted(str(k) for k in info["mismatched_keys"])
        raise LongVAError(
            f"{folder} does not match the LongVA layout: the {part} weights lack or mis-shape {len(bad)} tensors (first: {bad[0]})."
        )


def load_language_model(
    folder: Path,
    *,
    dtype: torch.dtype,
    attn_implementation: str,
    device: torch.device | str = "cpu",
    device_map: str | dict | None = None,
    quantization_config=None,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> Qwen2ForCausalLM:
    """The Qwen2 language model of a LongVA checkpoint alone, strictly loaded (text NIAH and
    perplexity need no tower); `shapes` are the folder's tensor shapes when already read.
    The config is checked against the files' headers before anything is allocated."""
    folder = Path(folder)
    raw = read_config(folder)
    config = language_config(raw, folder / "config.json")
    shapes = check_weight_files(folder, weight_map(folder)) if shapes is None else shapes
    language = _part(shapes, None)
    check_described_size("language model", folder, language_parameters(config), language)
    if "quantization_config" not in raw:  # pre-quantized files store packed shapes
        check_shapes("language model", folder, _LanguageModel, config, language)
    with quiet_loading():
        language_model, info = _LanguageModel.from_pretrained(
            folder,
            config=config,
            dtype=dtype,
            attn_implementation=attn_implementation,
            device_map=device_map if device_map is not None else device,
            quantization_config=quantization_config,
            output_loading_info=True,
        )
    _strict("language model", folder, info)
    return language_model


def load_longva(folder: Path, *, dtype: torch.dtype, attn_implementation: str, **placement) -> LongVAForCausalLM:
    """The LongVA model in a checkpoint folder, strictly loaded, ready for inference. `placement`
    (device, device_map, quantization_config) is `load_language_model`'s: the tower and the
    projector go where the language model's embeddings are."""
    folder = Path(folder)
    raw = read_config(folder)
    mm = multimodal_config(raw, folder / "config.json")
    vision_config, _ = vision_settings(mm)
    files = weight_map(folder)
    shapes = check_weight_files(folder, files)
    language_model = load_language_model(folder, dtype=dtype, attn_implementation=attn_implementation, shapes=shapes, **placement)
    hidden_size = language_model.config.hidden_size
    check_described_size("projector", folder, projector_parameters(mm, hidden_size), _part(shapes, PROJECTOR_PREFIX))
    home = language_model.get_input_embeddings().weight.device

    # Flash-attention is for the long text sequence; the tower's 577-token images gain nothing.
    tower_attn = "sdpa" if attn_implementation == "flash_attention_2" else attn_implementation
    tower = _part(shapes, TOWER_PREFIX)
    if tower:
        check_described_size("vision tower", folder, vision_parameters(vision_config), tower)
        check_shapes("vision tower", folder, _VisionTower, vision_config, tower, prefix=TOWER_PREFIX)
        with quiet_loading():
            vision_tower, info = _VisionTower.from_pretrained(
                folder,
                config=vision_config,
                key_mapping={"^" + TOWER_PREFIX.replace(".", r"\."): ""},
                dtype=dtype,
                attn_implementation=tower_attn,
                device_map=home,
                output_loading_info=True,
            )
        _strict("vision tower", folder, info)
    else:
        # A checkpoint that froze its tower may leave it out: take it from mm_vision_tower.
        vision_tower = _load_separate_tower(mm, dtype, tower_attn, home)

    projector = build_projector(mm, hidden_size)
    state = _read_tensors(folder, files, PROJECTOR_PREFIX)
    try:
        projector.load_state_dict(state, strict=True)
    except RuntimeError:
        raise LongVAError(
            f"{folder} does not match the LongVA layout: the projector weights ({PROJECTOR_PREFIX}*) are missing or mis-shaped."
        ) from None
    projector.to(device=home, dtype=dtype)

    model = LongVAForCausalLM(language_model, vision_tower, projector, mm)
    return model.eval()


def _load_separate_tower(mm: MultimodalConfig, dtype, attn_implementation, device) -> CLIPVisionModel:
    from huggingface_hub import snapshot_download

    source = Path(mm.vision_tower).expanduser()
    if not source.is_dir():
        try:
            source = Path(snapshot_download(mm.vision_tower, local_files_only=True))
        except Exception:  # noqa: BLE001
            raise LongVAError(
                f"the checkpoint has no vision tower weights and {mm.vision_tower} is not downloaded; run `longva download {mm.vision_tower}`."
            ) from None
    with quiet_loading():
        return CLIPVisionModel.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation, device_map=device)


def build_longva(language_config_, vision_config, mm: MultimodalConfig, attn_implementation: str = "sdpa") -> LongVAForCausalLM:
    """A randomly initialised LongVA from configs (for tiny test models and fresh training)."""
    import copy

    language_model = Qwen2ForCausalLM._from_config(copy.deepcopy(language_config_), attn_implementation=attn_implementation)
    vision_tower = CLIPVisionModel._from_config(copy.deepcopy(vision_config), attn_implementation=attn_implementation)
    projector = build_projector(mm, language_config_.hidden_size)
    return LongVAForCausalLM(language_model, vision_tower, projector, mm)


def hub_config_fields(mm: MultimodalConfig) -> dict:
    """The `mm_*` fields of config.json, named as the original writes them."""
    return {
        "mm_vision_tower": mm.vision_tower,
        "mm_hidden_size": mm.mm_hidden_size,
        "mm_projector_type": mm.projector_type,
        "mm_vision_select_layer": mm.select_layer,
        "mm_vision_select_feature": mm.select_feature,
        "mm_patch_merge_type": mm.patch_merge_type,
        "image_aspect_ratio": mm.image_aspect_ratio,
        "image_grid_pinpoints": [list(p) for p in mm.image_grid_pinpoints],
        "mm_spatial_pool_stride": mm.pool_stride,
        "mm_spatial_pool_mode": mm.pool_mode,
        "mm_tunable_parts": mm.tunable_parts,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "tokenizer_model_max_length": mm.tokenizer_model_max_length,
        "tokenizer_padding_side": "right",
        **mm.extra,
    }


def hub_state_dict(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`LongVAForCausalLM.state_dict()` names (`language_model.*`, `mm_projector.*`,
    `vision_tower.*`) -> the original key names. A training engine's extra `model.` prefix is
    accepted, so gathered ZeRO-3 weights map too."""
    state = {}
    for name, tensor in weights.items():
        name = name.removeprefix("model.")
        if name.startswith("language_model."):
            state[name.removeprefix("language_model.")] = tensor
        elif name.startswith("mm_projector."):
            state[PROJECTOR_PREFIX + name.removeprefix("mm_projector.")] = tensor
        elif name.startswith("vision_tower."):
            state[TOWER_PREFIX + name.removeprefix("vision_tower.").removeprefix("vision_model.")] = tensor
        else:
            raise ValueError(f"weight {name} belongs to no LongVA part")
    return state


def save_longva(
    model: LongVAForCausalLM,
    tokenizer,
    folder: Path,
    max_shard_size: str | int = "5GB",
    weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a checkpoint that `load_longva` and the original LLaVA-NeXT code both load.

    `weights` (module names, e.g. gathered from a ZeRO-3 engine) replace `model.state_dict()`;
    `model` then only supplies the configs.
    """
    from huggingface_hub import save_torch_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = model.state_dict() if weights is None else weights
    # clone: views into one flat buffer (as engines keep them) would be saved whole
    state = {k: v.detach().cpu().clone().contiguous() for k, v in hub_state_dict(weights).items()}
    save_torch_state_dict(state, folder, max_shard_size=max_shard_size)
    config = model.language_model.config.to_dict()
    config.update(hub_config_fields(model.mm))
    config.update(model_type="llava_qwen", architectures=["LlavaQwenForCausalLM"])
    config.pop("_name_or_path", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
