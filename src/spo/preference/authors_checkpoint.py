"""The step-aware preference models released with the paper (RockeyCoss/SPO), as `StepAwareCLIP`s.

Their time-conditioned CLIP and ours are the same function up to names and one reparameterisation:

    theirs (state dict, after the wrapper's `model.` prefix)   ours (`StepAwareCLIP.conditioning`)
    t_embedder.mlp.{0,2}.{weight,bias}                         embed.{0,2}.{weight,bias}
    vision_model.encoder.layers.<i>.adaLN_modulation.1.*       blocks.<i>.1.*
    vision_model.adaLN_modulation.1.*                          pooled.1.*
    everything else (text_model.*, vision_model.*, ...)        clip.* (the CLIPModel), unchanged

Both embed t with 256 sinusoidal features [cos, sin] (max period 10000) and an MLP
Linear(256, D) -> SiLU -> Linear(D, D), shared by all blocks; each vision block gets
SiLU -> Linear(D, 6D) chunked as (shift, scale, gate) for attention then MLP, modulating the layer
norm output as x * (1 + scale) + shift; the pooled, post-layernorm CLS feature gets
SiLU -> Linear(D, 2D) -> (shift, scale) before the visual projection. The one difference: their
residual branches are multiplied by `gate` (bias initialised to 1), ours by `1 + gate` (initialised
to 0), so the converter subtracts 1 from the gate biases (chunks 2 and 5 of 6).

Their released files carry no config, tokenizer or image processor; they load on top of
yuvalkirstain/PickScore_v1 (the architecture) with laion/CLIP-ViT-H-14-laion2B-s32B-b79K's
processor, and score as `get_preference_score` does, which `SPMConfig.preprocessing="authors"`
reproduces. See `spo.preference.judges.load_scorer_model` for the ways to name them.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from spo.errors import SPOError
from spo.preference.spm import SPM_CONFIG, SPMConfig, StepAwareCLIP, _load_tokenizer

AUTHORS_PREFIX = "authors:"
DEFAULT_BASE = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
RELEASED_NAMES = ("sd-v1-5_step-aware_preference_model.bin", "sdxl_step-aware_preference_model.bin", "final_ckpt.bin")
CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")
DOWNLOAD_HINT = "https://huggingface.co/SPO-Diffusion-Models/Step-Aware_Preference_Models"

_EMBED = "t_embedder.mlp."
_BLOCK = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.adaLN_modulation\.1\.(weight|bias)")
_POOLED = re.compile(r"vision_model\.adaLN_modulation\.1\.(weight|bias)")
_BUFFER = re.compile(r"(^|\.)position_ids$")  # buffers older transformers saved; rebuilt by the model


# ---------------------------------------------------------------- where the files are


def locate(path, base=None, processor=None) -> tuple[Path, str, str] | None:
    """(checkpoint file, base, processor) when `path` names an authors' checkpoint, else None.

    "authors:FILE_OR_DIR" must name one (SPOError otherwise); a bare path names one when it is a
    file, or a directory without `config.json`/`spm_config.json` that holds a checkpoint file.
    """
    from spo.plugins import resolve

    text = str(path)
    explicit = text.startswith(AUTHORS_PREFIX)
    if explicit:
        text = text[len(AUTHORS_PREFIX):]
        if not text:
            raise SPOError(f"'{AUTHORS_PREFIX}' needs a path after it, e.g. "
                           f"{AUTHORS_PREFIX}model_ckpts/sd-v1-5_step-aware_preference_model.bin")
    target = Path(resolve(text))
    if target.is_file():
        ckpt, here = target, target.parent
    elif target.is_dir() and not (target / "config.json").is_file() and not (target / SPM_CONFIG).is_file():
        ckpt, here = _checkpoint_in(target), target
        if ckpt is None:
            if explicit:
                raise SPOError(f"{target} holds no authors' SPM checkpoint (one of {', '.join(RELEASED_NAMES)} or a "
                               f"single {'/'.join(CHECKPOINT_SUFFIXES)} file); download one from {DOWNLOAD_HINT}")
            return None
    elif explicit and target.is_dir():
        raise SPOError(f"{target} is a CLIP/SPM directory, not an authors' SPM checkpoint; give the checkpoint "
                       f"file after '{AUTHORS_PREFIX}', or drop the prefix to load this directory")
    elif explicit:
        raise SPOError(f"{target}: no such file or directory; download the authors' SPM checkpoint from "
                       f"{DOWNLOAD_HINT} and give its path after '{AUTHORS_PREFIX}'")
    else:
        return None

    if base is not None:
        base = resolve(str(base))
    elif (here / "base").is_dir():
        base = str(here / "base")
    else:
        base = DEFAULT_BASE
    if processor is not None:
        processor = resolve(str(processor))
    elif (here / "processor").is_dir():
        processor = str(here / "processor")
    elif base != DEFAULT_BASE and (Path(base) / "preprocessor_config.json").is_file():
        processor = base  # a local PickScore copy saved together with its processor
    else:
        processor = DEFAULT_PROCESSOR
    return ckpt, base, processor


def _checkpoint_in(directory: Path) -> Path | None:
    released = [directory / n for n in RELEASED_NAMES if (directory / n).is_file()]
    if len(released) == 1:
        return released[0]
    candidates = released or sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates[:4])
        raise SPOError(f"{directory} holds several checkpoint files ({names}); name the one to load as "
                       f"{AUTHORS_PREFIX}{directory}/<file>")
    return candidates[0] if candidates else None


# ---------------------------------------------------------------- the state dict


def read_state_dict(file: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an authors' checkpoint, keys without the `model.` (and DeepSpeed `module.`) prefix."""
    file = Path(file)
    if not file.is_file():
        raise SPOError(f"{file}: no such file; download the authors' SPM checkpoint from {DOWNLOAD_HINT}")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and safetensors all raise their own types
        first = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
        raise SPOError(f"{file} is not a readable PyTorch state dict ({first}); expected the authors' SPM "
                       f"checkpoint (.bin from {DOWNLOAD_HINT})") from None
    for wrapper in ("module", "state_dict"):  # a DeepSpeed or Lightning-style wrapping, should one appear
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict) and len(state) <= 2:
            state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise SPOError(f"{file} does not hold a state dict of tensors; expected the authors' SPM checkpoint "
                       f"(.bin from {DOWNLOAD_HINT})")
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.").removeprefix("model.")
        out[key] = value
    return out


