"""Training the step-aware preference model (`spo train-spm`).

Each step: encode both images of a pair with the VAE, add the same noise at one random t to both,
take one classifier-free-guided denoising step with the frozen diffusion model to get x0-predictions,
decode them, score both with the time-conditioned CLIP at t, and apply the PickScore loss (soft
Bradley–Terry targets, ties 0.5/0.5, per-prompt weights).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from spo.errors import SPOError
from spo.sampling import add_noise, predict_x0

TRAIN_PARAMS = ("conditioning", "vision", "all")


@dataclass
class SPMTrainConfig:
    dataset: str = ""  # preference data: hub id, save_to_disk dir, parquet dir or file (Pick-a-Pic schema)
    split: str = "train"  # dataset split to train on
    diffusion_model: str = ""  # SD or SDXL diffusers pipeline (hub id or dir) used for the noising step
    vae: str = ""  # separate VAE for it (e.g. madebyollin/sdxl-vae-fp16-fix); empty = the pipeline's own
    base: str = ""  # CLIP checkpoint to start from (e.g. yuvalkirstain/PickScore_v1)
    processor: str = ""  # image processor / tokenizer source; empty = same as base
    output_dir: str = "runs/spm"  # where the model, checkpoints, logs and data report go
    time_conditioned: bool = True  # False gives the ablation without timestep conditioning
    train_params: str = "all"  # conditioning | vision | all
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 16  # pairs per process per micro-batch
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-5  # for the CLIP weights
    conditioning_learning_rate: float = 1e-4  # for the new, zero-initialised conditioning weights
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    t_min: int = 0  # timesteps are drawn uniformly from [t_min, t_max]
    t_max: int = 999
    guidance_scale: float = 5.0  # CFG of the noising step, as in sampling
    per_prompt_weighting: bool = True  # each prompt counts equally (PickScore)
    relabel_threshold: float = -1.0  # >= 0: relabel pairs with the base model at t=0, drop |p0-p1| < threshold
    mixed_precision: str = "no"  # no | fp16 | bf16
    seed: int = 0
    checkpointing_steps: int = 500
    checkpoints_total_limit: int = 2
    resume: str = ""  # checkpoint dir, or "latest"
    log_every: int = 10
    report_to: str = "tensorboard"  # tensorboard | wandb | none

    def validate(self) -> None:
        if not self.dataset or not self.diffusion_model or not self.base:
            raise SPOError("train-spm needs dataset, diffusion_model and base (a CLIP checkpoint)")
        if self.train_params not in TRAIN_PARAMS:
            raise SPOError(f"train_params must be one of {TRAIN_PARAMS}, got {self.train_params!r}")
        if self.train_params == "conditioning" and not self.time_conditioned:
            raise SPOError("train_params=conditioning needs time_conditioned=true (nothing else would train)")
        if not 0 <= self.t_min <= self.t_max:
            raise SPOError(f"need 0 <= t_min <= t_max, got t_min={self.t_min}, t_max={self.t_max}")
        if self.max_steps < 1 or self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise SPOError("max_steps, batch_size and gradient_accumulation_steps must be >= 1")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise SPOError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")


# ------------------------------------------------------------------ pure pieces


def pickscore_loss(logits_0: torch.Tensor, logits_1: torch.Tensor, labels: torch.Tensor,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of softmax([s0, s1]) against the label distribution (ties = 0.5/0.5), weighted mean."""
    log_p = F.log_softmax(torch.stack([logits_0, logits_1], dim=-1).float(), dim=-1)
    per_pair = -(labels.float() * log_p).sum(-1)
    if weights is None:
        return per_pair.mean()
    return (per_pair * weights).sum() / weights.sum()


