"""Reading a LongVA `config.json` (`model_type: llava_qwen`) into the three parts it describes.

The hub config is Qwen2's config with LLaVA's `mm_*` fields added. The CLIP tower's own
config and image-processor settings are not in it: the original fetched them from the hub id
in `mm_vision_tower`. We read them from there when that folder is at hand, and otherwise use
the built-in values of `openai/clip-vit-large-patch14-336`, so a checkpoint folder alone
suffices offline.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from longva_cli.errors import LongVAError

CLIP_L_336 = "openai/clip-vit-large-patch14-336"

# openai/clip-vit-large-patch14-336, vision half of its config.json.
CLIP_L_336_VISION = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    num_channels=3,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
)


@dataclass(frozen=True)
class ImageProcessing:
    """CLIP's preprocessing: shortest edge -> `resize`, centre crop `crop`, then normalise."""

    resize: int = 336
    crop: int = 336
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @property
    def mean_color(self) -> tuple[int, int, int]:
        """The pad colour of `expand2square`: the mean as 0-255 ints, (122, 116, 104) for CLIP."""
        return tuple(int(m * 255) for m in self.mean)


@dataclass(frozen=True)
class MultimodalConfig:
    """The `mm_*` fields of a LongVA config that the inference path uses."""

    vision_tower: str = CLIP_L_336
    mm_hidden_size: int = 1024
    projector_type: str = "mlp2x_gelu"
    select_layer: int = -2
    select_feature: str = "patch"
    patch_merge_type: str = "unires"
    image_aspect_ratio: str = "anyres"
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    pool_stride: int = 2
    pool_mode: str = "average"
    tokenizer_model_max_length: int | None = None
    tunable_parts: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def projector_depth(self) -> int:
        if self.projector_type == "linear":
            return 1
        match = re.fullmatch(r"mlp(\d+)x_gelu", self.projector_type)
        if not match:
            raise LongVAError(
                f"projector type {self.projector_type!r} is not supported; LongVA uses mlp2x_gelu (linear and mlpNx_gelu also load)."
            )
        return int(match.group(1))


def parse_pinpoints(value, patch: int = 336) -> tuple[tuple[int, int], ...]:
    """`[[w, h], ...]`, or LLaVA-NeXT's range string "(1x1),...,(6x6)" expanded to pixel sizes."""
    if isinstance(value, str):
        grids = re.findall(r"\((\d+)x(\d+)\)", value)
        if len(grids) != 2:
            raise LongVAError(f"image_grid_pinpoints {value!r} is neither a list of sizes nor a range like (1x1),...,(6x6).")
        (w0, h0), (w1, h1) = [(int(a), int(b)) for a, b in grids]
        return tuple((i * patch, j * patch) for i in range(w0, w1 + 1) for j in range(h0, h1 + 1))
    return tuple((int(w), int(h)) for w, h in value)


def refetch_hint(folder: Path) -> str:
    """What to do about a damaged file in a checkpoint `folder`, as the end of a sentence."""
    folder = Path(folder)
    # The hub cache keeps each repo under models--{org}--{name}/snapshots/{revision}.
    repo_folder = folder.parent.parent.name if folder.parent.name == "snapshots" else ""
    if repo_folder.startswith("models--"):
        repo = repo_folder.removeprefix("models--").replace("--", "/")
        return f"delete the damaged file (the link's target in the hub cache) and run `longva download {repo}`, which fetches only what is missing"
    if (folder / ".cache" / "huggingface").is_dir():  # downloaded with --local-dir
        return f"delete the damaged file and run `longva download <hub id> --local-dir {folder}`, which fetches only what is missing"
    return "copy the checkpoint again, or download it again with `longva download <hub id>` (it fetches only what is missing)"


# The largest JSON file a checkpoint holds is its tokenizer.json (7 MB for Qwen2, about 33 MB for
# the largest vocabularies); a file far beyond that is not one, and parsing it costs gigabytes.
MAX_JSON_BYTES = 64 * 2**20


def read_json(path: Path, folder: Path | None = None) -> dict:
    """A JSON object from a checkpoint file; a LongVAError naming the file when it is not one."""
    path = Path(path)
    hint = refetch_hint(folder if folder is not None else path.parent)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise LongVAError(f"{path} is {size:,} bytes, far more than a checkpoint's JSON file holds ({MAX_JSON_BYTES:,} at most); {hint}.")
        value = json.loads(path.read_bytes())
    except json.JSONDecodeError as err:
        raise LongVAError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); {hint}.") from None
    except UnicodeDecodeError:
        raise LongVAError(f"{path} is not JSON text (it holds binary data); {hint}.") from None
    except OSError as err:
        raise LongVAError(f"{path} cannot be read ({err.strerror or err}); check its permissions, or {hint}.") from None
    if not isinstance(value, dict):
        raise LongVAError(f"{path} holds a JSON {type(value).__name__}, not the object of settings it should; {hint}.")
    return value


