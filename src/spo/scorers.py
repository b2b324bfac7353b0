"""Image scorers by name: `load_scorer("pickscore").score(images, prompts) -> np.ndarray`.

One interface: a scorer has a `name` and `score(images, prompts)`, where `images` is a float NHWC
array in [0, 1] of any size (what `spo.generation.generate` returns) and `prompts` holds one prompt
per image; the result holds one float per image, higher = better. A spec is `NAME` (default weights)
or `NAME=PATH_OR_HUB_ID` (other weights of the same kind: a directory or hub id for the CLIP-based
scorers, a checkpoint file for aesthetic, hpsv2 and imagereward).

Plug-ins add scorers of their own (`spo.plugins.register_scorer`); the embedded world adds
`world-utility`, its ground truth in [0, 1], and `world-pickscore`, its CLIP PickScore
(`spo/world/scorers.py`). The core's scorers (default weights in brackets):

- `pickscore`: PickScore_v1, a CLIP ViT-H/14, logit_scale * cos [yuvalkirstain/PickScore_v1, with the
  processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K].
- `clipscore`: 100 * max(cos, 0), torchmetrics' definition (Hessel et al. scale by 2.5)
  [openai/clip-vit-large-patch14].
- `aesthetic`: LAION's improved aesthetic predictor, a linear MLP on the normalised CLIP ViT-L/14 image
  embedding, a rating of about 1-10 [aesthetic-model.pth of trl-lib/ddpo-aesthetic-predictor, which is
  sac+logos+ava1-l14-linearMSE.pth].
- `hpsv2`: HPS v2.1, an open_clip ViT-H/14; cos(text, image) as the hpsv2 package reports it
  [HPS_v2.1_compressed.pt of xswu/HPSv2].
- `imagereward`: ImageReward-v1.0, BLIP ViT-L/16 + cross-attention BERT + MLP, the standardised reward
  [ImageReward.pt of THUDM/ImageReward].

Only torch, transformers and huggingface_hub are used (`pip install "spo[metrics]"`). The HPS v2 and
ImageReward checkpoints are renamed into transformers' CLIP and BLIP classes on load, because the
`hpsv2` and `image-reward` packages pin old protobuf/pytest/timm/fairscale that conflict with
transformers 5. Images are resized (shortest side, bicubic, antialiased), centre-cropped and
normalised as tensors, so scores can differ from the PIL-based originals in the third digit.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from spo import plugins
from spo.clip import image_embeds, text_embeds
from spo.errors import SPOError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PICKSCORE = "yuvalkirstain/PickScore_v1"
CLIP_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_L14 = "openai/clip-vit-large-patch14"
AESTHETIC = ("trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth")
HPSV2 = ("xswu/HPSv2", "HPS_v2.1_compressed.pt")
IMAGEREWARD = ("THUDM/ImageReward", "ImageReward.pt")
BERT = "google-bert/bert-base-uncased"
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward-v1.0's standardisation
IMAGEREWARD_MAX_TOKENS = 35


class Scorer(Protocol):
    name: str

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray: ...


def registry() -> dict[str, Callable[..., Scorer]]:
    """Every scorer factory by name: the plug-ins' first (the order the list had when the world's scorers
    were built in), then the core's `SCORERS`, which a plug-in cannot replace."""
    return {**plugins.scorers(), **SCORERS}


def available_scorers() -> list[str]:
    return list(registry())


def parse_scorer_spec(spec: str) -> tuple[str, str | None]:
    """`NAME` or `NAME=PATH_OR_HUB_ID` -> (name, weights or None); unknown names fail with the list."""
    name, _, weights = spec.partition("=")
    name = name.strip()
    names = available_scorers()
    if name not in names:
        raise SPOError(f"unknown scorer {name!r}; choose from {', '.join(names)} (as NAME or NAME=PATH_OR_HUB_ID)")
    return name, weights.strip() or None


def load_scorer(spec: str, device: str | None = None, **options) -> Scorer:
    """A scorer from its spec; `options` go to its factory (e.g. `clip=` for aesthetic, `base=` for hpsv2)."""
    name, weights = parse_scorer_spec(spec)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return registry()[name](weights, device, **options)


