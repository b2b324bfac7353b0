"""The world's tiny scoring decoder (`world:tiny_decoder`): a TAESD-style AutoencoderTiny distilled from the world VAE.

`model.scoring_decoder=world:tiny_decoder` makes the resampler decode the candidates' x0-predictions for a pixel
judge with it instead of the VAE (`Diffusion.scoring_decode`); final images, evaluation and `spo generate` keep
the VAE. As TAESD's checkpoints do, it reads latents as the denoiser sees them (VAE latents × scaling_factor; its
own config: scaling_factor 1, shift_factor 0), so it serves world:sd and world:sd3 alike (they share the VAE).

Distillation data, all on train-split captions (the test split stays held out for `benchmarks/tiny_decoder.py`):
  clean    world renders (`scenes.training_example`) encoded by the VAE: posterior mean and a posterior sample;
  noised   x0-predictions of those latents noised to a uniform t (one guided UNet call at CFG 3, 5 or 7.5: what SPM
           training and `spo evaluate-spm` decode);
  sampled  x0-predictions along the world model's own DDIM (eta 1) trajectories: what the resampler decodes.
Target: the VAE's decode of the same latents, clamped to [-1, 1]; loss MSE + 0.1·L1. The encoder is distilled as
well (to the VAE's posterior mean × scaling_factor), so the folder is a complete AutoencoderTiny; spo uses only
the decoder.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from spo.images import to_uint8
from spo.world import scenes
from spo.world.common import to_model_range

# Decoder widths: two stages (the world VAE upsamples once), every block at 16x16 and one conv at 32x32.
# Measured at 1 thread (benchmarks/tiny_decoder.py): several times cheaper than the world VAE's decode.
CHANNELS = 32
BLOCKS = (3, 0)
ENCODER_CHANNELS = 16
KINDS = ("clean", "noised", "sampled")
GUIDANCES = (3.0, 5.0, 7.5)
RECIPE_FILE = "spo_tiny_decoder.json"


def tiny_autoencoder(latent_channels: int = 4, channels: int = CHANNELS, blocks: tuple = BLOCKS,
                     encoder_channels: int = ENCODER_CHANNELS):
    """An untrained AutoencoderTiny for latents of `latent_channels` at half the image size (factor 2)."""
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(latent_channels=latent_channels, decoder_block_out_channels=(channels,) * len(blocks),
                           num_decoder_blocks=tuple(blocks), encoder_block_out_channels=(encoder_channels,) * 2,
                           num_encoder_blocks=(1, 1))


def render(captions: list[str], n: int, rng: np.random.Generator) -> torch.Tensor:
    """`n` pre-training-style renders (degraded like the base model's data) of captions drawn from `captions`,
    as NCHW in [-1, 1]."""
    specs = [scenes.parse_caption(c) for c in captions]
    picks = rng.integers(len(specs), size=n)
    return to_model_range(np.stack([to_uint8(scenes.training_example(specs[i], rng)) for i in picks]))


@torch.no_grad()
def distillation_data(diffusion, captions: list[str], n: int, seed: int, steps: int = 20, batch: int = 64) -> dict:
    """`n` latents of each kind (KINDS) with the VAE's decode of each: {"latents", "targets", "kind", "images",
    "encoded"}; images/encoded are the renders and their posterior means × scaling_factor (the encoder's data)."""
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    vae, scale = diffusion.vae, diffusion.vae.config.scaling_factor
    images = render(captions, n, rng)
    mean, sample = [], []
    for i in range(0, n, batch):
        posterior = vae.encode(images[i : i + batch]).latent_dist
        mean.append(posterior.mean * scale), sample.append(posterior.sample(generator=gen) * scale)
    mean, sample = torch.cat(mean), torch.cat(sample)
    clean = torch.cat([mean[: n - n // 2], sample[n - n // 2 :]])
    noised = []
    for i in range(0, n, batch):
        x0 = clean[i : i + batch]
        b = len(x0)
        t = torch.randint(0, diffusion.scheduler.config.num_train_timesteps, (b,), generator=gen)
        x_t = diffusion.noised(x0, torch.randn(x0.shape, generator=gen), t)
        noised.append(_x0_prediction(diffusion, x_t, t, _captions(captions, rng, b), rng))
    sampled = torch.cat(_trajectory_x0s(diffusion, captions, n, steps, batch, rng, gen))[:n]
    latents = torch.cat([clean, torch.cat(noised), sampled])
    targets = torch.cat([diffusion.decode(latents[i : i + 256]) for i in range(0, len(latents), 256)])
    kind = torch.arange(len(KINDS)).repeat_interleave(n)
    return {"latents": latents, "targets": targets.half(), "kind": kind, "images": images, "encoded": mean}


def _captions(captions: list[str], rng: np.random.Generator, b: int) -> list[str]:
    return [captions[i] for i in rng.integers(len(captions), size=b)]


def _x0_prediction(diffusion, x_t, t, prompts, rng) -> torch.Tensor:
    cond, uncond = diffusion.encode_prompts(prompts)
    guidance = float(rng.choice(GUIDANCES))
    return diffusion.x0_prediction(x_t, diffusion.guided_output(x_t, t, cond, uncond, guidance), t)


def _trajectory_x0s(diffusion, captions, n, steps, batch, rng, gen) -> list[torch.Tensor]:
    """The x0-prediction at every step of DDIM (eta 1) trajectories of the world model, until `n` are collected."""
    out, collected = [], 0
    schedule = diffusion.schedule(steps)
    while collected < n:
        b = min(batch, math.ceil((n - collected) / steps))
        cond, uncond = diffusion.encode_prompts(_captions(captions, rng, b))
        guidance = float(rng.choice(GUIDANCES))
        x = diffusion.initial_latents(b, gen)
        for t, t_prev in schedule:
            tb = torch.full((b,), t)
            model_out = diffusion.guided_output(x, tb, cond, uncond, guidance)
            mean, std, x0 = diffusion.transition(model_out, tb, torch.full_like(tb, t_prev), x, 1.0)
            out.append(x0)
            x = mean + std * torch.randn(x.shape, generator=gen)
        collected += b * steps
    return out


def psnr(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of images against targets, both in [-1, 1] (peak = the [0, 1] range)."""
    mse = ((images.float() - targets.float()) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


@torch.no_grad()
def tiny_decode(decoder, latents: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Images in [-1, 1] of latents as the denoiser sees them (what `Diffusion.scoring_decode` computes)."""
    cfg = decoder.config
    return torch.cat([decoder.decode(latents[i : i + batch] / cfg.scaling_factor + (cfg.get("shift_factor") or 0.0))
                      .sample.clamp(-1, 1) for i in range(0, len(latents), batch)])


def train(decoder, data: dict, steps: int, batch: int = 64, lr: float = 2e-3, seed: int = 0, log=print) -> list:
    """Distil: decoder on (latents -> VAE decode), encoder on (renders -> VAE latents); AdamW, cosine LR."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    latents, targets, images, encoded = data["latents"], data["targets"], data["images"], data["encoded"]
    decoder.train()
    history, start = [], time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(latents), (batch,), generator=gen)
        out = decoder.decoder(latents[idx])
        target = targets[idx].float()
        loss = F.mse_loss(out, target) + 0.1 * F.l1_loss(out, target)
        enc_idx = torch.randint(len(images), (batch // 4,), generator=gen)
        enc_loss = F.mse_loss(decoder.encoder(images[enc_idx]), encoded[enc_idx])
        opt.zero_grad()
        (loss + 0.1 * enc_loss).backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            history.append({"step": step, "loss": loss.item(), "encoder_loss": enc_loss.item(),
                            "seconds": round(time.perf_counter() - start, 1)})
            log(json.dumps(history[-1]))
    return history


def held_out_psnr(decoder, data: dict) -> dict:
    """Mean per-image PSNR (dB) of the tiny decode against the VAE decode, per kind of latent and overall."""
    decoder.eval()
    values = psnr(tiny_decode(decoder, data["latents"]), data["targets"])
    found = {k: float(values[data["kind"] == i].mean()) for i, k in enumerate(KINDS)}
    return {**found, "all": float(values.mean()), "min": float(values.min())}


def distil(out: str | Path, world: str | Path | None = None, n: int = 3000, steps: int = 3000, batch: int = 64,
           seed: int = 0, log=print) -> dict:
    """Distil the world's tiny decoder into `out` (save_pretrained, plus RECIPE_FILE); returns the recipe with the
    held-out PSNR on test-split latents."""
    from spo.files import atomic_directory
    from spo.models import load_diffusion
    from spo.world import default_world_dir
    from spo.world.prompts import split_prompts

    torch.manual_seed(seed)
    world = Path(world) if world is not None else default_world_dir()
    diffusion = load_diffusion(world / "sd")
    splits = split_prompts(0)
    start = time.perf_counter()
    data = distillation_data(diffusion, splits["train"], n, seed)
    held_out = distillation_data(diffusion, splits["test"], max(64, n // 10), seed + 1)
    data_seconds = time.perf_counter() - start
    log(f"data: {len(data['latents'])} train, {len(held_out['latents'])} held-out latents in {data_seconds:.0f} s")
    decoder = tiny_autoencoder(diffusion.vae.config.latent_channels)
    history = train(decoder, data, steps, batch, seed=seed, log=log)
    vae_name = "world:sd/vae" if world == default_world_dir() else str(world / "sd" / "vae")
    recipe = {"world_vae": vae_name, "n_per_kind": n, "steps": steps, "batch": batch, "seed": seed,
              "channels": CHANNELS, "blocks": list(BLOCKS), "data_seconds": round(data_seconds, 1),
              "train_seconds": history[-1]["seconds"], "final_loss": history[-1]["loss"],
              "held_out_psnr_db": held_out_psnr(decoder, held_out)}
    with atomic_directory(out) as tmp:
        decoder.eval().save_pretrained(tmp)
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2))
    return recipe