# generation_config.json fields that sampling uses, and the numbers each may hold
GENERATION_NUMBERS = {"top_k": dict(integer=True, at_least=0), "repetition_penalty": dict(above=0)}


def read_generation_config(folder: Path) -> dict:
    """A checkpoint's generation_config.json ({} when it has none), with the fields sampling uses
    checked: a LongVAError naming the field, not a failure at the first token."""
    from longva_cli.checks import check_number

    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    config = read_json(path, folder)
    for key, bounds in GENERATION_NUMBERS.items():
        try:
            check_number(f"{path}: field {key!r}", config.get(key), nullable=True, **bounds)
        except LongVAError as err:
            raise LongVAError(f"{str(err).removesuffix('.')}; correct it, or {refetch_hint(folder)}.") from None
    eos = config.get("eos_token_id")
    if eos is not None and not all(isinstance(i, int) and not isinstance(i, bool) for i in (eos if isinstance(eos, list) else [eos])):
        raise _wrong_field(path, "eos_token_id", eos, "a token id or a list of them")
    return config


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise LongVAError(f"{folder} is not a LongVA checkpoint: it has no config.json.")
    return read_json(path, folder)


def _wrong_field(path: Path | None, key: str, value, expected: str) -> LongVAError:
    where = path or "config.json"
    return LongVAError(f"{where}: field {key!r} must be {expected}, got {value!r}; correct it, or {refetch_hint(Path(where).parent)}.")


def _field(raw: dict, key: str, kind: type, default, path: Path | None, positive: bool = False):
    """`raw[key]` checked against `kind` (null or absent -> `default`); bools are not ints."""
    value = raw.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _wrong_field(path, key, value, {int: "an integer", str: "a string"}[kind])
    if positive and value < 1:
        raise _wrong_field(path, key, value, "a positive integer")
    return value


def multimodal_config(raw: dict, path: Path | None = None) -> MultimodalConfig:
    """The multimodal settings of a config dict (read from `path`), checked against what this
    implementation supports."""
    if "mm_vision_tower" not in raw and "mm_hidden_size" not in raw:
        kind = raw.get("model_type", "unknown")
        raise LongVAError(
            f"this checkpoint (model_type {kind}) has no vision tower settings (mm_vision_tower); it is a text-only model, not LongVA."
        )
    defaults = MultimodalConfig()
    known = {
        "mm_vision_tower", "mm_hidden_size", "mm_projector_type", "mm_vision_select_layer",
        "mm_vision_select_feature", "mm_patch_merge_type", "image_aspect_ratio", "image_grid_pinpoints",
        "mm_spatial_pool_stride", "mm_spatial_pool_mode", "tokenizer_model_max_length", "mm_tunable_parts",
    }
    pinpoints = raw.get("image_grid_pinpoints")
    try:
        pinpoints = parse_pinpoints(pinpoints) if pinpoints else defaults.image_grid_pinpoints
    except (TypeError, ValueError):
        raise _wrong_field(path, "image_grid_pinpoints", pinpoints, "a list of [width, height] pairs") from None
    if any(w < 1 or h < 1 for w, h in pinpoints):
        raise _wrong_field(path, "image_grid_pinpoints", raw.get("image_grid_pinpoints"), "a list of positive [width, height] pairs")
    mm = MultimodalConfig(
        vision_tower=_field(raw, "mm_vision_tower", str, "", path) or defaults.vision_tower,
        mm_hidden_size=_field(raw, "mm_hidden_size", int, defaults.mm_hidden_size, path, positive=True),
        projector_type=_field(raw, "mm_projector_type", str, "", path) or defaults.projector_type,
        select_layer=_field(raw, "mm_vision_select_layer", int, defaults.select_layer, path),
        select_feature=_field(raw, "mm_vision_select_feature", str, "", path) or defaults.select_feature,
        patch_merge_type=_field(raw, "mm_patch_merge_type", str, "", path) or defaults.patch_merge_type,
        image_aspect_ratio=_field(raw, "image_aspect_ratio", str, "", path) or defaults.image_aspect_ratio,
        image_grid_pinpoints=pinpoints,
        pool_stride=_field(raw, "mm_spatial_pool_stride", int, defaults.pool_stride, path, positive=True),
        pool_mode=_field(raw, "mm_spatial_pool_mode", str, "", path) or defaults.pool_mode,
        tokenizer_model_max_length=_field(raw, "tokenizer_model_max_length", int, None, path),
        tunable_parts=_field(raw, "mm_tunable_parts", str, "", path),
        extra={k: v for k, v in raw.items() if k.startswith("mm_") and k not in known},
    )
    mm.projector_depth  # noqa: B018 - raises early for an unsupported projector
    if mm.select_feature != "patch":
        raise LongVAError(f"mm_vision_select_feature {mm.select_feature!r} is not supported; LongVA pools the 24x24 patch grid (\"patch\").")
    if mm.pool_mode not in ("average", "max"):
        raise LongVAError(f"mm_spatial_pool_mode {mm.pool_mode!r} is not supported; use average (LongVA) or max.")
    return mm


