"""Build every artifact of the embedded world from a seed.

Stages (each writes one folder under the output directory, and is skipped when it is already
complete, so an interrupted build continues where it stopped):

    tokenizer    CLIP BPE vocabulary for the caption grammar
    clip         the world's CLIP, trained contrastively on captions and scenes
    sd           Stable Diffusion pipeline: the CLIP text tower (frozen), a VAE and a UNet trained on scenes
    sd3          the flow-matching world: a Stable Diffusion 3 pipeline (MMDiT transformer trained with rectified
                 flow on the same scenes; sd's VAE and text tower, no T5)
    preference   image pairs sampled from `sd`, labelled by simulated humans, in the Pick-a-Pic schema
    pickscore    the CLIP fine-tuned on the preference pairs with the PickScore loss
    spm_preference  fresh pairs on the training prompts, for training the step-aware preference model
    report       figures: base utility on held-out prompts, a sample grid, PickScore accuracy, timings
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from spo.clip import image_embeds, text_embeds
from spo.errors import SPOError
from spo.files import atomic_directory, atomic_write_text
from spo.images import to_uint8
from spo.world import architecture, prompts, scenes
from spo.world.common import to_model_range, tokenize
from spo.world.labels import LabelModel

WORLD_FORMAT = 1


@dataclass
class BuildConfig:
    seed: int = 0
    tiny: bool = False  # reduced sizes for tests: every stage runs, in well under a minute
    n_images: int = 40000  # pre-training scenes (captions + degraded renders)
    clip_steps: int = 1200
    clip_batch: int = 128
    clip_lr: float = 1e-3
    vae_steps: int = 1200
    vae_batch: int = 16
    vae_lr: float = 1e-3
    unet_steps: int = 2400
    unet_batch: int = 64
    unet_lr: float = 8e-4
    ema_decay: float = 0.999
    flow_steps: int = 2400  # the flow world's transformer (stage sd3)
    flow_batch: int = 64
    flow_lr: float = 5e-4
    caption_dropout: float = 0.1  # so classifier-free guidance works
    pairs: dict = field(default_factory=lambda: {"train": 2000, "validation": 200, "test": 400})
    # Fresh pairs on the training prompts for the step-aware preference model: PickScore has
    # memorised the train split, so fine-tuning it there again would teach the SPM next to nothing.
    spm_pairs: int = 3000
    sample_steps: int = 20
    guidance_scales: tuple = (3.0, 5.0, 7.5)  # each image of a pair draws one, like Pick-a-Pic's mix of models
    eta: float = 1.0
    pickscore_steps: int = 600
    pickscore_batch: int = 64
    pickscore_lr: float = 1e-4
    labels: LabelModel = field(default_factory=LabelModel)

    @classmethod
    def tiny_config(cls, seed: int = 0) -> "BuildConfig":
        return cls(
            seed=seed, tiny=True, n_images=256, clip_steps=3, clip_batch=16, vae_steps=3, vae_batch=8,
            unet_steps=3, unet_batch=8, flow_steps=3, flow_batch=8, pairs={"train": 12, "validation": 4, "test": 6}, spm_pairs=8, sample_steps=3,
            pickscore_steps=3, pickscore_batch=4,
        )


def _seed_all(seed: int) -> torch.Generator:
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ data


def pretraining_data(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """`n` degraded renders with their captions; half single-object, half two-object captions."""
    rng = np.random.default_rng(seed)
    specs = scenes.all_specs()
    singles = [s for s in specs if s.relation is None]
    pairs = [s for s in specs if s.relation is not None]
    images = np.empty((n, scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3), np.uint8)
    captions = []
    for i in tqdm(range(n), desc="render scenes", leave=False):
        pool = singles if rng.uniform() < 0.5 else pairs
        spec = pool[rng.integers(len(pool))]
        images[i] = to_uint8(scenes.training_example(spec, rng))
        captions.append(scenes.caption_of(spec))
    return images, captions


def _cosine_lr(step: int, total: int, warmup: int = 50) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ------------------------------------------------------------------ stages


def train_clip(images, captions, tokenizer, cfg: BuildConfig, gen: torch.Generator):
    clip = architecture.clip_model(tokenizer, tiny=cfg.tiny)
    pixels, ids = to_model_range(images), tokenize(tokenizer, captions)
    caption_index = torch.tensor([hash(c) for c in captions])
    opt = torch.optim.AdamW(clip.parameters(), lr=cfg.clip_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, cfg.clip_steps))
    bar = tqdm(range(cfg.clip_steps), desc="clip (contrastive)", leave=False)
    for _ in bar:
        idx = torch.randint(len(pixels), (cfg.clip_batch,), generator=gen)
        # Identical captions in a batch are not negatives of each other.
        same = (caption_index[idx][:, None] == caption_index[idx][None, :]).float()
        logits = clip.logit_scale.exp() * text_embeds(clip, ids[idx]) @ image_embeds(clip, pixels[idx]).T
        target = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return clip.eval()


def train_vae(images, cfg: BuildConfig, gen: torch.Generator):
    vae = architecture.vae(tiny=cfg.tiny)
    pixels = to_model_range(images)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, cfg.vae_steps))
    bar = tqdm(range(cfg.vae_steps), desc="vae", leave=False)
    for _ in bar:
        x = pixels[torch.randint(len(pixels), (cfg.vae_batch,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = (recon - x).abs().mean() + 0.5 * (recon - x).pow(2).mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i : i + 256]).latent_dist.mean for i in range(0, min(len(pixels), 4096), 256)])
    # As in Stable Diffusion, scale latents to unit variance for the diffusion model.
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae


@torch.no_grad()
def _encode_all(vae, images, gen, batch: int = 256) -> torch.Tensor:
    pixels = to_model_range(images)
    out = [vae.encode(pixels[i : i + batch]).latent_dist.sample(generator=gen) for i in range(0, len(pixels), batch)]
    return torch.cat(out) * vae.config.scaling_factor


def train_unet(images, captions, vae, text_encoder, tokenizer, cfg: BuildConfig, gen: torch.Generator):
    unet = architecture.unet(text_encoder.config.hidden_size, tiny=cfg.tiny)
    ema = [p.detach().clone() for p in unet.parameters()]
    noise_scheduler = architecture.scheduler()
    latents = _encode_all(vae, images, gen)
    vocab = sorted(set(captions)) + [""]
    with torch.no_grad():
        table = torch.cat([text_encoder(tokenize(tokenizer, vocab[i : i + 256]))[0] for i in range(0, len(vocab), 256)])
    index = {c: i for i, c in enumerate(vocab)}
    caption_ids = torch.tensor([index[c] for c in captions])
    empty = index[""]
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, cfg.unet_steps, warmup=100))
    bar = tqdm(range(cfg.unet_steps), desc="unet", leave=False)
    for _ in bar:
        idx = torch.randint(len(latents), (cfg.unet_batch,), generator=gen)
        x0 = latents[idx]
        cond = caption_ids[idx].clone()
        cond[torch.rand(len(idx), generator=gen) < cfg.caption_dropout] = empty
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        pred = unet(noise_scheduler.add_noise(x0, noise, t), t, table[cond]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for e, p in zip(ema, unet.parameters()):
                e.lerp_(p, 1 - cfg.ema_decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    with torch.no_grad():
        for e, p in zip(ema, unet.parameters()):
            p.copy_(e)
    return unet.eval()


def sd_pipeline(unet, vae, text_encoder, tokenizer):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=architecture.scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def flow_pipeline(transformer, vae, text_encoder, tokenizer):
    """The flow world as SD3: the world's text tower in both CLIP slots, no T5 (its slot: FLOW_T5_TOKENS zeros),
    sd's VAE (SD3's pipeline reads a shift factor: 0 here), declared call length so every caller matches."""
    from diffusers import StableDiffusion3Pipeline

    vae.register_to_config(shift_factor=0.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=architecture.flow_scheduler(), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder, tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
    pipe.spo_call_defaults = {"max_sequence_length": architecture.FLOW_T5_TOKENS}
    return pipe


@torch.no_grad()
def _flow_caption_table(pipe, vocab: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3 conditioning (token embeddings, pooled) of every caption, encoded once as the pipeline encodes."""
    parts = [pipe.encode_prompt(vocab[i : i + 256], None, None, device="cpu", do_classifier_free_guidance=False,
                                **pipe.spo_call_defaults) for i in range(0, len(vocab), 256)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[2] for p in parts])