def convert_state_dict(state: dict[str, torch.Tensor], source: str = "the checkpoint"):
    """Authors' keys -> (CLIPModel state dict, `TimeConditioning` state dict), gates re-offset."""
    clip, conditioning = {}, {}
    for key, value in state.items():
        if _BUFFER.search(key):
            continue
        if key.startswith(_EMBED):
            conditioning["embed." + key[len(_EMBED):]] = value
        elif match := _BLOCK.fullmatch(key):
            layer, kind = match.groups()
            if kind == "bias":  # their branch is scaled by gate, ours by 1 + gate
                value = value.detach().clone()
                d = value.numel() // 6
                value[2 * d : 3 * d] -= 1
                value[5 * d :] -= 1
            conditioning[f"blocks.{layer}.1.{kind}"] = value
        elif match := _POOLED.fullmatch(key):
            conditioning[f"pooled.1.{match.group(1)}"] = value
        else:
            clip[key] = value
    if "embed.0.weight" not in conditioning:
        raise SPOError(f"{source} has no timestep embedder (model.t_embedder.mlp.*): it is not a step-aware "
                       "preference model from RockeyCoss/SPO (a plain CLIP/PickScore loads from its directory, "
                       "not from a state dict)")
    return clip, conditioning


# ---------------------------------------------------------------- the model