# Sizes that build tensors: a zero or negative one fails deep inside torch.
_POSITIVE_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")


def _config_error(err: Exception) -> str:
    """transformers' strict-dataclass message, last line, without the exception type's name."""
    return re.sub(r"^\w+Error: ", "", str(err).strip().splitlines()[-1].strip())


def language_config(raw: dict, path: Path | None = None):
    """Qwen2's config from the checkpoint's config dict, read from `path` (unknown LLaVA keys are
    kept as attributes); a field of the wrong type or size is a LongVAError naming it."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import Qwen2Config

    where = path or "config.json"
    for key in _POSITIVE_SIZES:  # (a wrong type is left to transformers' own check below)
        value = raw.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 1:
            raise _wrong_field(path, key, value, "a positive integer")
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "auto_map", "transformers_version")}
    try:
        return Qwen2Config(**fields)
    except (StrictDataclassError, TypeError, ValueError, KeyError) as err:
        raise LongVAError(f"{where}: {_config_error(err)}; correct it, or {refetch_hint(Path(where).parent)}.") from None


def language_parameters(config) -> int:
    """How many parameters a Qwen2 config describes (biases and norms left out): an absurd
    config is refused by this count before anything is built."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q and o, k and v
    layer = attention + 3 * hidden * config.intermediate_size  # gate, up, down
    embeddings = config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2)
    return embeddings + config.num_hidden_layers * layer


def vision_parameters(config) -> int:
    """How many parameters a CLIP vision config describes (biases and norms left out)."""
    hidden = config.hidden_size
    positions = (config.image_size // config.patch_size) ** 2 + 1
    embeddings = config.num_channels * config.patch_size**2 * hidden + positions * hidden
    return embeddings + config.num_hidden_layers * (4 * hidden * hidden + 2 * hidden * config.intermediate_size)


def projector_parameters(mm: MultimodalConfig, hidden_size: int) -> int:
    """How many parameters the projector of `mm` has (biases left out)."""
    return mm.mm_hidden_size * hidden_size + (mm.projector_depth - 1) * hidden_size * hidden_size


def _tower_folder(tower: str) -> Path | None:
    """The local folder holding the tower's config: a path, or the hub cache's snapshot of an id."""
    path = Path(tower).expanduser()
    if (path / "config.json").is_file():
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", tower):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(tower, local_files_only=True, allow_patterns=["*.json"]))
        except Exception:  # noqa: BLE001 - any miss in the cache means "not at hand"
            return None
    return None


def vision_settings(mm: MultimodalConfig) -> tuple["CLIPVisionConfig", ImageProcessing]:  # noqa: F821
    """The CLIP vision config and preprocessing for `mm_vision_tower`, offline when need be."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import CLIPVisionConfig

    folder = _tower_folder(mm.vision_tower)
    if folder is None:
        # Checkpoints trained elsewhere often name the tower by a path on the trainer's disk;
        # the basename still says which CLIP it is.
        if Path(mm.vision_tower).name != Path(CLIP_L_336).name:
            raise LongVAError(
                f"the vision tower {mm.vision_tower} named in config.json is not available offline; run `longva download {mm.vision_tower}` or fix mm_vision_tower."
            )
        return CLIPVisionConfig(**CLIP_L_336_VISION), ImageProcessing()
    raw = read_json(folder / "config.json", folder)
    try:
        vision = CLIPVisionConfig(**raw.get("vision_config", raw))
    except (StrictDataclassError, TypeError, ValueError, KeyError) as err:
        raise LongVAError(f"{folder / 'config.json'}: {_config_error(err)}; correct it, or {refetch_hint(folder)}.") from None
    processing = ImageProcessing()
    preprocessor = folder / "preprocessor_config.json"
    if preprocessor.is_file():
        pre = read_json(preprocessor, folder)
        size, crop = pre.get("size", 336), pre.get("crop_size", 336)
        try:
            processing = ImageProcessing(
                resize=int(size["shortest_edge"] if isinstance(size, dict) else size),
                crop=int(crop["height"] if isinstance(crop, dict) else crop),
                mean=tuple(float(m) for m in pre.get("image_mean", processing.mean)),
                std=tuple(float(s) for s in pre.get("image_std", processing.std)),
            )
            if min(processing.resize, processing.crop) < 1 or len(processing.mean) != 3 or len(processing.std) != 3:
                raise ValueError("sizes must be positive, mean and std three numbers")
        except (KeyError, TypeError, ValueError):
            raise LongVAError(
                f"{preprocessor}: size, crop_size, image_mean or image_std is malformed; correct it, or {refetch_hint(folder)}."
            ) from None
    return vision, processing
