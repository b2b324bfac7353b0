"""Training the step-aware preference model (`spo train-spm`).

Each step: encode both images of a pair with the VAE, add the same noise at one random t to both,
take one classifier-free-guided denoising step with the frozen diffusion model to get x0-predictions,
decode them, score both with the time-conditioned CLIP at t, and apply the PickScore loss (soft
Bradley–Terry targets, ties 0.5/0.5, per-prompt weights).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from spo.errors import SPOError
from spo.config import SPMTrainConfig
from spo.preference.noising import noisy_x0_images

MAX_BAD_IN_A_ROW = 10  # non-finite losses in a row before train-spm gives up (x5 for unusable batches)


# ------------------------------------------------------------------ pure pieces


def pickscore_loss(logits_0: torch.Tensor, logits_1: torch.Tensor, labels: torch.Tensor,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of softmax([s0, s1]) against the label distribution (ties = 0.5/0.5), weighted mean."""
    log_p = F.log_softmax(torch.stack([logits_0, logits_1], dim=-1).float(), dim=-1)
    per_pair = -(labels.float() * log_p).sum(-1)
    if weights is None:
        return per_pair.mean()
    return (per_pair * weights).sum() / weights.sum()


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


def _relabel(ds, spm, resolution: int, threshold: float, ties: str, batch: int = 64):
    """Replace labels by the base model's preference at t=0 (the authors' SDXL recipe).

    A pair the base model separates by at most `threshold` (|p0 - p1| of the 2-way softmax) becomes a
    tie (0.5/0.5, kept, as the authors do) or, with ties="drop", leaves the data.
    """
    from spo.preference.data import PairCollator

    collate = PairCollator(resolution)
    dev = next(spm.parameters()).device

    def fn(rows):
        n = len(rows["caption"])
        items = [{k: rows[k][i] for k in rows} for i in range(n)]
        new0, new1, keep = [], [], []
        for item in items:
            b = collate([item])
            if b is None:  # unusable (e.g. labels 0/0): left as it is, so the training collator counts and skips it
                new0.append(item["label_0"]), new1.append(item["label_1"]), keep.append(True)
                continue
            with torch.no_grad():
                s = torch.stack([spm(b["img0"].to(dev), b["captions"], 0), spm(b["img1"].to(dev), b["captions"], 0)], -1)
            p = s.float().softmax(-1)[0]
            decided = bool((p[0] - p[1]).abs() > threshold)
            new0.append(float(p[0] > p[1]) if decided else 0.5)
            new1.append(1.0 - new0[-1])
            keep.append(decided or ties == "tie")
        return {"label_0": new0, "label_1": new1, "_keep": keep}

    ds = ds.map(fn, batched=True, batch_size=batch, desc="relabel with the base model")
    return ds.filter(lambda k: k, input_columns="_keep").remove_columns("_keep")


def _save_checkpoint(accelerator, output: Path, step: int, limit: int, spm, report=None) -> Path:
    from spo.files import atomic_directory
    from spo.runtime import assert_finite, rotate_checkpoints, write_manifest

    assert_finite(dict(accelerator.unwrap_model(spm).named_parameters()), f"checkpoint step-{step}")
    final = output / "checkpoints" / f"step-{step}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic_directory(final) as tmp:
            accelerator.save_state(str(tmp))
            if report is not None:  # so that a resumed run goes on counting the same distinct rows
                (tmp / "data_report.json").write_text(json.dumps(report.state()))
            (tmp / "train_state.json").write_text(json.dumps({"global_step": step, "manifest": 1}))
            write_manifest(tmp)  # last: sizes and checksums of every file, verified on resume
        rotate_checkpoints(output, "step", limit, keep=final)
    accelerator.wait_for_everyone()
    return final


def _data_report(accelerator, collate):
    """The data report of all processes together; a collective call (every process makes it)."""
    if accelerator.num_processes == 1:
        return collate.report
    from accelerate.utils import gather_object

    from spo.preference.data import DataReport

    merged = DataReport()
    for state in gather_object([collate.report.state()]):
        merged.merge(state)
    return merged


def _write_data_report(output: Path, report, **extra) -> None:
    """OUT/data_report.json, rewritten whole (atomically) as the run goes: a killed run keeps the last one."""
    from spo.files import atomic_write_text

    atomic_write_text(output / "data_report.json", json.dumps(dict(report.summary(), **extra), indent=2))