def train_flow_transformer(images, captions, pipe, cfg: BuildConfig, gen: torch.Generator):
    """Rectified flow: x_t = (1 − t)·x0 + t·ε, the transformer regresses the velocity ε − x0, with t drawn
    logit-normal as SD3 was trained; EMA weights, as for the UNet."""
    transformer = pipe.transformer
    ema = [p.detach().clone() for p in transformer.parameters()]
    latents = _encode_all(pipe.vae, images, gen)  # the VAE's shift is 0: scaled latents as for the UNet
    vocab = sorted(set(captions)) + [""]
    embeds, pooled = _flow_caption_table(pipe, vocab)
    index = {c: i for i, c in enumerate(vocab)}
    caption_ids = torch.tensor([index[c] for c in captions])
    opt = torch.optim.AdamW(transformer.parameters(), lr=cfg.flow_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, cfg.flow_steps, warmup=100))
    transformer.train()
    bar = tqdm(range(cfg.flow_steps), desc="sd3 transformer (flow matching)", leave=False)
    for _ in bar:
        idx = torch.randint(len(latents), (cfg.flow_batch,), generator=gen)
        x0 = latents[idx]
        cond = caption_ids[idx].clone()
        cond[torch.rand(len(idx), generator=gen) < cfg.caption_dropout] = index[""]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.sigmoid(torch.randn(len(idx), generator=gen))
        x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        pred = transformer(x_t, encoder_hidden_states=embeds[cond], pooled_projections=pooled[cond],
                           timestep=t * 1000).sample
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for e, p in zip(ema, transformer.parameters()):
                e.lerp_(p, 1 - cfg.ema_decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    with torch.no_grad():
        for e, p in zip(ema, transformer.parameters()):
            p.copy_(e)
    transformer.eval()
    return pipe


def train_pickscore(clip, tokenizer, train_rows, cfg: BuildConfig, gen: torch.Generator):
    """Fine-tune with the PickScore loss: softmax over the pair's two scores vs the label distribution."""
    from spo.world.preference_data import decode_pair_tensors

    img0, img1 = decode_pair_tensors(train_rows)
    ids = tokenize(tokenizer, list(train_rows["caption"]))
    target = torch.tensor(np.stack([train_rows["label_0"], train_rows["label_1"]], 1), dtype=torch.float32)
    clip.train()
    opt = torch.optim.AdamW(clip.parameters(), lr=cfg.pickscore_lr, weight_decay=0.01)
    bar = tqdm(range(cfg.pickscore_steps), desc="pickscore", leave=False)
    for _ in bar:
        idx = torch.randint(len(ids), (cfg.pickscore_batch,), generator=gen)
        t = text_embeds(clip, ids[idx])
        s0 = (t * image_embeds(clip, img0[idx])).sum(-1)
        s1 = (t * image_embeds(clip, img1[idx])).sum(-1)
        logits = clip.logit_scale.exp() * torch.stack([s0, s1], 1)
        loss = F.cross_entropy(logits, target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return clip.eval()


# ------------------------------------------------------------------ the whole build


WORLD_ENTRIES = ("tokenizer", "clip", "sd", "sd3", "spm_sd3", "preference", "pickscore", "spm_preference", "spm", "prompts", "report",
                 "timings.json", "world.json")


def _clear_world(out: Path) -> None:
    """--force: delete the world's own artifacts, and only in a folder that is a world (or empty)."""
    from spo.runtime import LOCK_NAME

    children = [c for c in out.iterdir() if c.name != LOCK_NAME]  # the lock this build holds stays
    foreign = [c.name for c in children if c.name.removesuffix(".partial") not in WORLD_ENTRIES]
    if foreign:
        raise SPOError(f"{out} holds files that are not a world's ({', '.join(sorted(foreign)[:3])}); "
                       f"--force deletes nothing there: choose an empty --out or a world folder")
    for child in children:
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def build(out: str | Path, cfg: BuildConfig, force: bool = False, log=print) -> dict:
    """Run every stage not yet complete under `out`; returns the build report. One build per folder: `out`
    is locked for the build (before --force deletes anything)."""
    from spo.runtime import RunLock

    with RunLock(out, option="--out", log=log):
        return _build(Path(out), cfg, force, log)


def _build(out: Path, cfg: BuildConfig, force: bool, log) -> dict:
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    from spo.world import preference_data, report
    from spo.world.tokenizer import write_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if force:
        _clear_world(out)
    timings = _read_json(out / "timings.json")
    if "OMP_NUM_THREADS" not in os.environ:  # an explicit setting wins (e.g. 1 on a shared machine)
        torch.set_num_threads(max(1, os.cpu_count() or 1))

    def stage(name: str) -> tuple[bool, float]:
        done = (out / name).exists()
        if done:
            log(f"[world] {name}: already built, skipping")
        else:
            log(f"[world] {name}: building")
        return done, time.time()

    def finish(name: str, t0: float) -> None:
        timings[name] = round(time.time() - t0, 1)
        _write_json(out / "timings.json", timings)
        log(f"[world] {name}: done in {timings[name]:.1f}s")

    gen = _seed_all(cfg.seed)
    done, t0 = stage("tokenizer")
    if not done:
        with atomic_directory(out / "tokenizer") as tmp:
            write_tokenizer(tmp)
        finish("tokenizer", t0)
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")

    need_data = not all((out / name).exists() for name in ("clip", "sd", "sd3"))
    images, captions = pretraining_data(cfg.n_images, cfg.seed) if need_data else (None, None)

    done, t0 = stage("clip")
    if not done:
        clip = train_clip(images, captions, tokenizer, cfg, gen)
        _save_clip(clip, tokenizer, out / "clip")
        finish("clip", t0)

    done, t0 = stage("sd")
    if not done:
        text_encoder = CLIPTextModel.from_pretrained(out / "clip").eval()
        vae = train_vae(images, cfg, gen)
        timings["sd.vae"] = round(time.time() - t0, 1)
        unet = train_unet(images, captions, vae, text_encoder, tokenizer, cfg, gen)
        with atomic_directory(out / "sd") as tmp:
            sd_pipeline(unet, vae, text_encoder, tokenizer).save_pretrained(tmp)
        finish("sd", t0)

    done, t0 = stage("sd3")
    if not done:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModelWithProjection

        from spo.models import save_pipeline

        # Its own seed, global RNG untouched: the flow world and the later stages are the same whether it is
        # built with the rest or added to an existing world.
        flow_gen = torch.Generator().manual_seed(cfg.seed + hash_split("sd3"))
        text_encoder = CLIPTextModelWithProjection.from_pretrained(out / "clip").eval()
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed + hash_split("sd3"))
            transformer = architecture.flow_transformer(text_encoder.config.hidden_size, tiny=cfg.tiny)
        pipe = flow_pipeline(transformer, AutoencoderKL.from_pretrained(out / "sd" / "vae"), text_encoder, tokenizer)
        pipe = train_flow_transformer(images, captions, pipe, cfg, flow_gen)
        with atomic_directory(out / "sd3") as tmp:
            save_pipeline(pipe, tmp)
        finish("sd3", t0)
    del images, captions

    done, t0 = stage("preference")
    if not done:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(out / "sd")
        pipe.set_progress_bar_config(disable=True)
        splits = prompts.split_prompts(cfg.seed)
        prompts.write_prompt_files(splits, out / "prompts")
        with atomic_directory(out / "preference") as tmp:
            for split, n_pairs in cfg.pairs.items():
                rows = preference_data.generate_pairs(pipe, splits[split], n_pairs, cfg, seed=cfg.seed + hash_split(split))
                preference_data.write_split(rows, tmp, split)
        finish("preference", t0)

    done, t0 = stage("pickscore")
    if not done:
        clip = CLIPModel.from_pretrained(out / "clip")
        train_rows = preference_data.load_split(out / "preference", "train")
        clip = train_pickscore(clip, tokenizer, train_rows, cfg, gen)
        _save_clip(clip, tokenizer, out / "pickscore")
        finish("pickscore", t0)

    done, t0 = stage("spm_preference")
    if not done:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(out / "sd")
        pipe.set_progress_bar_config(disable=True)
        train_prompts = prompts.split_prompts(cfg.seed)["train"]
        with atomic_directory(out / "spm_preference") as tmp:
            rows = preference_data.generate_pairs(pipe, train_prompts, cfg.spm_pairs, cfg, seed=cfg.seed + hash_split("spm"))
            preference_data.write_split(rows, tmp, "train")
        finish("spm_preference", t0)

    t0 = time.time()
    figures = report.world_report(out, cfg)
    timings["report"] = round(time.time() - t0, 1)
    _write_json(out / "timings.json", timings)
    manifest = dict(format=WORLD_FORMAT, seed=cfg.seed, tiny=cfg.tiny, config=_jsonable(cfg), timings=timings,
                    figures=figures)
    _write_json(out / "world.json", manifest)
    return manifest


def _save_clip(clip, tokenizer, final: Path) -> None:
    """A CLIPModel with its processor and tokenizer, as PickScore_v1 is laid out on the hub."""
    from transformers import CLIPProcessor

    with atomic_directory(final) as tmp:
        clip.save_pretrained(tmp)
        CLIPProcessor(image_processor=architecture.clip_image_processor(), tokenizer=tokenizer).save_pretrained(tmp)


def hash_split(split: str) -> int:
    return {"train": 1_000_000, "validation": 2_000_000, "test": 3_000_000, "spm": 4_000_000, "sd3": 5_000_000}[split]


def _jsonable(cfg: BuildConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2))
