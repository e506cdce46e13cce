"""Tiny random checkpoints of ANY image-text-to-text architecture, built offline from its own classes.

The coverage sweep (bench/coverage.py) needs a checkpoint of every architecture in transformers'
MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, most of which have no builder of their own in this
package. This module makes one from the model type alone, with nothing model-specific:

  config     the model type's config class at its defaults, every size shrunk in every sub-config
             (`_shrink`: widths, layers, heads, intermediate, experts, vocab; the vision tower's image
             side to 8 patches), kept consistent as the configs validate it: per-layer lists and
             per-layer overrides cut to the kept layers, kv heads grouping the heads, mrope sections
             summing to half the head, latent-attention sizes following the head, feature layers inside
             the tower, encoder and decoder text models alike; then re-derived as it loads back. The
             few defaults transformers ships that disagree with the model's own code are in
             _DEFAULT_OVERRIDES;
  tokenizer  the shared seeded byte-level BPE (common.py) with every special token the processor's
             module names (its string literals that look like `<...>`, `<|...|>` or `[...]`, and its
             __init__ defaults), ids after the vocabulary;
  processor  the model type's processor class from its image (and video) processor's defaults, their
             sizes set to the tower's image side, and a plain chat template whose image part is the
             processor's image marker;
  model      built from the config, weights re-drawn with the shared recipe (common.scaled_std: q/k
             doubled, position tables at 0.5, lm_head for logits of std ~3), special output rows
             silenced as the family builders do, so that greedy outputs depend on prompt and image.

Any step may fail for an architecture whose pieces need more than defaults (a file, remote code, a
size the defaults do not tie together); the exception is the sweep's recorded reason.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from functools import lru_cache
from pathlib import Path

import torch
import transformers
from tokenizers import AddedToken, Tokenizer
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerFast, ProcessorMixin
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING_NAMES

from services.tiny_checkpoints import common

# The shrunk shapes: text model, vision (or other) tower. Names are the config keys transformers uses
# across models for the same thing.
_TEXT = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128, "experts": 4, "experts_per_tok": 2}
_TOWER = {"hidden": 32, "layers": 2, "heads": 2, "kv_heads": 2, "intermediate": 64, "experts": 4, "experts_per_tok": 2}
_HIDDEN_KEYS = ("hidden_size", "d_model", "embed_dim", "width", "n_embd", "hidden_dim")
_LAYER_KEYS = ("num_hidden_layers", "num_layers", "depth", "n_layer", "encoder_layers", "decoder_layers")
_HEAD_KEYS = ("num_attention_heads", "num_heads", "n_head", "encoder_attention_heads", "decoder_attention_heads")
_KV_KEYS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads")
_INTERMEDIATE_KEYS = ("intermediate_size", "ffn_dim", "mlp_dim", "encoder_ffn_dim", "decoder_ffn_dim",
                      "moe_intermediate_size", "shared_expert_intermediate_size")
_EXPERT_KEYS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
_EXPERTS_PER_TOK_KEYS = ("num_experts_per_tok", "moe_k", "top_k")
# Image side of a tower: this many patches along each side (8: a 2x2 merge or pixel shuffle still divides).
_PATCHES_PER_SIDE = 8
_VOCAB_MULTIPLE = 64
# Tiny means tiny: a shrunk model above this many parameters kept a size the shrink does not know.
_MAX_PARAMS = 30_000_000

# String literals of a processor module that look like special tokens: <image>, <|image_pad|>, [IMG].
_TOKEN_LITERAL = re.compile(r"""["'](<\|?[A-Za-z_][\w\-:./|]{0,40}\|?>|\[[A-Z][A-Z_0-9]{1,30}\])["']""")
_BASE_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|end_of_turn|>")

_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '%IMAGE%' }}"
    "{% elif part['type'] == 'video' %}{{ '%VIDEO%' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|end_of_turn|>\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


class BuildError(Exception):
    """A step of the build that cannot be done from defaults; the message is the sweep's reason."""


def _sub_configs(config: PretrainedConfig) -> list[tuple[str, PretrainedConfig]]:
    return [(name, value) for name, value in vars(config).items() if isinstance(value, PretrainedConfig)]


def _is_tower(name: str) -> bool:
    # Not a perceiver or projector: those take the text width (Idefics2 ties its perceiver's to it).
    return any(word in name for word in ("vision", "image", "visual", "audio", "video", "encoder", "vq"))