def _optimizer_groups(spm, cfg) -> list[dict]:
    """One learning rate for all (the authors), or a separate one for the new conditioning layers."""
    trainable = [(n, p) for n, p in spm.named_parameters() if p.requires_grad]
    if cfg.train.conditioning_learning_rate == 0:
        return [{"params": [p for _, p in trainable], "lr": cfg.train.learning_rate}]
    cond = [p for n, p in trainable if n.startswith("conditioning.")]
    clip = [p for n, p in trainable if not n.startswith("conditioning.")]
    return [g for g in ({"params": cond, "lr": cfg.train.conditioning_learning_rate},
                        {"params": clip, "lr": cfg.train.learning_rate}) if g["params"]]


def train_spm(cfg: SPMTrainConfig, log=print, resume: str = "", overwrite: bool = False) -> Path:
    """Train the step-aware preference model; returns the saved model's directory (OUT/spm).

    The output folder is locked for the whole run (one run per folder; a launch's main process holds it).
    """
    from spo.runtime import RunLock, is_main_process

    cfg.validate()
    with RunLock(cfg.log.output_dir, log=log, active=is_main_process()):
        return _train_spm(cfg, log, resume, overwrite)


def _train_spm(cfg: SPMTrainConfig, log, resume: str, overwrite: bool) -> Path:
    from accelerate.utils import set_seed

    from spo.config import check_resume_config, save_config, to_plain
    from spo.models import load_diffusion
    from spo.plugins import resolve
    from spo.preference.data import PairCollator, load_preference_dataset, prompt_weights
    from spo.preference.spm import StepAwareCLIP
    from spo.runtime import (assert_finite, check_output_dir, init_trackers, make_accelerator, replace_old_run,
                             resume_checkpoint, run_name, stream)

    cfg.validate()
    d, m, tr, lg = cfg.data, cfg.model, cfg.train, cfg.log
    output = Path(lg.output_dir)
    accelerator = make_accelerator(output, tr.mixed_precision, tr.gradient_accumulation_steps, lg.report_to)
    check_output_dir(output, "config.yaml", overwrite, bool(resume))
    if resume:  # before any model loads: a changed setting is named, not discovered after minutes
        check_resume_config(output / "config.yaml", cfg)
    set_seed(tr.seed)
    ds = load_preference_dataset(resolve(d.dataset), d.split)
    diffusion = load_diffusion(resolve(m.diffusion_model), vae=resolve(m.vae) or None)
    if tr.t_max >= diffusion.scheduler.config.num_train_timesteps:
        raise SPOError(f"train.t_max must be < {diffusion.scheduler.config.num_train_timesteps} (the model's "
                       f"num_train_timesteps), got {tr.t_max}")
    for module in (diffusion.unet, *diffusion.frozen_modules()):
        module.requires_grad_(False).to(accelerator.device)
    spm = StepAwareCLIP.from_base(resolve(m.base), resolve(m.processor) or None, time_conditioned=m.time_conditioned,
                                  num_train_timesteps=diffusion.scheduler.config.num_train_timesteps)
    # Record what it was built from as the user named it ("world:pickscore"), not this machine's path.
    spm.config.base_model, spm.config.processor = m.base, m.processor or m.base
    if d.relabel_threshold >= 0:
        ds = _relabel(ds, spm.to(accelerator.device), diffusion.resolution, d.relabel_threshold, d.relabel_ties)
        log(f"[spm] relabelled with the base model at t=0: {len(ds)} pairs (gap <= {d.relabel_threshold}: "
            f"{'ties' if d.relabel_ties == 'tie' else 'dropped'})")
    if d.per_prompt_weighting:
        ds = ds.add_column("weight", prompt_weights(list(ds["caption"])).tolist())
    if len(ds) == 0:
        raise SPOError(f"no usable pairs in {d.dataset} ({d.split})")

    trainable = set_trainable(spm, m.train_params)
    optimizer = torch.optim.AdamW(_optimizer_groups(spm, cfg), weight_decay=tr.weight_decay)
    collate = PairCollator(diffusion.resolution)
    ds = ds.add_column("_row", list(range(len(ds))))  # the data report counts distinct rows, not draws
    loader = torch.utils.data.DataLoader(ds, batch_size=tr.batch_size, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(tr.seed))
    scheduler = _lr_schedule(optimizer, tr, accelerator.num_processes)
    spm, optimizer, loader, scheduler = accelerator.prepare(spm, optimizer, loader, scheduler)

    step, skip = 0, 0
    if resume:
        ckpt = resume_checkpoint(output, "step", "train_state.json", resume, log)
        accelerator.load_state(str(ckpt))
        step = json.loads((ckpt / "train_state.json").read_text())["global_step"]
        if (ckpt / "data_report.json").is_file():
            collate.report.merge(json.loads((ckpt / "data_report.json").read_text()))
        skip = (step * tr.gradient_accumulation_steps) % len(loader)
        log(f"[spm] resumed from {ckpt} at step {step}")
    replace_old_run(output, "config.yaml", overwrite, bool(resume), accelerator)  # everything loaded: now safe
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output / "config.yaml")
    init_trackers(accelerator, lg.tracker_project, to_plain(cfg), lg.report_to, run_name(lg))
    log(f"[spm] training {len(trainable)} parameter tensors ({m.train_params}) on {len(ds)} pairs")
    bar = tqdm(total=tr.max_steps, initial=step, desc="train-spm", disable=not accelerator.is_main_process)
    t0, seen, micro = time.time(), 0, step * tr.gradient_accumulation_steps
    unusable = nonfinite = 0
    while step < tr.max_steps:
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        for batch in batches:
            if batch is None:  # every pair of the batch was unusable (counted in the data report)
                unusable += 1
                if unusable >= MAX_BAD_IN_A_ROW * 5:
                    raise SPOError(f"{unusable} batches in a row held no usable pair; check data.dataset "
                                   f"({d.dataset}): images, labels and captions (see the data report)")
                continue
            unusable = 0
            # t and the noise of micro-batch i come from their own stream: a resumed run draws the same ones
            noise_gen = stream(tr.seed, 0, accelerator.process_index, "spm_noise", micro)
            micro += 1
            with accelerator.accumulate(spm):
                n = len(batch["captions"])
                t = torch.randint(tr.t_min, tr.t_max + 1, (n,), generator=noise_gen)
                x0_0, x0_1 = noisy_x0_images(diffusion, batch["img0"], batch["img1"], batch["captions"], t,
                                             tr.guidance_scale, noise_gen)
                t = t.to(accelerator.device)
                logits_0 = spm(x0_0, batch["captions"], t)
                logits_1 = spm(x0_1, batch["captions"], t)
                loss = pickscore_loss(logits_0, logits_1, batch["labels"], batch["weights"])
                if not torch.isfinite(loss):
                    nonfinite += 1
                    optimizer.zero_grad()
                    log(f"[spm] warning: non-finite loss skipped ({nonfinite} in a row)")
                    if nonfinite >= MAX_BAD_IN_A_ROW:
                        raise SPOError(f"{nonfinite} non-finite losses in a row; lower train.learning_rate, check "
                                       f"train.guidance_scale, or use train.mixed_precision=bf16/no")
                    continue
                nonfinite = 0
                accelerator.backward(loss)
                if accelerator.sync_gradients and tr.max_grad_norm > 0:
                    accelerator.clip_grad_norm_([p for p in spm.parameters() if p.requires_grad], tr.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            seen += n
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            decided = batch["labels"][:, 0] != 0.5
            acc = ((logits_0 > logits_1).float().cpu() == batch["labels"][:, 0])[decided].float().mean().item() if decided.any() else float("nan")
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
            if step % lg.log_every == 0 and lg.report_to != "none":
                accelerator.log({"train/loss": loss.item(), "train/batch_accuracy": acc, "train/t_mean": t.float().mean().item(),
                                 "train/lr": scheduler.get_last_lr()[0],
                                 "train/pairs_per_s": seen / (time.time() - t0)}, step=step)
            checkpoint_due = (lg.checkpointing_steps and step % lg.checkpointing_steps == 0) or step == tr.max_steps
            if checkpoint_due or step % lg.log_every == 0:
                report = _data_report(accelerator, collate)
                if accelerator.is_main_process:
                    _write_data_report(output, report, steps=step, train_seconds=round(time.time() - t0, 1))
            if checkpoint_due:
                _save_checkpoint(accelerator, output, step, lg.checkpoints_total_limit, spm, report)
            if step >= tr.max_steps:
                break
    bar.close()
    final = output / "spm"
    report = _data_report(accelerator, collate)
    if accelerator.is_main_process:
        from spo.files import atomic_directory

        model = accelerator.unwrap_model(spm)
        assert_finite(dict(model.named_parameters()), "the step-aware preference model")
        with atomic_directory(final) as tmp:
            model.save_pretrained(tmp)
        _write_data_report(output, report, train_seconds=round(time.time() - t0, 1), steps=step)
        log("[spm] data: " + ", ".join(f"{k}: {v}" for k, v in report.summary().items()))
    accelerator.end_training()
    return final


def _lr_schedule(optimizer, tr, num_processes: int):
    """diffusers' schedule over the run's optimizer steps (counted per process, as accelerate steps it)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(tr.lr_scheduler, optimizer, num_warmup_steps=tr.lr_warmup_steps * num_processes,
                         num_training_steps=tr.max_steps * num_processes)
