"""Reading the LoRA folders `spo train` writes: start a new run from one (`model.init_lora`)."""

from __future__ import annotations

import json
from pathlib import Path

from spo.errors import SPOError

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file name diffusers' save_lora_weights uses


def lora_info(folder: Path) -> dict | None:
    """The spo_lora.json that `spo train` writes next to a LoRA (None for a LoRA from elsewhere); a damaged
    one is refused, since the family and base model read from it decide how the LoRA is applied."""
    path = Path(folder) / "spo_lora.json"
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        info = None
    if not isinstance(info, dict):
        raise SPOError(f"{path} is corrupt (not a JSON object); restore it from the run, or delete it to load "
                       f"the LoRA weights without it")
    return info


def check_init_lora(model_cfg) -> Path:
    """model.init_lora is a LoRA folder of `spo train` for this base model, rank, alpha and targets (checked
    before any work, so a mismatch never costs a model load)."""
    m = model_cfg
    folder = Path(m.init_lora)
    if not (folder / LORA_WEIGHTS).is_file() or not (folder / "spo_lora.json").is_file():
        raise SPOError(f"model.init_lora={m.init_lora} is not a LoRA folder of spo train (it needs {LORA_WEIGHTS} "
                       f"and spo_lora.json); give a run's lora/ folder")
    info = lora_info(folder)
    if info.get("rank") != m.lora_rank or float(info.get("alpha", -1)) != m.lora_alpha:
        raise SPOError(f"model.init_lora={folder} has rank {info.get('rank')} and alpha {info.get('alpha')}; set "
                       f"model.lora_rank={info.get('rank')} model.lora_alpha={info.get('alpha')}")
    base = info.get("base_model")
    if base is not None and not same_model(base, m.pretrained):
        raise SPOError(f"model.init_lora={folder} was trained on {base}, not on model.pretrained={m.pretrained}; "
                       f"start from a LoRA of this base model or set model.pretrained={base}")
    targets = saved_targets(folder)
    if targets is not None and sorted(targets) != sorted(m.lora_targets):
        raise SPOError(f"model.init_lora={folder} adapts {','.join(targets)}, not model.lora_targets="
                       f"{','.join(m.lora_targets)}; set model.lora_targets={','.join(targets)}")
    return folder


def same_model(a: str, b: str) -> bool:
    """Two names of one base model: equal, or the same folder ("world:sd" and the path it resolves to)."""
    from spo.plugins import resolve

    if a == b:
        return True
    pa, pb = Path(resolve(a)), Path(resolve(b))
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def saved_targets(folder: Path) -> list[str] | None:
    """The lora_targets of the run that wrote the folder (its training_config.yaml), if it kept one."""
    import yaml

    path = folder / "training_config.yaml"
    if not path.is_file():
        return None
    return list((yaml.safe_load(path.read_text()) or {}).get("model", {}).get("lora_targets") or []) or None


def load_lora_into(unet, folder: Path) -> None:
    """Copy a LoRA folder's weights into the UNet's freshly added adapters (the `default` adapter), the way
    diffusers' training scripts reload theirs; every tensor must find its adapter, with the same shape."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(Path(folder) / LORA_WEIGHTS))
    # The network's keys carry the pipeline component's name: unet. (SD, SDXL) or transformer. (SD3, FLUX).
    prefix = "transformer." if any(k.startswith("transformer.") for k in saved) else "unet."
    saved = convert_unet_state_dict_to_peft({k.removeprefix(prefix): v for k, v in saved.items()
                                             if k.startswith(prefix)})
    fresh = get_peft_model_state_dict(unet)
    mismatched = sorted(set(saved) ^ set(fresh)) or [k for k in fresh if saved[k].shape != fresh[k].shape]
    if mismatched:
        raise SPOError(f"model.init_lora={folder} does not fit this UNet's adapters ({len(mismatched)} tensors "
                       f"differ, e.g. {mismatched[0]}); use the base model, rank and lora_targets it was trained with")
    set_peft_model_state_dict(unet, saved, adapter_name="default")
