"""The step-aware preference model (SPM): a CLIP/PickScore whose vision tower knows the timestep.

Every vision transformer block is modulated DiT-style (adaLN): a sinusoidal embedding of t goes
through an MLP, and per block a zero-initialised linear layer gives shift, scale and gate for the
attention and the MLP branch; one more modulates the pooled image feature. Zero initialisation
makes the model score exactly like the CLIP it starts from until training moves it.

Saved format (a directory): the CLIP weights and processor files as `CLIPModel.save_pretrained`
writes them, plus `spm.safetensors` (the conditioning weights) and `spm_config.json` (what it was
built from and how). `StepAwareCLIP.from_pretrained(dir)` reads it back.

The checkpoints released with the paper (RockeyCoss/SPO) have the same architecture up to naming and
the offset of the residual gates; `spo.preference.authors_checkpoint` maps them onto this class and
`spo.preference.judges.load_scorer_model` accepts them (see its docstring).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from spo.errors import SPOError

SPM_CONFIG = "spm_config.json"
SPM_WEIGHTS = "spm.safetensors"
SPM_FORMAT = 1


@dataclass
class SPMConfig:
    base_model: str  # the CLIP checkpoint it started from (hub id or path)
    processor: str  # where the image processor / tokenizer came from
    time_conditioned: bool = True  # False: the ablation without timestep conditioning
    freq_dim: int = 256  # sinusoidal features of the timestep
    num_train_timesteps: int = 1000
    image_size: int = 224
    image_mean: tuple = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple = (0.26862954, 0.26130258, 0.27577711)
    format: int = SPM_FORMAT
    # How images are brought to model resolution before scoring. "spo": antialiased bicubic resize
    # (spo.images.resize_center_crop). "authors": as RockeyCoss/SPO scores, bicubic without
    # antialiasing, sizes int(x + 0.5), torchvision-style centre crop, clamp to [0, 1] afterwards.
    # Written to spm_config.json only when not "spo", so files of "spo" models are unchanged.
    preprocessing: str = "spo"


PREPROCESSING = ("spo", "authors")
_OMIT_WHEN_DEFAULT = {"preprocessing": "spo"}  # fields added after format 1: saved only when set


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (float) timesteps, as in DDPM/DiT: [cos(t f_i), sin(t f_i)]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def zero_linear(d_in: int, d_out: int) -> nn.Linear:
    """A linear layer that starts at zero, so a new conditioning path changes nothing until it is trained."""
    layer = nn.Linear(d_in, d_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class TimeConditioning(nn.Module):
    """t -> per-block (shift, scale, gate) x 2 and a pooled-feature (shift, scale); all zero at init."""

    def __init__(self, hidden: int, num_blocks: int, freq_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.embed = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList([nn.Sequential(nn.SiLU(), zero_linear(hidden, 6 * hidden)) for _ in range(num_blocks)])
        self.pooled = nn.Sequential(nn.SiLU(), zero_linear(hidden, 2 * hidden))

    def forward(self, t: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        c = self.embed(timestep_features(t, self.freq_dim).to(self.embed[0].weight.dtype))
        return [block(c) for block in self.blocks], self.pooled(c)


class StepAwareCLIP(nn.Module):
    def __init__(self, clip, tokenizer, config: SPMConfig):
        super().__init__()
        if config.preprocessing not in PREPROCESSING:
            raise SPOError(f"SPM preprocessing {config.preprocessing!r} is unknown; use one of {', '.join(PREPROCESSING)}")
        self.clip, self.tokenizer, self.config = clip, tokenizer, config
        vision = clip.vision_model
        hidden = vision.config.hidden_size
        self.conditioning = (
            TimeConditioning(hidden, len(vision.encoder.layers), config.freq_dim) if config.time_conditioned else None
        )
        self.register_buffer("image_mean", torch.tensor(config.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(config.image_std).view(1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------ construction and files

    @classmethod
    def from_base(cls, clip_path: str | Path, processor_path: str | Path | None = None, time_conditioned: bool = True,
                  **kwargs) -> "StepAwareCLIP":
        """Start from any CLIPModel checkpoint (e.g. yuvalkirstain/PickScore_v1 with the
        laion/CLIP-ViT-H-14-laion2B-s32B-b79K processor)."""
        from transformers import CLIPImageProcessor, CLIPModel

        processor_path = processor_path or clip_path
        clip = _load(CLIPModel, clip_path, "CLIP model")
        tokenizer = _load_tokenizer(processor_path)
        image_processor = _load(CLIPImageProcessor, processor_path, "CLIP image processor")
        crop = image_processor.crop_size
        size = int(crop["height"]) if not isinstance(crop, int) else crop
        config = SPMConfig(base_model=str(clip_path), processor=str(processor_path), time_conditioned=time_conditioned,
                           image_size=size, image_mean=tuple(image_processor.image_mean),
                           image_std=tuple(image_processor.image_std),
                           **kwargs)
        return cls(clip, tokenizer, config)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "StepAwareCLIP":
        from safetensors.torch import load_file
        from transformers import CLIPModel

        path = Path(path)
        if not (path / SPM_CONFIG).is_file():
            raise SPOError(f"{path} is not a saved step-aware preference model (no {SPM_CONFIG}); "
                           "train one with `spo train-spm` or start from a CLIP with --base")
        hint = "copy the folder again or retrain it with `spo train-spm`"
        try:
            raw = json.loads((path / SPM_CONFIG).read_text(encoding="utf-8"))
            if raw.get("format") != SPM_FORMAT:
                raise SPOError(f"{path / SPM_CONFIG} has format {raw.get('format')}, this version reads {SPM_FORMAT}")
            config = SPMConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        except (ValueError, TypeError, AttributeError) as exc:  # not JSON, not an object, or unknown fields
            raise SPOError(f"{path / SPM_CONFIG} is corrupt ({' '.join(str(exc).split())[:120]}); {hint}") from None
        model = cls(_load(CLIPModel, path, "CLIP model"), _load_tokenizer(path), config)
        if model.conditioning is not None:
            try:
                model.conditioning.load_state_dict(load_file(str(path / SPM_WEIGHTS)))
            except (OSError, RuntimeError, SafetensorError) as exc:  # missing, truncated, or other shapes
                raise SPOError(f"could not load {path / SPM_WEIGHTS} ({' '.join(str(exc).split())[:120]}); "
                               f"{hint}") from None
        return model

    def save_pretrained(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.clip.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        _processor_for(self.config).save_pretrained(path)
        if self.conditioning is not None:
            state = {k: v.detach().contiguous().cpu() for k, v in self.conditioning.state_dict().items()}
            save_file(state, str(path / SPM_WEIGHTS))
        raw = {k: v for k, v in asdict(self.config).items() if _OMIT_WHEN_DEFAULT.get(k, object()) != v}
        (path / SPM_CONFIG).write_text(json.dumps(raw, indent=2))

    # ------------------------------------------------------------ scoring

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] at any size -> CLIP pixel values (resize shortest side, centre crop, normalise)."""
        if self.config.preprocessing == "authors":
            x = (_authors_resize_center_crop(images.float(), self.config.image_size) / 2 + 0.5).clamp(0, 1)
        else:
            from spo.images import resize_center_crop

            x = resize_center_crop((images.float() + 1) / 2, self.config.image_size)
        return (x - self.image_mean) / self.image_std

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(self.image_mean.device)

    def text_embeds(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.clip.text_model(input_ids=input_ids).pooler_output
        return F.normalize(self.clip.text_projection(out), dim=-1)

    def image_embeds(self, pixel_values: torch.Tensor, timesteps: torch.Tensor | None) -> torch.Tensor:
        vision = self.clip.vision_model
        x = vision.pre_layrnorm(vision.embeddings(pixel_values.to(vision.embeddings.patch_embedding.weight.dtype)))
        block_mods, pooled_mod = (None, None)
        if self.conditioning is not None:
            if timesteps is None:
                raise ValueError("a time-conditioned SPM needs timesteps (use 0 for clean images)")
            block_mods, pooled_mod = self.conditioning(timesteps.to(x.device).expand(len(x)))
        for i, layer in enumerate(vision.encoder.layers):
            if block_mods is None:
                shift1 = scale1 = gate1 = shift2 = scale2 = gate2 = 0.0
            else:
                shift1, scale1, gate1, shift2, scale2, gate2 = block_mods[i].unsqueeze(1).chunk(6, dim=-1)
            h = layer.layer_norm1(x) * (1 + scale1) + shift1
            h, _ = layer.self_attn(hidden_states=h, attention_mask=None)
            x = x + (1 + gate1) * h
            h = layer.layer_norm2(x) * (1 + scale2) + shift2
            x = x + (1 + gate2) * layer.mlp(h)
        pooled = vision.post_layernorm(x[:, 0])
        if pooled_mod is not None:
            shift, scale = pooled_mod.chunk(2, dim=-1)
            pooled = pooled * (1 + scale) + shift
        return F.normalize(self.clip.visual_projection(pooled), dim=-1)

    def forward(self, images: torch.Tensor, text: list[str] | torch.Tensor, timesteps=None) -> torch.Tensor:
        """Logits logit_scale * cos(text, image) for images in [-1, 1] at timesteps t (0 = clean)."""
        input_ids = self.tokenize(text) if isinstance(text, (list, tuple)) else text
        if timesteps is not None and not torch.is_tensor(timesteps):
            timesteps = torch.tensor(timesteps, device=images.device)
        if timesteps is not None:
            timesteps = timesteps.reshape(-1)
        img = self.image_embeds(self.preprocess(images), timesteps)
        txt = self.text_embeds(input_ids)
        return self.clip.logit_scale.exp() * (img * txt).sum(-1)

    score = forward


def _authors_resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The resize of RockeyCoss/SPO's scorer: shortest side to `size` by bicubic interpolation
    without antialiasing (sizes rounded as int(x + 0.5)), then, only if the result is not square,
    a centre crop with offsets int(round((n - size) / 2)) as torchvision's CenterCrop takes them."""
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False)
    if nh != nw:
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        x = x[..., top : top + size, left : left + size]
    return x


def _processor_for(config: SPMConfig):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": config.image_size},
                              crop_size={"height": config.image_size, "width": config.image_size},
                              image_mean=list(config.image_mean), image_std=list(config.image_std))


def _load(cls, path, what: str):
    try:
        return cls.from_pretrained(path)
    except (OSError, ValueError, SafetensorError) as exc:  # missing files, bad JSON, truncated weights
        raise SPOError(f"could not load the {what} from {path}: {str(exc).splitlines()[0][:200]}") from None


def _load_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise SPOError(f"could not load a tokenizer from {path}: {str(exc).splitlines()[0][:200]}") from None