@torch.no_grad()
def noisy_x0_images(diffusion, images_0: torch.Tensor, images_1: torch.Tensor, captions: list[str],
                    t: torch.Tensor, guidance: float, generator: torch.Generator | None = None):
    """Both images noised with the same noise to x_t, denoised once (CFG) and decoded: images in [-1, 1]."""
    latents = diffusion.encode_images(torch.cat([images_0, images_1]))
    noise = torch.randn(latents[: len(images_0)].shape, generator=generator, dtype=torch.float32).to(latents)
    t2 = torch.cat([t, t]).to(latents.device)
    x_t = add_noise(diffusion.scheduler, latents, torch.cat([noise, noise]), t2)
    cond, uncond = diffusion.encode_prompts(captions + captions)
    out = diffusion.guided_output(x_t, t2, cond, uncond, guidance)
    decoded = diffusion.decode(predict_x0(diffusion.scheduler, x_t, out, t2))
    return decoded.chunk(2)


def set_trainable(spm, which: str) -> list[str]:
    """Freeze all but the chosen parameters; returns the names that train."""
    for name, p in spm.named_parameters():
        if which == "all":
            p.requires_grad_(True)
        elif which == "vision":
            p.requires_grad_(name.startswith(("conditioning.", "clip.vision_model.", "clip.visual_projection.")))
        else:
            p.requires_grad_(name.startswith("conditioning."))
    return [n for n, p in spm.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------ the loop


def _relabel(ds, spm, resolution: int, threshold: float, batch: int = 64):
    """Replace labels by the base model's preference at t=0; drop pairs it cannot separate."""
    from spo.preference.data import PairCollator

    collate = PairCollator(resolution)

    def fn(rows):
        n = len(rows["caption"])
        items = [{k: rows[k][i] for k in rows} for i in range(n)]
        new0, keep = [], []
        for item in items:
            b = collate([item])
            if b is None:
                new0.append(item["label_0"]), keep.append(True)  # the training collator will count and skip it
                continue
            dev = next(spm.parameters()).device
            with torch.no_grad():
                s = torch.stack([spm(b["img0"].to(dev), b["captions"], 0), spm(b["img1"].to(dev), b["captions"], 0)], -1)
            p = s.softmax(-1)[0]
            new0.append(float(p[0] > p[1]))
            keep.append(bool((p[0] - p[1]).abs() >= threshold))
        return {"label_0": new0, "label_1": [1.0 - x for x in new0], "_keep": keep}

    ds = ds.map(fn, batched=True, batch_size=batch, desc="relabel with the base model")
    return ds.filter(lambda k: k, input_columns="_keep").remove_columns("_keep")


def _latest_checkpoint(output: Path) -> Path | None:
    ckpts = sorted((output / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


def _save_checkpoint(accelerator, output: Path, step: int, limit: int) -> Path:
    from spo.files import atomic_directory, keep_newest

    final = output / "checkpoints" / f"step-{step}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic_directory(final) as tmp:
            accelerator.save_state(str(tmp))
            (tmp / "train_state.json").write_text(json.dumps({"global_step": step}))
        keep_newest(sorted((output / "checkpoints").glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1])), limit)
    accelerator.wait_for_everyone()
    return final


def train_spm(cfg: SPMTrainConfig, log=print) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    from spo.config import save_config
    from spo.models import Diffusion, load_pipeline
    from spo.preference.data import PairCollator, load_preference_dataset, prompt_weights
    from spo.preference.spm import StepAwareCLIP
    from spo.plugins import resolve

    cfg.validate()
    output = Path(cfg.output_dir)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # so that a multi-process launch on CPUs forms one group
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(output / "logs")),
    )
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output / "config.yaml")

    ds = load_preference_dataset(resolve(cfg.dataset), cfg.split)
    diffusion = Diffusion(load_pipeline(resolve(cfg.diffusion_model), vae=resolve(cfg.vae) or None))
    for module in (diffusion.unet, *diffusion.frozen_modules()):
        module.requires_grad_(False).to(accelerator.device)
    spm = StepAwareCLIP.from_base(resolve(cfg.base), resolve(cfg.processor) or None, time_conditioned=cfg.time_conditioned,
                                  num_train_timesteps=diffusion.scheduler.config.num_train_timesteps)
    # Record what it was built from as the user named it ("world:pickscore"), not this machine's path.
    spm.config.base_model, spm.config.processor = cfg.base, cfg.processor or cfg.base
    if cfg.relabel_threshold >= 0:
        ds = _relabel(ds, spm.to(accelerator.device), diffusion.resolution, cfg.relabel_threshold)  # on the GPU
        log(f"[spm] relabelled with the base model at t=0: {len(ds)} pairs kept (threshold {cfg.relabel_threshold})")
    if cfg.per_prompt_weighting:
        ds = ds.add_column("weight", prompt_weights(list(ds["caption"])).tolist())
    if len(ds) == 0:
        raise SPOError(f"no usable pairs in {cfg.dataset} ({cfg.split})")

    trainable = set_trainable(spm, cfg.train_params)
    cond_params = [p for n, p in spm.named_parameters() if p.requires_grad and n.startswith("conditioning.")]
    clip_params = [p for n, p in spm.named_parameters() if p.requires_grad and not n.startswith("conditioning.")]
    groups = [g for g in ({"params": cond_params, "lr": cfg.conditioning_learning_rate},
                          {"params": clip_params, "lr": cfg.learning_rate}) if g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    collate = PairCollator(diffusion.resolution)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    spm, optimizer, loader = accelerator.prepare(spm, optimizer, loader)

    step, skip = 0, 0
    if cfg.resume:
        ckpt = _latest_checkpoint(output) if cfg.resume == "latest" else Path(cfg.resume)
        if ckpt is None or not (ckpt / "train_state.json").is_file():
            raise SPOError(f"no checkpoint to resume from at {cfg.resume!r} (looked in {output / 'checkpoints'})")
        accelerator.load_state(str(ckpt))
        step = json.loads((ckpt / "train_state.json").read_text())["global_step"]
        skip = (step * cfg.gradient_accumulation_steps) % len(loader)
        log(f"[spm] resumed from {ckpt} at step {step}")

    if accelerator.is_main_process and cfg.report_to != "none":
        accelerator.init_trackers("spm", config={k: v for k, v in asdict(cfg).items() if isinstance(v, (int, float, str, bool))})
    log(f"[spm] training {len(trainable)} parameter tensors ({cfg.train_params}) on {len(ds)} pairs")
    noise_gen = torch.Generator().manual_seed(cfg.seed + 1 + step)
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train-spm", disable=not accelerator.is_main_process)
    t0, seen = time.time(), 0
    while step < cfg.max_steps:
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        for batch in batches:
            if batch is None:
                continue
            with accelerator.accumulate(spm):
                n = len(batch["captions"])
                t = torch.randint(cfg.t_min, cfg.t_max + 1, (n,), generator=noise_gen)
                x0_0, x0_1 = noisy_x0_images(diffusion, batch["img0"], batch["img1"], batch["captions"], t,
                                             cfg.guidance_scale, noise_gen)
                t = t.to(accelerator.device)
                logits_0 = spm(x0_0, batch["captions"], t)
                logits_1 = spm(x0_1, batch["captions"], t)
                loss = pickscore_loss(logits_0, logits_1, batch["labels"], batch["weights"])
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_([p for p in spm.parameters() if p.requires_grad], cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            seen += n
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            decided = batch["labels"][:, 0] != 0.5
            acc = ((logits_0 > logits_1).float().cpu() == batch["labels"][:, 0])[decided].float().mean().item() if decided.any() else float("nan")
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
            if step % cfg.log_every == 0 and cfg.report_to != "none":
                accelerator.log({"loss": loss.item(), "batch_accuracy": acc, "t_mean": t.float().mean().item(),
                                 "pairs_per_s": seen / (time.time() - t0)}, step=step)
            if step % cfg.checkpointing_steps == 0 or step == cfg.max_steps:
                _save_checkpoint(accelerator, output, step, cfg.checkpoints_total_limit)
            if step >= cfg.max_steps:
                break
    bar.close()
    final = output / "spm"
    if accelerator.is_main_process:
        from spo.files import atomic_directory

        with atomic_directory(final) as tmp:
            accelerator.unwrap_model(spm).save_pretrained(tmp)
        report = dict(collate.report.summary(), train_seconds=round(time.time() - t0, 1), steps=step)
        (output / "data_report.json").write_text(json.dumps(report, indent=2))
        log("[spm] data: " + ", ".join(f"{k}: {v}" for k, v in collate.report.summary().items()))
    accelerator.end_training()
    return final