def _shrink(config: PretrainedConfig, vocab_size: int, tower: bool = False, shrink_images: bool = True) -> None:
    """Every size of `config` and its sub-configs shrunk in place (module docstring); the image side
    too when `shrink_images`. A width another config repeats under its own name (a projector's
    `vision_hidden_size`, `mm_hidden_size`) follows the width it repeats."""
    widths: dict[int, int] = {}
    _shrink_one(config, vocab_size, tower, shrink_images, widths)
    _follow_widths(config, widths)


def _follow_widths(config: PretrainedConfig, widths: dict[int, int]) -> None:
    for key, value in list(vars(config).items()):
        if key not in _HIDDEN_KEYS and isinstance(value, int) and not isinstance(value, bool) and value in widths \
                and ("hidden" in key or key.endswith(("_dim", "_size"))) and "vocab" not in key and "image" not in key:
            setattr(config, key, widths[value])
        elif isinstance(value, (list, tuple)) and key.endswith("channels") and value \
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value) and value[-1] in widths:
            # A stage list that ends at another model's width (DeepSeek-OCR 2's SAM downsample_channels
            # [512, 896] feed its 896-wide encoder) ends at that width shrunk.
            setattr(config, key, [*value[:-1], widths[value[-1]]])
    for _, sub in _sub_configs(config):
        _follow_widths(sub, widths)


