"""`spo push`: hand a run's LoRA folder on through the Hugging Face hub."""

from __future__ import annotations

import re
from pathlib import Path

from spo.errors import SPOError
from spo.lora import LORA_WEIGHTS

# What a LoRA folder of `spo train` holds and a hub repository needs: the weights, the model card, the
# base model and recipe (spo_lora.json) and the full training config.
PUSHED = (LORA_WEIGHTS, "README.md", "spo_lora.json", "training_config.yaml")


def lora_folder(run_dir: str | Path) -> Path:
    """RUN_DIR/lora, or RUN_DIR itself when it is a LoRA folder."""
    run_dir = Path(run_dir)
    for folder in (run_dir / "lora", run_dir):
        if (folder / "spo_lora.json").is_file():
            return folder
    if (run_dir / "pipeline").is_dir():
        raise SPOError(f"{run_dir} is a full fine-tuning run; spo push uploads LoRA folders (upload {run_dir}/pipeline "
                       f"with `hf upload`)")
    raise SPOError(f"{run_dir} holds no LoRA folder (lora/spo_lora.json); give the log.output_dir of a finished "
                   f"spo train run")


def files_to_push(folder: Path) -> list[str]:
    """The files of `folder` to upload, after checking that all are there and the weights are finite."""
    from safetensors.torch import load_file

    missing = [name for name in PUSHED if not (folder / name).is_file()]
    if missing:
        raise SPOError(f"{folder} lacks {', '.join(missing)}; train again with this version of spo, which writes "
                       f"the model card and recipe into the LoRA folder")
    weights = load_file(str(folder / LORA_WEIGHTS))
    bad = [name for name, t in weights.items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise SPOError(f"{folder / LORA_WEIGHTS} holds NaN/inf ({len(bad)} tensors, e.g. {bad[0]}); push the LoRA "
                       f"of a good run instead")
    return list(PUSHED)


def push_lora(run_dir: str | Path, repo_id: str, private: bool = False,
              dry_run: bool = False) -> tuple[Path, list[str]]:
    """Upload a run's LoRA folder to the hub model repository `repo_id` (created if needed); returns the folder
    and the files uploaded. `dry_run` checks everything and uploads nothing (no network)."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise SPOError(f"the hub repository must be USER/NAME (e.g. --repo-id alice/spo-sd15-lora), got {repo_id!r}")
    folder = lora_folder(run_dir)
    files = files_to_push(folder)
    if dry_run:
        return folder, files
    import huggingface_hub

    try:
        huggingface_hub.create_repo(repo_id, private=private, exist_ok=True)
        huggingface_hub.upload_folder(repo_id=repo_id, folder_path=str(folder), allow_patterns=files,
                                      commit_message=f"Upload SPO LoRA from {folder.parent.name}")
    except Exception as exc:  # network, login, permissions: the message says which; the LoRA is safe on disk
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SPOError(f"uploading {folder} to {repo_id} failed ({reason}); log in with `hf auth login` and retry "
                       f"with: spo push {run_dir} --repo-id {repo_id}") from None
    return folder, files
