"""Training the latent step judge (`spo train-latent-judge`): no network calls, no decodes.

Every image of the preference data is VAE-encoded once and every caption encoded once (the diffusion
model's own conditioning); then each step noises both latents of a pair with the SAME noise to one
random t (uniform, as the SPM recipe) and applies the PickScore loss (soft Bradley–Terry targets, ties
0.5/0.5, per-prompt weights) to the judge's two scores — the SPM's recipe minus its guided step and decode.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from spo.config import LatentJudgeTrainConfig
from spo.errors import SPOError


@dataclass
class EncodedPairs:
    """The preference data as the judge sees it, before noising: one row per usable pair."""

    latents_0: torch.Tensor  # (N, C, H, W) VAE latents of image 0
    latents_1: torch.Tensor
    text: torch.Tensor  # (P, L, D) conditioning embeddings of the distinct captions
    caption_index: torch.Tensor  # (N,) row of `text` for each pair
    labels: torch.Tensor  # (N, 2) soft labels (0.5/0.5 = tie)
    weights: torch.Tensor  # (N,)

    def __len__(self) -> int:
        return len(self.labels)


@torch.no_grad()
def encode_pairs(diffusion, dataset, batch_size: int = 64, per_prompt_weighting: bool = True) -> EncodedPairs:
    """VAE-encode both images of every usable pair and the conditioning of every distinct caption, once."""
    from spo.preference.data import PairCollator, prompt_weights

    collate = PairCollator(diffusion.resolution)
    lat0, lat1, captions, labels, weights = [], [], [], [], []
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[j] for j in range(start, min(start + batch_size, len(dataset)))])
        if batch is None:
            continue
        lat0.append(diffusion.encode_images(batch["img0"]).float().cpu())
        lat1.append(diffusion.encode_images(batch["img1"]).float().cpu())
        captions += batch["captions"]
        labels.append(batch["labels"])
        weights.append(batch["weights"])
    if not captions:
        raise SPOError("no usable pairs in the preference data (see its images, labels and captions)")
    distinct = sorted(set(captions))
    where = {c: i for i, c in enumerate(distinct)}
    text = torch.cat([diffusion.encode_prompts(distinct[i:i + batch_size])[0].embeds.float().cpu()
                      for i in range(0, len(distinct), batch_size)])
    w = torch.cat(weights)
    if per_prompt_weighting:
        w = w * torch.as_tensor(prompt_weights(captions), dtype=torch.float32)
    return EncodedPairs(torch.cat(lat0), torch.cat(lat1), text, torch.tensor([where[c] for c in captions]),
                        torch.cat(labels), w)


def noised_pair(diffusion, pairs: EncodedPairs, index: torch.Tensor, t: torch.Tensor, generator: torch.Generator):
    """Both latents of the chosen pairs at t, noised with the same noise (as the SPM sees a pair)."""
    noise = torch.randn(pairs.latents_0[index].shape, generator=generator)
    x0 = torch.cat([pairs.latents_0[index], pairs.latents_1[index]])
    x_t = diffusion.noised(x0.to(diffusion.device), torch.cat([noise, noise]).to(diffusion.device),
                           torch.cat([t, t]).to(diffusion.device))
    return x_t.float().chunk(2)


def pair_scores(judge, diffusion, pairs: EncodedPairs, index, t, generator):
    """The judge's scores of both images of the chosen pairs at t (same noise for both)."""
    x0, x1 = noised_pair(diffusion, pairs, index, t, generator)
    device = next(judge.parameters()).device
    text, tt = pairs.text[pairs.caption_index[index]].to(device), t.to(device)
    return judge(x0.to(device), text, tt), judge(x1.to(device), text, tt)


_ONE_PROCESS = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)  # what replace_old_run asks