def _shrink_one(config: PretrainedConfig, vocab_size: int, tower: bool, shrink_images: bool,
                widths: dict[int, int]) -> None:
    shape = _TOWER if tower else _TEXT
    values = vars(config)
    before = dict(values)
    for keys, value in ((_HIDDEN_KEYS, shape["hidden"]), (_LAYER_KEYS, shape["layers"]), (_HEAD_KEYS, shape["heads"]),
                        (_KV_KEYS, shape["kv_heads"]), (_INTERMEDIATE_KEYS, shape["intermediate"]),
                        (_EXPERT_KEYS, shape["experts"]), (_EXPERTS_PER_TOK_KEYS, shape["experts_per_tok"])):
        for key in keys:
            if isinstance(values.get(key), int) and not isinstance(values.get(key), bool) and values[key] > value:
                if keys is _HIDDEN_KEYS:
                    widths.setdefault(values[key], value)
                setattr(config, key, value)
    heads = next((values[k] for k in _HEAD_KEYS if isinstance(values.get(k), int)), None)
    hidden = next((values[k] for k in _HIDDEN_KEYS if isinstance(values.get(k), int)), None)
    _keep_kv_heads(config, before, heads)
    if isinstance(values.get("head_dim"), int) and heads and hidden:
        config.head_dim = hidden // heads
        _follow_head_dim(config, before, hidden)
    elif "head_dim" in values and values["head_dim"] is None and heads and hidden:
        config.head_dim = hidden // heads  # HunYuan-VL's attention reads the head_dim its default leaves None
    if heads and hidden:
        _fit_mrope_sections(config, hidden // heads, code_default=not tower)
    layers = next((values[k] for k in _LAYER_KEYS if isinstance(values.get(k), int)), None)
    old_layers = next((before[k] for k in _LAYER_KEYS if isinstance(before.get(k), int)), None)
    for key, value in list(values.items()):
        if layers and isinstance(value, (list, tuple)) and len(value) > layers and key.endswith("types"):
            setattr(config, key, value[-layers:])  # per-layer kinds: keep the last (full attention last)
        elif layers and old_layers and old_layers > layers and isinstance(value, (list, tuple)) \
                and len(value) == old_layers:
            setattr(config, key, _per_layer(key, list(value), layers, shape))
    if layers and old_layers and old_layers > layers:
        _shrink_per_layer_config(config, before, old_layers, layers)
        for key, value in list(values.items()):
            # A count of the layers of a kind (Gemma 3n's num_kv_shared_layers: the last 15 of 35 reuse an
            # earlier layer's cache) scales with the layers, so that the kept layers still hold a producer
            # of every kind they use.
            if key.startswith("num_") and key.endswith("_layers") and key not in _LAYER_KEYS \
                    and isinstance(value, int) and not isinstance(value, bool) and 0 < value < old_layers:
                setattr(config, key, value * layers // old_layers)
    experts = next((values[k] for k in _EXPERT_KEYS if isinstance(values.get(k), int)), 0)
    if layers and "mlp_layer_types" in values and values["mlp_layer_types"] is None and experts:
        # DeepSeek-OCR 2 indexes the per-layer MLP kinds its default leaves None: a dense first layer and
        # sparse ones after it, as DeepSeek's checkpoints have (first_k_dense_replace).
        config.mlp_layer_types = ["dense"] + ["sparse"] * (layers - 1)
    for key in _EXPERTS_PER_TOK_KEYS:  # its router's top-k, left None too
        if experts and key in values and values[key] is None:
            setattr(config, key, shape["experts_per_tok"])
    for name, sub in _sub_configs(config):  # towers first: their layer counts bound the feature layers
        # A text model inside an encoder (T5Gemma 2's encoder.text_config) is a text model: the same width
        # as the decoder, which it must balance.
        sub_tower = _is_tower(name) or (tower and "text" not in name)
        _shrink_one(sub, vocab_size, sub_tower, shrink_images, widths)
    _clamp_feature_layers(config)
    if isinstance(values.get("vocab_size"), int) and not tower:
        config.vocab_size = vocab_size
    patch, side = values.get("patch_size"), values.get("image_size")
    if shrink_images and isinstance(side, int) and isinstance(patch, int):
        config.image_size = patch * _PATCHES_PER_SIDE
    elif shrink_images and isinstance(side, (list, tuple)) and isinstance(patch, (list, tuple)) \
            and len(side) == len(patch) and all(isinstance(v, int) for v in (*side, *patch)):
        config.image_size = [p * _PATCHES_PER_SIDE for p in patch]  # (height, width): Qianfan-OCR's InternViT
    for key, value in list(values.items()):  # Gemma 3's mm_tokens_per_image: pooled from the patches
        if shrink_images and "tokens_per_image" in key and isinstance(value, int) and value > _PATCHES_PER_SIDE ** 2:
            setattr(config, key, (_PATCHES_PER_SIDE // 2) ** 2)


def _keep_kv_heads(config: PretrainedConfig, before: dict, heads: int | None) -> None:
    """Key/value heads that still group the shrunk query heads: as many as the heads where the model had
    as many (GLM-5 Next requires it), else a divisor of them."""
    if not heads:
        return
    old_heads = next((before[k] for k in _HEAD_KEYS if isinstance(before.get(k), int)), None)
    for key in _KV_KEYS:
        kv = vars(config).get(key)
        if not isinstance(kv, int) or isinstance(kv, bool):
            continue
        if before.get(key) == old_heads:
            setattr(config, key, heads)
        elif heads % kv:
            setattr(config, key, math.gcd(heads, kv))


def _follow_head_dim(config: PretrainedConfig, before: dict, hidden: int) -> None:
    """The other head sizes of a config follow its head's shrink (multi-head latent attention, DeepSeek V3
    in Kimi K2.5: qk_rope_head_dim is the head_dim, qk_nope_head_dim and v_head_dim scale with it), and
    its low-rank projections fit in the shrunk width (q_lora_rank, kv_lora_rank)."""
    old, new = before.get("head_dim"), vars(config).get("head_dim")
    if not isinstance(old, int) or not old or old == new:
        return
    for key, value in list(vars(config).items()):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            if key.endswith("_head_dim"):
                setattr(config, key, max(1, value * new // old))
            elif key.endswith("lora_rank"):
                setattr(config, key, min(value, hidden))


def _fit_mrope_sections(config: PretrainedConfig, head_dim: int, code_default: bool) -> None:
    """Multimodal rope sections (`mrope_section`: [16, 24, 24] of a 128 head) rescaled to sum to half the
    shrunk head, as the config requires. A text model whose code holds the sections as a default gets
    them written (rescaled) into its config."""
    for key in ("rope_parameters", "rope_scaling"):
        params = vars(config).get(key)
        if code_default and isinstance(params, dict) and "rope_type" in params and "mrope_section" not in params \
                and _code_default_mrope(config):
            params["mrope_section"] = _code_default_mrope(config)
        sections = params.get("mrope_section") if isinstance(params, dict) else None
        if not isinstance(sections, (list, tuple)) or not sections or sum(sections) == head_dim // 2:
            continue
        half, total = head_dim // 2, sum(sections)
        scaled = [max(1, s * half // total) for s in sections]
        # The remainder goes to sections of equal size together (ERNIE 4.5 VL's height and width sections
        # must stay equal), largest first, then to the first section.
        for size in sorted(set(sections), reverse=True):
            group = [i for i, s in enumerate(sections) if s == size]
            if len(group) <= half - sum(scaled):
                for i in group:
                    scaled[i] += 1
        scaled[0] += half - sum(scaled)
        params["mrope_section"] = scaled


def _code_default_mrope(config: PretrainedConfig) -> list[int] | None:
    """Sections the model's code takes when the config has none (ERNIE 4.5 VL:
    `rope_parameters.get("mrope_section", [22, 22, 20])`), to be rescaled and written into the config."""
    module = inspect.getmodule(type(config))
    name = module.__name__.replace(".configuration_", ".modeling_") if module else ""
    try:
        source = inspect.getsource(importlib.import_module(name))
    except (ImportError, OSError, TypeError):
        return None
    found = re.search(r"""\.get\(\s*["']mrope_section["']\s*,\s*\[([\d,\s]+)\]\s*\)""", source)
    return [int(v) for v in found.group(1).split(",") if v.strip()] if found else None


def _per_layer(key: str, value: list, layers: int, shape: dict[str, int]) -> list:
    """A list with one entry per layer of the unshrunk model, cut to the shrunk layer count like the
    layer kinds (the last layers kept). A list of layer indices (Mistral Large 4's kv_source_layers
    [0, 1, ..., 71]) is renumbered to the kept layers; widths per layer (Gemma 3n's intermediate_size)
    shrink like the width."""
    offset = len(value) - layers
    if value == list(range(len(value))):
        return list(range(layers))
    kept = value[offset:]
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in kept)
    if ints and key.endswith("_layers") and not set(kept) <= {0, 1}:
        return [min(max(v - offset, 0), layers - 1) for v in kept]
    if ints and key in _INTERMEDIATE_KEYS:
        return [min(v, shape["intermediate"]) for v in kept]
    return kept


def _shrink_per_layer_config(config: PretrainedConfig, before: dict, old_layers: int, layers: int) -> None:
    """A heterogeneous config's per-layer overrides (Gemma 4's `per_layer_config`: a wider head on its
    full-attention layers), keyed by the kept layers' new indices, their sizes scaled as the config's."""
    spec = vars(config).get("_heterogeneity_spec")
    overrides = getattr(spec, "per_layer_overrides", None)
    if not overrides:
        return
    offset = old_layers - layers
    kept: dict[int, dict] = {}
    for index, override in overrides.items():
        if int(index) < offset:
            continue
        scaled = {}
        for name, value in override.items():
            old, new = before.get(name), vars(config).get(name)
            if isinstance(value, int) and isinstance(old, int) and isinstance(new, int) and old and old != new:
                value = max(1, value * new // old)
            scaled[name] = value
        kept[int(index) - offset] = scaled
    config.per_layer_config = kept or None


def _clamp_feature_layers(config: PretrainedConfig, vision: PretrainedConfig | None = None) -> None:
    """Feature layer indices (`vision_feature_layer(s)`: -2, [-2, -5, -8, -11, 6]) brought inside the
    shrunk tower's layers, keeping their sign (negative: from the last). The tower may be a sibling's
    (Molmo 2's adapter_config indexes vision_config's layers)."""
    vision = getattr(config, "vision_config", None) or vision
    for _, sub in _sub_configs(config):
        if sub is not vision:
            _clamp_feature_layers(sub, vision)
    layers = next((vars(vision)[k] for k in _LAYER_KEYS if vision is not None and isinstance(vars(vision).get(k), int)),
                  None)
    if not layers:
        return

    def clamp(i: int) -> int:
        return max(i, -layers) if i < 0 else min(i, layers - 1)

    for key, value in list(vars(config).items()):
        if "feature_layer" in key:
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(config, key, clamp(value))
            elif isinstance(value, (list, tuple)) and all(isinstance(i, int) for i in value):
                setattr(config, key, [clamp(i) for i in value])


def tower_image_side(config: PretrainedConfig) -> int | None:
    """The shrunk vision tower's image side, if it has one."""
    for _, sub in [("", config), *_sub_configs(config)]:
        side = getattr(sub, "image_size", None)
        if isinstance(side, (list, tuple)) and side and isinstance(side[0], int):
            side = max(side)
        if isinstance(side, int):
            return side
    return None


# ---- tokenizer -------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _base_tokenizer(seed: int) -> str:
    """The shared BPE trained once per seed (common.train_bpe_tokenizer), serialised to copy from."""
    return common.train_bpe_tokenizer(seed, ()).backend_tokenizer.to_str()


def _sources(processor_class: type[ProcessorMixin]) -> str:
    """The source of the processor's module and of its transformers base classes' (ShieldGemma2's
    processor is Gemma 3's with other defaults)."""
    modules = {inspect.getmodule(c) for c in processor_class.__mro__ if c.__module__.startswith("transformers.models.")}
    return "\n".join(inspect.getsource(m) for m in sorted(modules, key=lambda m: m.__name__))


def _special_tokens(processor_class: type[ProcessorMixin]) -> list[str]:
    source = _sources(processor_class)
    literals = _TOKEN_LITERAL.findall(source)
    defaults = [p.default for p in inspect.signature(processor_class.__init__).parameters.values()
                if isinstance(p.default, str) and _TOKEN_LITERAL.fullmatch(repr(p.default))]
    # Tokens held as class constants, whatever they look like (MiniMax M3 VL's IMAGE_TOKEN ']<]image[>[').
    constants = [getattr(processor_class, k) for k in dir(processor_class)
                 if k.isupper() and k.endswith("_TOKEN") and isinstance(getattr(processor_class, k), str)]
    return list(dict.fromkeys([*_BASE_TOKENS, *defaults, *constants, *literals]))


def _token_attributes(processor_class: type[ProcessorMixin]) -> list[str]:
    """Tokenizer attributes the processor reads (`tokenizer.image_token`, ...), which a tokenizer has
    only when given as extra special tokens."""
    source = _sources(processor_class)
    names = set(re.findall(r"tokenizer\.(\w+_token)\b", source)) - {"bos_token", "eos_token", "pad_token", "unk_token"}
    return sorted(name for name in names if not name.startswith("add_"))  # add_bos_token: a flag, not a token


# Token names a real checkpoint's tokenizer holds and no transformers source does, where a family file
# reads them, by processor class: services/models/gemma3.py expands <image_soft_token>, also for
# ShieldGemma 2 (its model class is Gemma 3's; its processor a copy of Gemma 3's).
_GEMMA3_TOKENS = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
_CHECKPOINT_TOKENS = {"Gemma3Processor": _GEMMA3_TOKENS, "ShieldGemma2Processor": _GEMMA3_TOKENS}


def make_tokenizer(seed: int, processor_class: type[ProcessorMixin]) -> PreTrainedTokenizerFast:
    tokens = _special_tokens(processor_class)
    backend = Tokenizer.from_str(_base_tokenizer(seed))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    defaults = {p.name: p.default for p in inspect.signature(processor_class.__init__).parameters.values()}
    defaults.update(_CHECKPOINT_TOKENS.get(processor_class.__name__, {}))
    extra = {}
    for attribute in _token_attributes(processor_class):
        # The processor's own literal for it where it has one (GLM-4.6V's falls back to "<|image|>" for a
        # tokenizer without image_token; its family file reads that name), else a name of its own.
        stem = attribute.removesuffix("_token")
        own = next((t for t in tokens if t in (f"<|{stem}|>", f"<{stem}>")), f"<|{attribute}|>")
        value = defaults.get(attribute) if isinstance(defaults.get(attribute), str) else own
        if value not in tokens:
            backend.add_special_tokens([AddedToken(value, special=True, normalized=False)])
        extra[attribute] = value
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|end_of_turn|>",
                                   pad_token="<|pad|>", extra_special_tokens=extra, model_max_length=8192)


# ---- processor -------------------------------------------------------------------------------
def _class(name: str | dict | tuple | None, prefer: str = "torchvision"):
    if isinstance(name, dict):
        name = name.get(prefer) or name.get("pil") or next(iter(name.values()))
    if isinstance(name, tuple):
        name = next(n for n in reversed(name) if n)
    return getattr(transformers, name) if name else None


# Image processor settings that must be the tower's (config name, processor name): Qwen2-VL's processor
# at its defaults cuts 14 px patches for a tower of 16 (LFM3-VL).
_TOWER_SETTINGS = (("patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch_size"),
                   ("spatial_merge_size", "merge_size"))


# Processor defaults that need a file a checkpoint ships and an offline build cannot make, turned off:
# ERNIE 4.5 VL's video processor draws timestamps on frames with a font file (Roboto-Regular.ttf).
_OFFLINE_SETTINGS = {"draw_on_frames": False}


def _sized(cls, side: int | None, config: PretrainedConfig):
    """The image (or video) processor at its defaults, its sizes set to the tower's image side, its
    patch settings to the tower's."""
    kwargs: dict[str, object] = {k: v for k, v in _OFFLINE_SETTINGS.items() if hasattr(cls, k)}
    default = cls(**kwargs)
    for config_name, name in _TOWER_SETTINGS:
        value = _config_value(config, config_name)
        if isinstance(getattr(default, name, None), int) and isinstance(value, int):
            kwargs[name] = value
    if not side:
        return cls(**kwargs)
    for key in ("size", "crop_size", "max_image_size"):  # SmolVLM's tile side: {"longest_edge": 364}
        size = getattr(default, key, None)
        fields = size.items() if isinstance(size, dict) else vars(size).items() if hasattr(size, "__dict__") else ()
        entries = {k: side for k, v in fields if isinstance(v, int) and not k.endswith("pixels")}
        if entries:
            kwargs[key] = entries
    for key in ("max_image_size", "min_image_size"):
        if isinstance(getattr(default, key, None), int):
            kwargs[key] = side
    for key in ("min_pixels", "max_pixels"):
        if isinstance(getattr(default, key, None), int):
            kwargs[key] = side * side if key == "max_pixels" else side * side // 4
    return cls(**kwargs)


# Model types transformers maps no processor to, and the model type whose processor (and image processor)
# their released checkpoints ship: FastVLM's HF checkpoints (transformers' convert script) save a
# LlavaProcessor with a CLIPImageProcessor; the model takes LLaVA's one <image> token per feature.
_PROCESSOR_OF = {"fast_vlm": "llava"}


def _siblings(model_type: str, mapping) -> list[str]:
    """Model types to borrow a mapping's entry from: `model_type`, then those whose model class or
    processor class is the same (glmga is glm46v's class; Glm4vProcessor serves glm4v_moe), then the
    one _PROCESSOR_OF names."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as models

    same_model = [k for k, v in models.items() if v == models.get(model_type) and k != model_type]
    processor = PROCESSOR_MAPPING_NAMES.get(model_type)
    same_processor = [k for k, v in PROCESSOR_MAPPING_NAMES.items() if processor and v == processor and k != model_type]
    borrowed = [_PROCESSOR_OF[model_type]] if model_type in _PROCESSOR_OF else []
    return [k for k in [model_type, *same_model, *same_processor, *borrowed] if k in mapping]


def _borrowed(model_type: str, mapping):
    keys = _siblings(model_type, mapping)
    return _class(mapping[keys[0]]) if keys else None


def _config_value(config: PretrainedConfig, name: str):
    """`name` in the config or its sub-configs (the first found), else None."""
    for sub in [config, *(c for _, c in _sub_configs(config))]:
        value = vars(sub).get(name)
        if value is not None:
            return value
    return None


def make_processor(model_type: str, seed: int, side: int | None, config: PretrainedConfig) -> ProcessorMixin:
    """The processor; an argument it leaves None by default (LLaVA's patch_size, its feature select
    strategy) takes the config's value of the same name, as a real checkpoint's processor config does."""
    from transformers.models.auto.feature_extraction_auto import FEATURE_EXTRACTOR_MAPPING_NAMES

    processor_class = _borrowed(model_type, PROCESSOR_MAPPING_NAMES)
    if processor_class is None:
        raise BuildError(f"no processor class for {model_type} (nor for a model type of the same class) in "
                         "transformers' PROCESSOR_MAPPING_NAMES")
    parameters = inspect.signature(processor_class.__init__).parameters
    tokenizer = make_tokenizer(seed, processor_class)
    kwargs: dict[str, object] = {"tokenizer": tokenizer}
    for name, mapping in (("image_processor", IMAGE_PROCESSOR_MAPPING_NAMES),
                          ("video_processor", VIDEO_PROCESSOR_MAPPING_NAMES),
                          ("feature_extractor", FEATURE_EXTRACTOR_MAPPING_NAMES)):
        if name in parameters:
            cls = _borrowed(model_type, mapping)
            if cls is None:
                raise BuildError(f"{processor_class.__name__} takes a {name} but transformers maps none to {model_type}")
            kwargs[name] = _sized(cls, side, config) if name != "feature_extractor" else cls()
    for name, parameter in parameters.items():
        if parameter.default is None and name not in kwargs and _config_value(config, name) is not None:
            kwargs[name] = _config_value(config, name)
    missing = [n for n, p in parameters.items() if p.default is inspect.Parameter.empty
               and n not in ("self", "args", "kwargs") and n not in kwargs and p.kind == p.POSITIONAL_OR_KEYWORD]
    if missing:
        raise BuildError(f"{processor_class.__name__} needs {missing}, which cannot be made offline from defaults")
    processor = processor_class(**kwargs)
    image_marker = _marker(processor, "image", "<image>")
    video_marker = _marker(processor, "video", "<video>")
    processor.chat_template = _CHAT_TEMPLATE.replace("%IMAGE%", image_marker).replace("%VIDEO%", video_marker)
    return processor


def _marker(processor: ProcessorMixin, modality: str, default: str) -> str:
    """The text a prompt marks an image (video) with: of the processor's own marker attributes and the
    usual markers, the one the processor accepts with one image and expands the most (Gemma 3's
    processor accepts its image token as it is but expands only its begin-of-image token; the first
    wins a tie; videos: the first)."""
    candidates = [getattr(processor, f"{modality}_{suffix}", None) for suffix in ("token", "placeholder", "tag")]
    candidates += [getattr(processor, "boi_token", None)] if modality == "image" else []
    candidates = list(dict.fromkeys(c for c in [*candidates, default, "<|image|>", "[IMG]"] if isinstance(c, str) and c))
    if modality != "image":
        return candidates[0]
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))
    best, longest = candidates[0], -1
    for marker in candidates:
        try:
            ids = processor(text=[f"Look: {marker} here."], images=[image], return_tensors="pt")["input_ids"]
        except Exception:  # noqa: BLE001, S112 -- not this marker: the next one
            continue
        if ids.numel() > longest:
            best, longest = marker, ids.numel()
    return best


# ---- config and model ------------------------------------------------------------------------
# Config defaults transformers ships that disagree with the model's own code and processor, which no
# generic rule can infer (the table stays small; each entry says why). Aria's vision config defaults
# are Idefics3's (32 px patches) while its projector_patch_to_query_dict keys (1225, 4900) and its
# processor (490/980 px images) are Aria's 14 px patches. Step 3.7's text model builds a sliding-window
# mask on every forward, which needs the window its config leaves None (a real checkpoint sets it).
# DeepSeek-OCR 2's vision encoder defaults to 4096 wide while its SAM stage ends at 896
# (downsample_channels [512, 896]), the encoder width of the real checkpoint (Qwen2-0.5B).
_DEFAULT_OVERRIDES: dict[str, dict[str, dict[str, object]]] = {
    "aria": {"vision_config": {"patch_size": 14}},
    "step3p7": {"text_config": {"sliding_window": 512}},
    "deepseek_ocr2": {"vision_config.encoder_config": {"hidden_size": 896}},
    # FastVLM's tower is a timm FastViT-HD named by architecture, sized by timm's model_args (which the
    # shrink cannot see): one block per stage, 32 wide at the end (cls_ratio 1: the width the shrink gives
    # the tower's hidden_size). It reduces images 64x: that is the processor's patch_size (1024 px ->
    # 16x16 tokens in the real checkpoint), and image_size gives the shrink a side to cut to 8 patches.
    "fast_vlm": {"vision_config": {"model_args": {"inference_mode": True, "layers": [1, 1, 1, 1, 1],
                                                  "embed_dims": [8, 16, 32, 32, 32], "cls_ratio": 1.0},
                                   "image_size": 256, "patch_size": 64}},
}


def _default_config(model_type: str) -> PretrainedConfig:
    """The model type's config at its defaults, with its _DEFAULT_OVERRIDES."""
    config = AutoConfig.for_model(model_type)
    for sub_name, values in _DEFAULT_OVERRIDES.get(model_type, {}).items():
        sub = config
        for name in filter(None, sub_name.split(".")):
            sub = getattr(sub, name)
        for key, value in values.items():
            setattr(sub, key, value)
    return config


def make_config(model_type: str, tokenizer: PreTrainedTokenizerFast, processor: ProcessorMixin,
                shrink_images: bool) -> PretrainedConfig:
    config = _default_config(model_type)
    vocab = -(-len(tokenizer) // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE
    _shrink(config, vocab, shrink_images=shrink_images)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    for modality in ("image", "video"):
        token = _marker_token(processor, tokenizer, modality)
        if token is not None:
            ids[f"{modality}_token_id"] = ids[f"{modality}_token_index"] = token
    # The tokens the processor reads off the tokenizer by name are the model's of the same name: Gemma 3's
    # processor calls its begin-of-image token its image_token_id, but expands it into tokenizer.image_token,
    # the token the model's image_token_index must name (boi_token_index the begin marker).
    for name in _token_attributes(type(processor)):
        token = getattr(tokenizer, name, None)
        if isinstance(token, str) and token in tokenizer.get_vocab():
            ids[f"{name}_id"] = ids[f"{name}_index"] = tokenizer.convert_tokens_to_ids(token)
    for _, sub in [("", config), *_sub_configs(config)]:
        for key, value in ids.items():
            if hasattr(sub, key) and key.endswith(("token_id", "token_index")):
                setattr(sub, key, value)
    config.dtype = "float32"
    # As it will load back: a size the config derives on load from others it keeps (Step3p7's vision
    # intermediate_size = hidden_size * mlp_ratio) is the one the weights must have.
    return type(config).from_dict(config.to_dict())


def _marker_token(processor: ProcessorMixin, tokenizer: PreTrainedTokenizerFast, modality: str) -> int | None:
    """The id of the token the processor expands a marker into: its `<modality>_token_id`, or its token's."""
    value = getattr(processor, f"{modality}_token_id", None)
    if isinstance(value, int):
        return value
    token = getattr(processor, f"{modality}_token", None)
    if isinstance(token, str) and token in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids(token)
    return None


def _name_architecture(config: PretrainedConfig):
    from transformers import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    model_class = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)]
    config.architectures = [model_class.__name__]
    return model_class


def _std(hidden: int) -> common.StdFor:
    """The shared recipe (common.scaled_std) with the gains most family builders use."""
    return common.scaled_std(hidden, fixed={("position_embedding.weight", "position_embeddings.weight",
                                             "pos_embed", "position_embedding"): 0.5},
                             gains={("q_proj.weight", "k_proj.weight"): 2.0})


def make_model(config: PretrainedConfig, tokenizer: PreTrainedTokenizerFast, seed: int):

    model_class = _name_architecture(config)
    hidden = config.get_text_config().hidden_size
    with torch.device("meta"):  # count first: a size the shrink does not know would fill the memory
        skeleton = model_class(config)
    params = sum(p.numel() for p in skeleton.parameters())
    if params > _MAX_PARAMS:
        name, largest = max(skeleton.named_parameters(), key=lambda item: item[1].numel())
        raise BuildError(f"the shrunk config still has {params / 1e6:.0f}M parameters (largest: {name} "
                         f"{list(largest.shape)}): a size this builder does not know how to shrink")
    del skeleton
    model = common.random_model(model_class, config, seed, _std(hidden))
    head = model.get_output_embeddings()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}
    stop = [tokenizer.eos_token_id]
    vocab = common.Vocab(tokenizer, ids, bos_id=tokenizer.bos_token_id, pad_id=tokenizer.pad_token_id, stop_ids=stop)
    if head is not None and head.weight.shape[0] >= len(tokenizer):
        tied = head.weight is model.get_input_embeddings().weight
        if tied:
            common.quiet_tied_rows(head.weight, vocab, special_scale=0.05)
        else:
            common.silence_lm_head_rows(head.weight, vocab)
    return model, vocab


# Processor attributes that hold a real checkpoint's image token count as a constant.
_TOKEN_COUNT_ATTRIBUTES = ("image_seq_length", "num_image_tokens", "image_seq_len", "num_image_token")


def _match_token_count(processor: ProcessorMixin, model) -> None:
    """Where the processor holds the token count per image as a constant, it becomes the rows the shrunk
    tower gives for one image (as the real processor's constant is the real tower's)."""
    import numpy as np
    from PIL import Image

    names = [n for n in _TOKEN_COUNT_ATTRIBUTES if isinstance(getattr(processor, n, None), int)]
    if not names or not hasattr(model, "get_image_features"):
        return
    image = Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8))
    pixels = processor.image_processor(images=[image], return_tensors="pt")
    parameters = inspect.signature(model.get_image_features).parameters
    with torch.inference_mode():
        out = model.get_image_features(**{k: v for k, v in pixels.items() if k in parameters})
    features = getattr(out, "pooler_output", out)
    rows = sum(f.reshape(-1, f.shape[-1]).shape[0] for f in (features if isinstance(features, (list, tuple))
                                                            else [features]))
    for name in names:
        setattr(processor, name, rows)


# The ways to size images, tried in order: the tower's image side shrunk to 8 patches and the processor's
# sizes set to it (small prompts; breaks processors whose token count is a constant of the real
# checkpoint); both left at their defaults (real token counts; breaks where the defaults disagree); the
# tower's default side with the processor's sizes set to it.
VARIANTS = ("small-images", "default-images", "tower-images")


def build(model_type: str, out_dir: Path, seed: int = 0, variant: str = VARIANTS[0]) -> None:
    """A tiny checkpoint of `model_type` in `out_dir` with images sized as `variant` says."""
    shrink_images = variant == VARIANTS[0]
    sized = _default_config(model_type)
    _shrink(sized, 1 << 16, shrink_images=shrink_images)
    side = tower_image_side(sized) if variant != "default-images" else None
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        processor = make_processor(model_type, seed, side, sized)
    except Exception:
        # The config alone, so that a model the registry refuses for what it is (not for its processor)
        # is refused with that reason; the build still fails.
        config = _default_config(model_type)
        _shrink(config, 1024, shrink_images=shrink_images)
        _name_architecture(config)
        config.save_pretrained(out_dir)
        raise
    config = make_config(model_type, processor.tokenizer, processor, shrink_images)
    processor.save_pretrained(out_dir)
    try:
        model, vocab = make_model(config, processor.tokenizer, seed)
    except Exception:
        config.save_pretrained(out_dir)  # as above: the config alone
        raise
    if side:
        _match_token_count(processor, model)
        processor.save_pretrained(out_dir)
    model.save_pretrained(out_dir)
    common.save_generation_config(out_dir, vocab.stop_ids, vocab.pad_id, vocab.bos_id)
    config.save_pretrained(out_dir)  # last: a reader that sees config.json sees the rest