def load_authors_spm(checkpoint: str | Path, base: str = DEFAULT_BASE,
                     processor: str = DEFAULT_PROCESSOR) -> StepAwareCLIP:
    """The authors' checkpoint as a `StepAwareCLIP` (preprocessing="authors"), in eval mode.

    `base` only gives the CLIP architecture (its config.json); every weight comes from the
    checkpoint, which holds the whole fine-tuned model.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    checkpoint = Path(checkpoint)
    clip_state, cond_state = convert_state_dict(read_state_dict(checkpoint), str(checkpoint))
    fix = (f"put a copy of {DEFAULT_BASE} in base/ next to the checkpoint (and {DEFAULT_PROCESSOR} in "
           "processor/) or pass base=/processor=")
    try:
        clip_config = CLIPConfig.from_pretrained(base)
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:160]
        raise SPOError(f"could not read the CLIP config of the base {base} ({reason}); {fix}") from None
    try:
        image_processor = CLIPImageProcessor.from_pretrained(processor)
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:160]
        raise SPOError(f"could not load the image processor from {processor} ({reason}); {fix}") from None
    tokenizer = _load_tokenizer(processor)

    clip = CLIPModel(clip_config)
    expected = set(clip.state_dict())
    missing, unexpected = sorted(expected - set(clip_state)), sorted(set(clip_state) - expected)
    if missing or unexpected:
        what = "; ".join(f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                         for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys)
        raise SPOError(f"{checkpoint} does not fit the CLIP of {base} ({what}); pass the base it was trained "
                       f"from ({DEFAULT_BASE} for the released checkpoints)")
    try:
        clip.load_state_dict(clip_state)
    except RuntimeError as exc:
        raise SPOError(f"{checkpoint} does not fit the CLIP of {base} ({_first_mismatch(exc)}); pass the base it "
                       f"was trained from ({DEFAULT_BASE} for the released checkpoints)") from None

    freq_dim = cond_state["embed.0.weight"].shape[1]
    if freq_dim % 2:
        raise SPOError(f"{checkpoint} embeds timesteps with {freq_dim} (odd) sinusoidal features; "
                       "only even counts are supported")
    size = _shortest_edge(image_processor)  # their img_size: size["shortest_edge"], then a square crop
    config = SPMConfig(base_model=str(base), processor=str(processor), time_conditioned=True, freq_dim=int(freq_dim),
                       image_size=size, image_mean=tuple(image_processor.image_mean),
                       image_std=tuple(image_processor.image_std), preprocessing="authors")
    model = StepAwareCLIP(clip, tokenizer, config)
    expected = set(model.conditioning.state_dict())
    missing, unexpected = sorted(expected - set(cond_state)), sorted(set(cond_state) - expected)
    if missing or unexpected:
        keys = [f"missing {k}" for k in missing[:2]] + [f"unexpected {k}" for k in unexpected[:2]]
        blocks = len(clip.vision_model.encoder.layers)
        raise SPOError(f"{checkpoint}: its time conditioning does not fit the {blocks}-block vision tower of {base} "
                       f"({', '.join(keys)}); pass the base it was trained from")
    try:
        model.conditioning.load_state_dict(cond_state)
    except RuntimeError as exc:
        raise SPOError(f"{checkpoint}: its time conditioning does not fit {base} ({_first_mismatch(exc)}); "
                       "pass the base it was trained from") from None
    return model.eval()


def _shortest_edge(image_processor) -> int:
    for field, key in (("size", "shortest_edge"), ("crop_size", "height")):
        value = getattr(image_processor, field, None)
        if isinstance(value, int):
            return value
        try:  # a dict, or transformers 5's SizeDict
            found = value[key]
        except (KeyError, TypeError):
            found = getattr(value, key, None)
        if found:
            return int(found)
    raise SPOError(f"the image processor {type(image_processor).__name__} gives no image size (size.shortest_edge)")


def _first_mismatch(exc: RuntimeError) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
    return (lines[0] if lines else str(exc).splitlines()[0])[:200]
