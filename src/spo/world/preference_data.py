"""Preference pairs in the Pick-a-Pic v1 schema, sampled from the world's diffusion model.

Columns follow `yuvalkirstain/pickapic_v1` (caption, jpg_0, jpg_1 as JPEG bytes, label_0, label_1,
ids, model names, best_image_uid, has_label, are_different); the world adds `utility_0` and
`utility_1`, the ground truth behind the simulated labels, so label-noise ceilings can be measured.
Each split is one parquet file, `<split>.parquet`, so `datasets.load_dataset(<dir>)` finds all three.
"""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spo.images import to_uint8
from spo.world import scenes
from spo.world.common import to_model_range
from spo.world.labels import simulate_labels
from spo.world.sampling import sample_images
from spo.world.utility import utilities

COLUMNS = ("ranking_id", "user_id", "caption", "jpg_0", "jpg_1", "label_0", "label_1", "image_0_uid",
           "image_1_uid", "model_0", "model_1", "best_image_uid", "has_label", "are_different",
           "num_example_per_prompt", "utility_0", "utility_1")


def jpeg_bytes(image: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8)


def generate_pairs(pipe, prompt_pool: list[str], n_pairs: int, cfg, seed: int) -> dict[str, list]:
    """Sample two images per prompt (independent seeds and guidance scales) and label them."""
    rng = np.random.default_rng(seed)
    captions = [prompt_pool[i] for i in rng.integers(len(prompt_pool), size=n_pairs)]
    guidance = rng.choice(cfg.guidance_scales, size=(n_pairs, 2))
    images = np.zeros((n_pairs, 2, scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3), np.float32)
    for g in cfg.guidance_scales:
        for side in (0, 1):
            where = np.flatnonzero(guidance[:, side] == g)
            if len(where):
                images[where, side] = sample_images(
                    pipe, [captions[i] for i in where], float(g), cfg.sample_steps, cfg.eta,
                    seed=seed + 100_000 * side + int(g * 1000) * 7, desc=f"pairs cfg={g} side={side}")
    jpgs = [[jpeg_bytes(images[i, s]) for i in range(n_pairs)] for s in (0, 1)]
    # Humans see the JPEGs, so the ground truth is computed on what they see.
    flat = np.stack([decode_image(b) for s in (0, 1) for b in jpgs[s]])
    u = utilities(flat, captions + captions).reshape(2, n_pairs)
    label_0, label_1 = simulate_labels(u[0], u[1], cfg.labels, rng)
    uid = lambda: str(uuid.UUID(int=int(rng.integers(0, 2**63))))  # noqa: E731  (deterministic ids)
    uids = [[uid() for _ in range(n_pairs)] for _ in (0, 1)]
    return dict(
        ranking_id=list(range(n_pairs)), user_id=[int(x) for x in rng.integers(0, 50, n_pairs)],
        caption=captions, jpg_0=jpgs[0], jpg_1=jpgs[1], label_0=label_0.tolist(), label_1=label_1.tolist(),
        image_0_uid=uids[0], image_1_uid=uids[1],
        model_0=[f"world-sd/cfg{g:g}" for g in guidance[:, 0]], model_1=[f"world-sd/cfg{g:g}" for g in guidance[:, 1]],
        best_image_uid=[uids[0][i] if label_0[i] > 0.5 else uids[1][i] if label_0[i] < 0.5 else "" for i in range(n_pairs)],
        has_label=[True] * n_pairs, are_different=[True] * n_pairs, num_example_per_prompt=[1] * n_pairs,
        utility_0=u[0].tolist(), utility_1=u[1].tolist(),
    )


def write_split(rows: dict[str, list], directory: Path, split: str) -> Path:
    import datasets

    features = datasets.Features({
        "ranking_id": datasets.Value("int64"), "user_id": datasets.Value("int64"), "caption": datasets.Value("string"),
        "jpg_0": datasets.Value("binary"), "jpg_1": datasets.Value("binary"),
        "label_0": datasets.Value("float64"), "label_1": datasets.Value("float64"),
        "image_0_uid": datasets.Value("string"), "image_1_uid": datasets.Value("string"),
        "model_0": datasets.Value("string"), "model_1": datasets.Value("string"),
        "best_image_uid": datasets.Value("string"), "has_label": datasets.Value("bool"),
        "are_different": datasets.Value("bool"), "num_example_per_prompt": datasets.Value("int64"),
        "utility_0": datasets.Value("float64"), "utility_1": datasets.Value("float64"),
    })
    path = Path(directory) / f"{split}.parquet"
    datasets.Dataset.from_dict({k: rows[k] for k in COLUMNS}, features=features).to_parquet(str(path))
    return path


def load_split(directory: Path, split: str):
    import datasets

    path = Path(directory) / f"{split}.parquet"
    if not path.exists():
        raise FileNotFoundError(f"no {split} split at {path}; rebuild the world with `spo world build`")
    return datasets.Dataset.from_parquet(str(path))


def decode_pair_tensors(rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images of every row as float NCHW tensors in [-1, 1]."""
    img0 = np.stack([decode_image(b) for b in rows["jpg_0"]])
    img1 = np.stack([decode_image(b) for b in rows["jpg_1"]])
    return to_model_range(img0), to_model_range(img1)