# ------------------------------------------------------------------ shared pieces


def clip_pixels(images: np.ndarray, size: int, mean, std, device="cpu") -> torch.Tensor:
    """[0, 1] NHWC images -> normalised NCHW `size`x`size` pixels: shortest side to `size`, centre crop."""
    from spo.images import resize_center_crop

    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2).to(device)
    x = resize_center_crop(x, size)
    mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


class BatchedScorer:
    """Checks inputs and scores in batches without gradients; subclasses give `_score_batch`."""

    name: str
    batch_size: int = 16

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        images, prompts = np.asarray(images, dtype=np.float32), list(prompts)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{self.name}: expected NHWC RGB images, got shape {images.shape}")
        if len(images) != len(prompts):
            raise ValueError(f"{self.name}: {len(images)} images but {len(prompts)} prompts")
        out = []
        with torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                batch = self._score_batch(images[i : i + self.batch_size], prompts[i : i + self.batch_size])
                out.append(batch.float().cpu().numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    def _score_batch(self, images: np.ndarray, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError


def _first_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def _need(module: str, package: str, scorer: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SPOError(f"the {scorer} scorer needs {package}: pip install \"spo[metrics]\" "
                       f"(or pip install {package})") from None


def _pretrained(cls, source: str, what: str, hint: str):
    try:
        return cls.from_pretrained(source)
    except Exception as exc:  # transformers raises OSError, ValueError, EnvironmentError... for missing files
        raise SPOError(f"could not load the {what} from {source!r} ({_first_line(exc)}); {hint}") from None


def _weights_file(weights: str | None, default: tuple[str, str], scorer: str) -> str:
    """A local checkpoint: `weights` when given, else the default file from the hub (or its cache)."""
    repo, filename = default
    hint = (f"download {filename} from https://huggingface.co/{repo} (`hf download {repo} {filename}`) "
            f"and pass --scorer {scorer}=/path/to/{filename}")
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise SPOError(f"{scorer} weights {path} not found (expected a file); {hint}")
        return str(path)
    hub = _need("huggingface_hub", "huggingface-hub", scorer)
    try:
        return hub.hf_hub_download(repo, filename)
    except Exception as exc:  # offline, no such repo, no network...
        raise SPOError(f"could not get {filename} from the hub repo {repo} ({_first_line(exc)}); {hint}") from None


def _load_state_dict(path: str, scorer: str) -> dict[str, torch.Tensor]:
    """Tensors of a .pt/.pth/.bin/.safetensors checkpoint in fp32, unwrapped from {'state_dict': ...}."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except Exception as exc:
        raise SPOError(f"could not read the {scorer} checkpoint {path} ({_first_line(exc)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise SPOError(f"{path} holds no state dict; is it a {scorer} checkpoint?")
    # "module." is what DistributedDataParallel adds to every key.
    return {k.removeprefix("module."): v.float() for k, v in state.items() if torch.is_tensor(v)}


def linear_stack(state: dict[str, torch.Tensor], prefix: str) -> nn.Sequential:
    """The MLP head of the aesthetic predictor and of ImageReward: linear layers `PREFIX<i>` with no
    activation in between (the originals keep only dropout there, which is off at inference)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.weight")
    indices = sorted(int(m.group(1)) for k in state if (m := pattern.fullmatch(k)))
    if not indices:
        raise KeyError(f"no {prefix}<i>.weight tensors")
    layers = []
    for i in indices:
        weight, bias = state[f"{prefix}{i}.weight"], state[f"{prefix}{i}.bias"]
        layer = nn.Linear(weight.shape[1], weight.shape[0])
        layer.load_state_dict({"weight": weight, "bias": bias})
        layers.append(layer)
    if layers[-1].out_features != 1 or any(a.out_features != b.in_features for a, b in pairwise(layers)):
        raise KeyError(f"{prefix}* layers do not chain to one output")
    return nn.Sequential(*layers).eval()


def _load_strict(module: nn.Module, state: dict, what: str, path: str) -> None:
    """Load every parameter or fail with the names that are missing (non-persistent buffers excepted)."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise SPOError(f"{path} does not fit the {what} ({_first_line(exc)})") from None
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise SPOError(f"{path} is not a {what} checkpoint: missing {missing[:3]}, unexpected {unexpected[:3]}")


# ------------------------------------------------------------------ CLIP-family scorers


def pickscore_logits(cos: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    return logit_scale * cos


def clipscore_value(cos: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    return 100 * cos.clamp(min=0)


def cosine(cos: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    return cos


class ClipScorer(BatchedScorer):
    """A transformers CLIPModel; `transform(cos, logit_scale)` turns the text-image cosine into the score."""

    def __init__(self, name: str, model, tokenizer, image_size: int, mean, std, transform: Callable, device: str):
        self.name, self.tokenizer, self.transform, self.device = name, tokenizer, transform, device
        self.model = model.to(device).eval()
        self.image_size, self.mean, self.std = image_size, mean, std
        self.max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)

    def embed_images(self, images: np.ndarray) -> torch.Tensor:
        return image_embeds(self.model, clip_pixels(images, self.image_size, self.mean, self.std, self.device))

    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt").to(self.device)
        return text_embeds(self.model, tokens.input_ids, tokens.attention_mask)

    def _score_batch(self, images: np.ndarray, prompts: list[str]) -> torch.Tensor:
        cos = (self.embed_images(images) * self.embed_texts(prompts)).sum(-1)
        return self.transform(cos, self.model.logit_scale.exp())


def _image_config(source: str, what: str, hint: str) -> tuple[int, tuple, tuple]:
    """Crop size, mean and std of a CLIP image processor config (the resizing itself is done on tensors)."""
    from transformers.image_processing_utils import ImageProcessingMixin

    try:
        config, _ = ImageProcessingMixin.get_image_processor_dict(source)
    except Exception as exc:
        raise SPOError(f"could not load the {what} image processor config from {source!r} "
                       f"({_first_line(exc)}); {hint}") from None
    crop = config.get("crop_size", 224)
    size = crop if isinstance(crop, int) else crop["height"]
    return int(size), tuple(config.get("image_mean", OPENAI_MEAN)), tuple(config.get("image_std", OPENAI_STD))


def clip_scorer(name: str, model, processor: str, transform: Callable, device: str, hint: str) -> ClipScorer:
    """A `ClipScorer` from a CLIPModel (or its directory / hub id) and the processor source of its tokenizer and
    image settings; `hint` ends every loading error."""
    from transformers import AutoTokenizer, CLIPModel

    if isinstance(model, str):
        model = _pretrained(CLIPModel, model, f"{name} model", hint)
    tokenizer = _pretrained(AutoTokenizer, processor, f"{name} tokenizer", hint)
    size, mean, std = _image_config(processor, name, hint)
    return ClipScorer(name, model, tokenizer, size, mean, std, transform, device)


def _has_tokenizer(source: str) -> bool:
    path = Path(source)
    names = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
    return path.is_dir() and any((path / name).is_file() for name in names)


def pickscore(weights: str | None, device: str, processor: str | None = None) -> ClipScorer:
    source = weights or PICKSCORE
    processor = processor or (source if _has_tokenizer(source) else CLIP_H14)
    hint = (f"download the model (`hf download {PICKSCORE}`) and its processor (`hf download {CLIP_H14} "
            f"--include '*.json' '*.txt'`), or pass --scorer pickscore=/path/to/PickScore_v1")
    return clip_scorer("pickscore", source, processor, pickscore_logits, device, hint)


def clipscore(weights: str | None, device: str, processor: str | None = None) -> ClipScorer:
    source = weights or CLIP_L14
    hint = f"download it (`hf download {CLIP_L14}`) or pass --scorer clipscore=/path/to/clip"
    return clip_scorer("clipscore", source, processor or source, clipscore_value, device, hint)


# ------------------------------------------------------------------ aesthetic predictor


class AestheticScorer(BatchedScorer):
    """LAION's improved aesthetic predictor: a linear MLP on the normalised CLIP image embedding."""

    name = "aesthetic"

    def __init__(self, clip: ClipScorer, head: nn.Sequential):
        self.clip, self.head = clip, head.to(clip.device)

    def _score_batch(self, images: np.ndarray, prompts: list[str]) -> torch.Tensor:
        return self.head(self.clip.embed_images(images)).squeeze(-1)


def aesthetic(weights: str | None, device: str, clip: str = CLIP_L14) -> AestheticScorer:
    path = _weights_file(weights, AESTHETIC, "aesthetic")
    try:
        head = linear_stack(_load_state_dict(path, "aesthetic"), "layers.")
    except KeyError as exc:
        raise SPOError(f"{path} is not an aesthetic-predictor MLP ({exc.args[0]})") from None
    hint = f"download it (`hf download {clip}`) or pass clip=... to the aesthetic scorer"
    encoder = clip_scorer("aesthetic", clip, clip, cosine, device, hint)
    if head[0].in_features != encoder.model.config.projection_dim:
        raise SPOError(f"the aesthetic MLP {path} takes {head[0].in_features}-d embeddings but the CLIP {clip} "
                       f"gives {encoder.model.config.projection_dim}-d ones")
    return AestheticScorer(encoder, head)


# ------------------------------------------------------------------ HPS v2 (open_clip checkpoint)

_OPEN_CLIP_TOP = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_OPEN_CLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                    "attn.out_proj": "self_attn.out_proj"}
_OPEN_CLIP_BLOCK_KEY = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)")


def open_clip_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict (what HPS v2 ships) under transformers' CLIPModel names."""
    out = {}
    for key, value in state.items():
        if key in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[key]] = value.reshape(()) if key == "logit_scale" else value
        elif key in ("visual.proj", "text_projection"):  # open_clip computes x @ proj; nn.Linear keeps proj.T
            out["visual_projection.weight" if key == "visual.proj" else "text_projection.weight"] = value.T
        elif m := _OPEN_CLIP_BLOCK_KEY.fullmatch(key):
            prefix = f"{'vision_model' if m[1] else 'text_model'}.encoder.layers.{m[2]}."
            if m[3] == "attn.in_proj":  # one fused q/k/v projection in nn.MultiheadAttention
                for name, part in zip("qkv", value.chunk(3)):
                    out[f"{prefix}self_attn.{name}_proj.{m[4]}"] = part
            elif m[3] in _OPEN_CLIP_BLOCK:
                out[f"{prefix}{_OPEN_CLIP_BLOCK[m[3]]}.{m[4]}"] = value
            else:
                out[key] = value  # left unconverted so that loading reports it
        elif key != "attn_mask":  # the causal mask is a buffer, not a weight
            out[key] = value
    return out