def _lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def train_latent_judge(cfg: LatentJudgeTrainConfig, log=print, overwrite: bool = False) -> Path:
    """Train a latent step judge; returns its saved directory (OUT/latent_judge)."""
    from spo.config import save_config
    from spo.files import atomic_directory, atomic_write_text
    from spo.models import load_diffusion
    from spo.plugins import resolve
    from spo.preference.data import load_preference_dataset
    from spo.preference.latent_judge import LatentJudgeConfig, LatentStepJudge
    from spo.runtime import RunLock, check_output_dir, replace_old_run

    cfg.validate()
    d, m, tr = cfg.data, cfg.model, cfg.train
    output = Path(cfg.log.output_dir)
    with RunLock(output, log=log):
        check_output_dir(output, "config.yaml", overwrite, False)
        torch.manual_seed(tr.seed)
        diffusion = load_diffusion(resolve(m.diffusion_model), vae=resolve(m.vae) or None)
        if tr.t_max >= diffusion.scheduler.config.num_train_timesteps:
            raise SPOError(f"train.t_max must be < {diffusion.scheduler.config.num_train_timesteps}, got {tr.t_max}")
        t0 = time.time()
        pairs = encode_pairs(diffusion, load_preference_dataset(resolve(d.dataset), d.split), tr.encode_batch_size,
                             d.per_prompt_weighting)
        encode_seconds = time.time() - t0
        log(f"[latent-judge] encoded {len(pairs)} pairs and {len(pairs.text)} captions in {encode_seconds:.1f}s")
        judge = LatentStepJudge(LatentJudgeConfig(
            latent_channels=pairs.latents_0.shape[1], text_dim=pairs.text.shape[-1], text_tokens=pairs.text.shape[1],
            widths=list(m.widths), blocks_per_stage=m.blocks_per_stage, cond_dim=m.cond_dim, embed_dim=m.embed_dim,
            num_train_timesteps=diffusion.scheduler.config.num_train_timesteps,
            diffusion_model=m.diffusion_model)).to(diffusion.device)
        replace_old_run(output, "config.yaml", overwrite, False, _ONE_PROCESS)
        output.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output / "config.yaml")
        t1 = time.time()
        metrics = _optimise(judge, diffusion, pairs, tr, cfg.log.log_every, output / "metrics.jsonl", log)
        train_seconds = time.time() - t1
        final = output / "latent_judge"
        with atomic_directory(final) as tmp:
            judge.cpu().save_pretrained(tmp)
        n_params = sum(p.numel() for p in judge.parameters())
        atomic_write_text(output / "train_report.json", json.dumps(dict(
            pairs=len(pairs), parameters=n_params, steps=tr.max_steps, encode_seconds=round(encode_seconds, 1),
            train_seconds=round(train_seconds, 1), last=metrics), indent=2))
        log(f"[latent-judge] {n_params} parameters, {tr.max_steps} steps in {train_seconds:.1f}s")
        return final


def _optimise(judge, diffusion, pairs: EncodedPairs, tr, log_every: int, metrics_path: Path, log) -> dict:
    """The training loop proper: draws from one seeded generator, so a run is reproducible."""
    from spo.preference.train_spm import pickscore_loss

    gen = torch.Generator().manual_seed(tr.seed)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=tr.learning_rate, weight_decay=tr.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(tr.lr_warmup_steps, tr.max_steps))
    device = next(judge.parameters()).device
    judge.train()
    window, last = [], {}
    with metrics_path.open("w") as f:
        for step in range(1, tr.max_steps + 1):
            index = torch.randint(len(pairs), (min(tr.batch_size, len(pairs)),), generator=gen)
            t = torch.randint(tr.t_min, tr.t_max + 1, (len(index),), generator=gen)
            s0, s1 = pair_scores(judge, diffusion, pairs, index, t, gen)
            labels = pairs.labels[index].to(device)
            loss = pickscore_loss(s0, s1, labels, pairs.weights[index].to(device))
            if not torch.isfinite(loss):
                raise SPOError(f"non-finite loss at step {step}; lower train.learning_rate")
            optimizer.zero_grad()
            loss.backward()
            if tr.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(judge.parameters(), tr.max_grad_norm)
            optimizer.step()
            schedule.step()
            decided = labels[:, 0] != 0.5
            correct = ((s0 > s1).float() == labels[:, 0])[decided].float().mean().item() if decided.any() else math.nan
            window.append((loss.item(), correct))
            if step % log_every == 0 or step == tr.max_steps:
                last = dict(step=step, loss=sum(w[0] for w in window) / len(window),
                            batch_accuracy=sum(w[1] for w in window) / len(window), lr=schedule.get_last_lr()[0])
                f.write(json.dumps(last) + "\n")
                f.flush()
                log(f"[latent-judge] step {step}: loss {last['loss']:.4f}, batch accuracy {last['batch_accuracy']:.3f}")
                window = []
    judge.eval()
    return last