def hpsv2(weights: str | None, device: str, base: str = CLIP_H14) -> ClipScorer:
    """HPS v2.1 = ViT-H/14 fine-tuned on human preferences; the architecture comes from `base`'s config."""
    from transformers import CLIPConfig, CLIPModel

    path = _weights_file(weights, HPSV2, "hpsv2")
    hint = f"download its config and tokenizer (`hf download {base} --include '*.json' '*.txt'`) or pass base=..."
    model = CLIPModel(_pretrained(CLIPConfig, base, "HPS v2 architecture (CLIP config)", hint))
    _load_strict(model, open_clip_to_transformers(_load_state_dict(path, "hpsv2")), f"open_clip {base}", path)
    return clip_scorer("hpsv2", model, base, cosine, device, hint)


# ------------------------------------------------------------------ ImageReward (BLIP checkpoint)

_BLIP_VIT_TOP = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_BLIP_VIT_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                   "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def blip_to_transformers(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """ImageReward's state dict split into (vision, text, head) states under transformers' BLIP names."""
    vision, text, head = {}, {}, {}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            k = key.removeprefix("blip.visual_encoder.")
            m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", k)
            if k in _BLIP_VIT_TOP:
                vision[_BLIP_VIT_TOP[k]] = value
            elif m and m[2] in _BLIP_VIT_BLOCK:
                vision[f"encoder.layers.{m[1]}.{_BLIP_VIT_BLOCK[m[2]]}.{m[3]}"] = value
            else:
                vision[k] = value
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            # transformers' BLIP text model is a port of BLIP's med.py: the names are the same.
            text[key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            head[key.removeprefix("mlp.")] = value
    return vision, text, head


def _count(state: dict, pattern: str) -> int:
    return len({m.group(1) for k in state if (m := re.match(pattern, k))})


def blip_configs(vision: dict, text: dict):
    """Vision and text configs read off the tensors' shapes (BLIP uses 64-wide heads in both towers)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    width = vision["embeddings.class_embedding"].shape[-1]
    patch = vision["embeddings.patch_embedding.weight"].shape[-1]
    grid = math.isqrt(vision["embeddings.position_embedding"].shape[1] - 1)
    vision_config = BlipVisionConfig(
        hidden_size=width, intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count(vision, r"encoder\.layers\.(\d+)\."), num_attention_heads=max(1, width // 64),
        image_size=grid * patch, patch_size=patch, layer_norm_eps=1e-6, hidden_act="gelu")
    hidden = text["embeddings.word_embeddings.weight"].shape[1]
    text_config = BlipTextConfig(
        vocab_size=text["embeddings.word_embeddings.weight"].shape[0], hidden_size=hidden,
        encoder_hidden_size=text["encoder.layer.0.crossattention.self.key.weight"].shape[1],
        intermediate_size=text["encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=_count(text, r"encoder\.layer\.(\d+)\."), num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=text["embeddings.position_embeddings.weight"].shape[0], layer_norm_eps=1e-12,
        hidden_act="gelu", is_decoder=True,  # is_decoder gives every layer its cross-attention to the image
        pad_token_id=0, bos_token_id=None, eos_token_id=None, sep_token_id=None)
    return vision_config, text_config


class ImageRewardScorer(BatchedScorer):
    """ImageReward: the prompt's [CLS] token after cross-attending to BLIP image tokens, through an MLP."""

    name = "imagereward"

    def __init__(self, vision, text, head: nn.Sequential, tokenizer, device: str):
        self.vision, self.text = vision.to(device).eval(), text.to(device).eval()
        self.head, self.tokenizer, self.device = head.to(device), tokenizer, device
        self.image_size = vision.config.image_size

    def _score_batch(self, images: np.ndarray, prompts: list[str]) -> torch.Tensor:
        pixels = clip_pixels(images, self.image_size, OPENAI_MEAN, OPENAI_STD, self.device)
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state
        text = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=IMAGEREWARD_MAX_TOKENS,
                              return_tensors="pt").to(self.device)
        out = self.text(input_ids=text.input_ids, attention_mask=text.attention_mask,
                        encoder_hidden_states=image_tokens,
                        encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long, device=self.device))
        reward = self.head(out.last_hidden_state[:, 0]).squeeze(-1)
        return (reward - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def imagereward(weights: str | None, device: str, tokenizer: str = BERT) -> ImageRewardScorer:
    from transformers import AutoTokenizer, BlipTextModel, BlipVisionModel

    path = _weights_file(weights, IMAGEREWARD, "imagereward")
    vision, text, head = blip_to_transformers(_load_state_dict(path, "imagereward"))
    try:
        vision_config, text_config = blip_configs(vision, text)
        head_module = linear_stack(head, "layers.")
    except KeyError as exc:
        raise SPOError(f"{path} is not an ImageReward checkpoint (no {exc.args[0]})") from None
    vision_model, text_model = BlipVisionModel(vision_config), BlipTextModel(text_config, add_pooling_layer=False)
    _load_strict(vision_model, vision, "ImageReward vision encoder", path)
    _load_strict(text_model, text, "ImageReward text encoder", path)
    hint = f"download it (`hf download {tokenizer}`) or pass tokenizer=... to the imagereward scorer"
    return ImageRewardScorer(vision_model, text_model, head_module,
                             _pretrained(AutoTokenizer, tokenizer, "ImageReward tokenizer", hint), device)


SCORERS: dict[str, Callable[..., Scorer]] = {  # the core's; see `registry` for every scorer
    "pickscore": pickscore,
    "clipscore": clipscore,
    "aesthetic": aesthetic,
    "hpsv2": hpsv2,
    "imagereward": imagereward,
}
