"""The SPO training loop: sample with the step-wise resampler, then train on the pairs.

One epoch = sample `sample.batches_per_epoch` batches of prompts with the resampler (per process),
gather the pairs from all processes and share them out evenly, then take optimizer steps over them.
Every random draw of an epoch comes from generators seeded by (seed, epoch, process), so a run
resumed from an epoch checkpoint continues exactly like the uninterrupted run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spo.config import save_config, to_plain
from spo.errors import SPOError
from spo.files import atomic_directory, keep_newest
from spo.methods.spo import spo_loss
from spo.models import FAMILIES, Conditioning, as_conditioning, guided_output
from spo.resampler import Pairs, resample
from spo.sampling import ddim_transition, transition_log_ratio

DEFAULT_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


# ------------------------------------------------------------------ configuration


@dataclass
class ModelConfig:
    pretrained: str = "world:sd"  # SD or SDXL diffusers pipeline (family read from it): hub id, local dir, world:sd
    vae: str = ""  # separate VAE replacing the pipeline's (e.g. madebyollin/sdxl-vae-fp16-fix); empty = its own
    spm: str = "world:spm"  # step-aware preference model directory (`spo train-spm` output)
    use_lora: bool = True  # False: full fine-tuning (the reference is then a frozen copy)
    lora_rank: int = 4
    lora_alpha: float = 4.0  # saved in the LoRA metadata; equal to the rank keeps a scale of 1
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    gradient_checkpointing: bool = False


@dataclass
class SampleConfig:
    num_steps: int = 20  # DDIM steps
    eta: float = 1.0  # DDIM eta; > 0 so that each step is a Gaussian transition
    guidance_scale: float = 5.0  # CFG, in sampling and in training
    num_candidates: int = 4  # K candidates per diverted step
    threshold: float = 0.3  # keep a pair only if its softmax score gap exceeds this
    divert_start_step: int = 4  # plain sampling before this step (t <= 750 trained at 20 steps)
    inner_steps: int = 0  # > 0: branch every inner_steps+1 steps, train on each transition between (SDXL recipe)
    batch_size: int = 8  # prompts per resampler call, per process
    batches_per_epoch: int = 1


@dataclass
class OptimConfig:
    beta: float = 10.0  # DPO temperature
    eps: float = 0.1  # ratio clip: log r is clamped to [log(1 - eps), log(1 + eps)]
    learning_rate: float = 6e-5
    adam_weight_decay: float = 1e-4
    batch_size: int = 8  # pairs per micro-batch
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    num_epochs: int = 10
    inner_epochs: int = 1  # passes over each epoch's pairs
    mixed_precision: str = "no"  # no | fp16 | bf16 (LoRA weights stay fp32)
    allow_tf32: bool = True
    seed: int = 0
    max_nonfinite_in_a_row: int = 10  # abort after this many skipped non-finite steps in a row


@dataclass
class LogConfig:
    output_dir: str = "runs/spo"
    checkpointing_epochs: int = 1  # write a checkpoint every N epochs (and at the end)
    checkpoints_total_limit: int = 2
    report_to: str = "tensorboard"  # tensorboard | wandb | none


@dataclass
class DPOConfig:
    """The Diffusion-DPO baseline (method: diffusion-dpo): offline pairs instead of the resampler."""

    dataset: str = "world:preference"  # Pick-a-Pic-schema pairs: hub id, save_to_disk dir, parquet dir or file
    split: str = "train"
    beta: float = 2000.0  # Wallace et al.'s SD1.5 value (their loss scales it by 1/2)
    pairs_per_epoch: int = 512  # an epoch is the unit of checkpoints and logs; the data is cycled through


METHODS = ("spo", "diffusion-dpo")


@dataclass
class SPOConfig:
    prompts: str = "world:train"  # prompt set: file (txt/json/jsonl/csv), dataset id, spo:4k or world:SPLIT
    method: str = "spo"  # spo | diffusion-dpo (the baseline; uses the dpo group and the shared model/train/log)
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)

    def validate(self) -> None:
        s, t = self.sample, self.train
        checks = [
            (s.num_candidates >= 2, f"sample.num_candidates must be >= 2 (a pair needs two), got {s.num_candidates}"),
            (0 <= s.threshold < 1, f"sample.threshold must lie in [0, 1), got {s.threshold}"),
            (0 <= s.divert_start_step < s.num_steps,
             f"sample.divert_start_step must lie in [0, num_steps={s.num_steps}), got {s.divert_start_step}"),
            (s.eta > 0, f"sample.eta must be > 0 (eta = 0 has no transition density), got {s.eta}"),
            (s.inner_steps >= 0, f"sample.inner_steps must be >= 0, got {s.inner_steps}"),
            (s.num_steps >= 1 and s.batch_size >= 1 and s.batches_per_epoch >= 1,
             "sample.num_steps, batch_size and batches_per_epoch must be >= 1"),
            (t.beta > 0, f"train.beta must be > 0, got {t.beta}"),
            (0 < t.eps < 1, f"train.eps must lie in (0, 1), got {t.eps}"),
            (t.learning_rate > 0, f"train.learning_rate must be > 0, got {t.learning_rate}"),
            (t.batch_size >= 1 and t.gradient_accumulation_steps >= 1 and t.num_epochs >= 1 and t.inner_epochs >= 1,
             "train.batch_size, gradient_accumulation_steps, num_epochs and inner_epochs must be >= 1"),
            (t.mixed_precision in ("no", "fp16", "bf16"), "train.mixed_precision must be no, fp16 or bf16"),
            (self.model.lora_rank >= 1, f"model.lora_rank must be >= 1, got {self.model.lora_rank}"),
            (self.log.report_to in ("tensorboard", "wandb", "none"), "log.report_to must be tensorboard, wandb or none"),
            (self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {self.method!r}"),
            (self.dpo.beta > 0 and self.dpo.pairs_per_epoch >= 1, "dpo.beta must be > 0 and dpo.pairs_per_epoch >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise SPOError(message)

    def digest(self) -> str:
        """Identity of the run: everything that shapes training except where it is written and how long it lasts."""
        plain = to_plain(self)
        plain["log"] = {}
        plain["train"].pop("num_epochs")
        return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------ pure pieces


def transition_inputs(pairs: Pairs, cond: Conditioning, uncond: Conditioning):
    """UNet inputs for a batch of pairs: x_t once per pair, plus x_t_lose where it differs (inner steps)."""
    cond, uncond = as_conditioning(cond), as_conditioning(uncond)
    extra = (~pairs.shared).nonzero().flatten()
    x = torch.cat([pairs.x_t, pairs.x_t_lose[extra]])
    t = torch.cat([pairs.timesteps, pairs.timesteps[extra]])
    return x, t, Conditioning.cat([cond, cond[extra]]), Conditioning.cat([uncond, uncond[extra]]), extra


def pair_loss(policy_unet, reference_out: torch.Tensor, scheduler, pairs: Pairs, cond, uncond, guidance: float,
              eta: float, beta: float, eps: float):
    """SPO loss of a batch of pairs with ONE policy and ONE reference evaluation per pair.

    Win and lose share x_t, t and prompt, so μ_θ(x_t) and μ_ref(x_t) serve both; only the
    evaluated x_{t-1} differs in the closed-form log-ratio. (Transitions inside an inner-steps
    rollout start from different states and get their own evaluation.) `reference_out` is the
    reference model's guided output on `transition_inputs(pairs, cond, uncond)`.
    """
    x, t, c, u, extra = transition_inputs(pairs, cond, uncond)
    out = guided_output(policy_unet, x, t, c, u, guidance)
    mean_pol, std, _ = ddim_transition(scheduler, out, t, x, eta)
    mean_ref, _, _ = ddim_transition(scheduler, reference_out, t, x, eta)
    n = len(pairs)
    lose_rows = torch.arange(n, device=x.device)
    lose_rows[extra] = n + torch.arange(len(extra), device=x.device)
    log_ratio_win = transition_log_ratio(pairs.win, mean_pol[:n], mean_ref[:n], std[:n])
    log_ratio_lose = transition_log_ratio(pairs.lose, mean_pol[lose_rows], mean_ref[lose_rows], std[lose_rows])
    loss, margin = spo_loss(log_ratio_win, log_ratio_lose, beta, eps)
    return loss, dict(margin=margin, log_ratio_win=log_ratio_win.detach(), log_ratio_lose=log_ratio_lose.detach())


def epoch_generator(seed: int, epoch: int, rank: int, purpose: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1009 + rank) * 7 + purpose)


def cycled_order(n_items: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """n indices into n_items: whole shuffled passes, then part of one more."""
    passes = [torch.randperm(n_items, generator=generator) for _ in range(-(-n // n_items))]
    return torch.cat(passes)[:n]


def share_out(parts: list[Pairs], rank: int, world: int, seed: int, epoch: int) -> Pairs:
    """All processes' pairs, shuffled identically everywhere, cut into `world` equal shares."""
    allp = Pairs.cat([p for p in parts if len(p)]) if any(len(p) for p in parts) else parts[0]
    n = len(allp) - len(allp) % world
    if n == 0:
        return allp.select(torch.zeros(0, dtype=torch.long))
    order = torch.randperm(len(allp), generator=epoch_generator(seed, epoch, 0, 9))[:n]
    return allp.select(order[rank::world])


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


# ------------------------------------------------------------------ the trainer


class SPOTrainer:
    """setup() -> train() -> save_outputs(); each epoch is sample_epoch() then train_epoch()."""

    def __init__(self, cfg: SPOConfig, overwrite: bool = False, resume: str = "", log=print):
        cfg.validate()
        self.cfg, self.overwrite, self.resume, self.log = cfg, overwrite, resume, log
        self.out = Path(cfg.log.output_dir)
        self.epoch = self.global_step = self.nonfinite_in_a_row = self.nonfinite_total = 0
        self.unet_rows = {"forward": 0, "train": 0}

    # ---------------------------------------------------------------- setup

    def setup(self) -> "SPOTrainer":
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        from spo.models import Diffusion, load_pipeline
        from spo.plugins import resolve

        cfg = self.cfg
        self._load_training_data()
        self.acc = Accelerator(
            cpu=not torch.cuda.is_available(),  # so that a multi-process launch on CPUs forms one group
            mixed_precision=cfg.train.mixed_precision, gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
            log_with=None if cfg.log.report_to == "none" else cfg.log.report_to,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")))
        self._check_output_dir()
        if cfg.train.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        from accelerate.utils import set_seed

        set_seed(cfg.train.seed)  # the LoRA initialisation draws from the global generators
        pipe = load_pipeline(resolve(cfg.model.pretrained), vae=resolve(cfg.model.vae) or None)
        self.diffusion = Diffusion(pipe)
        device = self.acc.device
        if cfg.method == "spo":
            from spo.preference.spm import load_scorer_model

            self.spm = load_scorer_model(resolve(cfg.model.spm)).eval().requires_grad_(False).to(device)
        for module in self.diffusion.frozen_modules():
            module.requires_grad_(False).to(device)
        unet = pipe.unet
        if cfg.model.use_lora:
            from peft import LoraConfig

            unet.requires_grad_(False)
            unet.add_adapter(LoraConfig(r=cfg.model.lora_rank, lora_alpha=cfg.model.lora_alpha,
                                        init_lora_weights="gaussian", target_modules=list(cfg.model.lora_targets)))
            self.reference_unet = None
        else:
            unet.requires_grad_(True)
            self.reference_unet = copy.deepcopy(unet).requires_grad_(False).to(device)
        if cfg.model.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.to(device)
        for model in (unet, self.reference_unet):
            if model is not None:
                model.register_forward_pre_hook(self._count_unet_rows, with_kwargs=True)
        self.trainable = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.trainable, lr=cfg.train.learning_rate, weight_decay=cfg.train.adam_weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        self.unet, self.optimizer, self.lr_scheduler = self.acc.prepare(unet, optimizer, scheduler)
        if self.resume:
            self._load_checkpoint(self.resume)
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
            (self.out / "run.json").write_text(json.dumps({"digest": cfg.digest(), "prompts": len(self.prompts)}))
            if cfg.log.report_to != "none":
                flat = {f"{g}.{k}": v for g, sub in to_plain(cfg).items() if isinstance(sub, dict)
                        for k, v in sub.items() if isinstance(v, (int, float, str, bool))}
                self.acc.init_trackers("spo", config=flat)
        return self

    def _load_training_data(self) -> None:
        """SPO samples its own pairs from prompts; the Diffusion-DPO baseline reads offline pairs."""
        from spo.plugins import resolve

        if self.cfg.method == "spo":
            from spo.prompts import load_prompts

            self.prompts = load_prompts(self.cfg.prompts)
            return
        from spo.preference.data import load_preference_dataset

        data = load_preference_dataset(resolve(self.cfg.dpo.dataset), self.cfg.dpo.split)
        # Diffusion-DPO learns from strict preferences only; ties are dropped as in the authors' script.
        self.pairs_data = data.filter(lambda a, b: a != b, input_columns=["label_0", "label_1"])
        self.prompts = []
        self.log(f"[diffusion-dpo] {len(self.pairs_data)} pairs with a strict preference "
                 f"({len(data) - len(self.pairs_data)} ties dropped)")
        if len(self.pairs_data) == 0:
            raise SPOError(f"no strictly preferred pairs in {self.cfg.dpo.dataset} ({self.cfg.dpo.split})")

    def _count_unet_rows(self, module, args, kwargs) -> None:
        """Machine-independent compute: UNet rows evaluated with gradients (forward + backward) or without."""
        sample = args[0] if args else kwargs["sample"]
        self.unet_rows["train" if torch.is_grad_enabled() else "forward"] += len(sample)

    def _check_output_dir(self) -> None:
        if self.resume or not (self.out / "run.json").exists():
            return
        if not self.overwrite:
            raise SPOError(f"{self.out} already holds a run; pass --overwrite to replace it, "
                           f"--resume to continue it, or choose another log.output_dir")
        if self.acc.is_main_process:
            shutil.rmtree(self.out)
        self.acc.wait_for_everyone()

    # ---------------------------------------------------------------- sampling

    def reference_output(self, x_t, t, cond, uncond, guidance: float | None = None) -> torch.Tensor:
        """The frozen base model's guided output: adapters switched off, no second copy of the UNet."""
        guidance = self.cfg.sample.guidance_scale if guidance is None else guidance
        with torch.no_grad():
            if self.reference_unet is not None:
                return guided_output(self.reference_unet, x_t, t, cond, uncond, guidance)
            base = self.acc.unwrap_model(self.unet)
            base.disable_adapters()
            try:
                return guided_output(base, x_t, t, cond, uncond, guidance)
            finally:
                base.enable_adapters()

    def sample_epoch(self, epoch: int):
        s = self.cfg.sample
        gen = epoch_generator(self.cfg.train.seed, epoch, self.acc.process_index, 1)
        self.diffusion.pipe.unet = self.acc.unwrap_model(self.unet)
        parts, stats, prompts = [], [], []
        self.unet.eval()
        for _ in range(s.batches_per_epoch):
            idx = torch.randint(len(self.prompts), (s.batch_size,), generator=gen)
            batch_prompts = [self.prompts[i] for i in idx]
            with self.acc.autocast():
                result = resample(self.diffusion, self.spm, batch_prompts, s.num_steps, s.guidance_scale, s.eta,
                                  s.num_candidates, s.threshold, s.divert_start_step, gen, s.inner_steps)
            result.pairs.prompt_index += len(prompts)
            prompts += batch_prompts
            parts.append(result.pairs)
            stats += result.stats
        self.unet.train()
        return Pairs.cat(parts), stats, prompts

    # ---------------------------------------------------------------- training

    def train_epoch(self, pairs: Pairs, prompts: list[str], epoch: int) -> dict:
        from accelerate.utils import gather_object

        cfg, acc = self.cfg, self.acc
        everyone = gather_object([(pairs, prompts)])
        shifted = []
        offset = 0
        for part, part_prompts in everyone:  # prompt indices become indices into the concatenated list
            shifted.append(Pairs(**{**part.__dict__, "prompt_index": part.prompt_index + offset}))
            offset += len(part_prompts)
        all_prompts = [p for _, ps in everyone for p in ps]
        mine = share_out(shifted, acc.process_index, acc.num_processes, cfg.train.seed, epoch)
        metrics = {"loss": [], "reward_accuracy": [], "ratio_win": [], "ratio_lose": [], "clipped": []}
        if len(mine) == 0:
            return {"pairs_trained": 0}
        device, b = acc.device, cfg.train.batch_size
        t0 = time.time()
        self.diffusion.scheduler.set_timesteps(cfg.sample.num_steps)
        for inner in range(cfg.train.inner_epochs):
            order = torch.randperm(len(mine), generator=epoch_generator(cfg.train.seed, epoch, 0, 10 + inner))
            for start in range(0, len(mine), b):
                batch = mine.select(order[start : start + b])
                batch = batch.to(device)
                cond, uncond = self.diffusion.encode_prompts([all_prompts[i] for i in batch.prompt_index.tolist()])
                self._step(batch, cond, uncond, metrics)
        n = len(mine)
        out = {k: float(torch.tensor(v).float().mean()) if v else float("nan") for k, v in metrics.items()}
        out.update(pairs_trained=n, pairs_per_s=n * cfg.train.inner_epochs / max(time.time() - t0, 1e-9))
        return out

    def _step(self, batch: Pairs, cond, uncond, metrics: dict) -> None:
        cfg, acc = self.cfg, self.acc
        with acc.accumulate(self.unet):
            with acc.autocast():
                x, t, c, u, _ = transition_inputs(batch, cond, uncond)
                ref = self.reference_output(x, t, c, u)
                loss, info = pair_loss(self.unet, ref, self.diffusion.scheduler, batch, cond, uncond,
                                       cfg.sample.guidance_scale, cfg.sample.eta, cfg.train.beta, cfg.train.eps)
            if not self._optimize(loss):
                return
        lo, hi = math.log(1 - cfg.train.eps), math.log(1 + cfg.train.eps)
        lw, ll = info["log_ratio_win"], info["log_ratio_lose"]
        metrics["loss"].append(loss.item())
        metrics["reward_accuracy"].append((info["margin"] > 0).float().mean().item())
        metrics["ratio_win"].append(lw.exp().mean().item())
        metrics["ratio_lose"].append(ll.exp().mean().item())
        metrics["clipped"].append(((lw < lo) | (lw > hi) | (ll < lo) | (ll > hi)).float().mean().item())

    def _optimize(self, loss: torch.Tensor) -> bool:
        """Backward and (at the end of an accumulation) an optimizer step; False when the loss was skipped."""
        cfg, acc = self.cfg, self.acc
        if not torch.isfinite(loss):
            self.nonfinite_total += 1
            self.nonfinite_in_a_row += 1
            self.optimizer.zero_grad()
            self.log(f"[{cfg.method}] warning: non-finite loss skipped ({self.nonfinite_in_a_row} in a row)")
            if self.nonfinite_in_a_row >= cfg.train.max_nonfinite_in_a_row:
                raise SPOError(f"{self.nonfinite_in_a_row} non-finite losses in a row; lower train.learning_rate "
                               f"or use mixed_precision=bf16/no")
            return False
        self.nonfinite_in_a_row = 0
        acc.backward(loss)
        if acc.sync_gradients and cfg.train.max_grad_norm > 0:
            acc.clip_grad_norm_(self.trainable, cfg.train.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        if acc.sync_gradients:
            self.global_step += 1
        return True

    # ---------------------------------------------------------------- the Diffusion-DPO baseline

    def dpo_epoch(self, epoch: int) -> dict:
        """`dpo.pairs_per_epoch` offline pairs, the same order on every process, each taking its share."""
        from spo.preference.data import PairCollator

        cfg, acc = self.cfg, self.acc
        collate = PairCollator(self.diffusion.resolution)
        order = cycled_order(len(self.pairs_data), cfg.dpo.pairs_per_epoch, epoch_generator(cfg.train.seed, epoch, 0, 20))
        mine = order[acc.process_index :: acc.num_processes].tolist()
        gen = epoch_generator(cfg.train.seed, epoch, acc.process_index, 21)
        metrics = {"loss": [], "reward_accuracy": [], "margin": []}
        t0, used = time.time(), 0
        for start in range(0, len(mine), cfg.train.batch_size):
            batch = collate([self.pairs_data[i] for i in mine[start : start + cfg.train.batch_size]])
            if batch is None:
                continue
            first_wins = (batch["labels"][:, 0] > 0.5)[:, None, None, None]
            win = torch.where(first_wins, batch["img0"], batch["img1"])
            lose = torch.where(first_wins, batch["img1"], batch["img0"])
            self._dpo_step(win, lose, batch["captions"], gen, metrics)
            used += len(win)
        out = {k: float(torch.tensor(v).float().mean()) if v else float("nan") for k, v in metrics.items()}
        out.update(pairs_trained=used, pairs_per_s=used / max(time.time() - t0, 1e-9),
                   data={k: v for k, v in collate.report.summary().items() if k != "pairs used"})
        return out

    def _dpo_step(self, win, lose, captions: list[str], gen: torch.Generator, metrics: dict) -> None:
        from spo.methods.diffusion_dpo import denoising_target, diffusion_dpo_loss, per_sample_mse
        from spo.sampling import add_noise

        cfg, acc, d = self.cfg, self.acc, self.diffusion
        n = len(captions)
        latents = d.encode_images(torch.cat([win, lose]))
        noise = torch.randn(latents[:n].shape, generator=gen).to(latents).repeat(2, 1, 1, 1)  # shared by the pair
        t = torch.randint(0, d.scheduler.config.num_train_timesteps, (n,), generator=gen).repeat(2).to(latents.device)
        x_t = add_noise(d.scheduler, latents, noise, t)
        target = denoising_target(d.scheduler, latents, noise, t)
        cond, _ = d.encode_prompts(captions + captions)
        with acc.accumulate(self.unet):
            with acc.autocast():
                err_ref = per_sample_mse(self.reference_output(x_t, t, cond, cond, guidance=1.0), target)
                err_pol = per_sample_mse(guided_output(self.unet, x_t, t, cond, cond, 1.0), target)
                loss, margin = diffusion_dpo_loss(err_pol[:n], err_pol[n:], err_ref[:n], err_ref[n:], cfg.dpo.beta)
            if not self._optimize(loss):
                return
        metrics["loss"].append(loss.item())
        metrics["reward_accuracy"].append((margin > 0).float().mean().item())
        metrics["margin"].append(margin.mean().item())

    # ---------------------------------------------------------------- the loop

    def train(self, on_epoch_end=None) -> Path:
        """Run the remaining epochs; `on_epoch_end(trainer)` is called after each (e.g. to snapshot or evaluate)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        bar = tqdm(total=cfg.train.num_epochs, initial=self.epoch, desc=cfg.method, disable=not self.acc.is_main_process)
        while self.epoch < cfg.train.num_epochs:
            t0 = time.time()
            m = self._spo_epoch(self.epoch) if cfg.method == "spo" else self.dpo_epoch(self.epoch)
            self.epoch += 1
            m.update(epoch=self.epoch, step=self.global_step, lr=self.lr_scheduler.get_last_lr()[0],
                     epoch_seconds=time.time() - t0, peak_memory_mb=peak_memory_mb(self.acc.device),
                     nonfinite_skipped=self.nonfinite_total, unet_forward_rows=self.unet_rows["forward"],
                     unet_train_rows=self.unet_rows["train"])
            self._record(m)
            bar.update(1)
            bar.set_postfix(loss=f"{m.get('loss', float('nan')):.4f}", acc=f"{m.get('reward_accuracy', float('nan')):.2f}",
                            pairs=m.get("pairs_trained", 0))
            if self.epoch % cfg.log.checkpointing_epochs == 0 or self.epoch == cfg.train.num_epochs:
                self.save_checkpoint()
            if on_epoch_end is not None:
                on_epoch_end(self)
        bar.close()
        return self.save_outputs()

    def _spo_epoch(self, epoch: int) -> dict:
        t0 = time.time()
        pairs, stats, prompts = self.sample_epoch(epoch)
        t_sample = time.time() - t0
        m = self.train_epoch(pairs, prompts, epoch)
        kept = sum(s.kept for s in stats) / max(1, sum(s.candidates for s in stats))
        spm_mean = sum(s.score_sum for s in stats) / max(1, sum(s.candidates for s in stats))
        m.update(pairs_sampled=len(pairs), fraction_kept=kept, spm_score=spm_mean, sample_seconds=t_sample)
        return m

    def _record(self, m: dict) -> None:
        if self.cfg.log.report_to != "none":
            self.acc.log({k: v for k, v in m.items() if isinstance(v, (int, float))}, step=self.epoch)
        if self.acc.is_main_process:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(m) + "\n")

    # ---------------------------------------------------------------- files

    def trainable_state(self) -> dict[str, torch.Tensor]:
        unet = self.acc.unwrap_model(self.unet)
        return {n: p.detach().float().cpu().contiguous() for n, p in unet.named_parameters() if p.requires_grad}

    def save_checkpoint(self) -> Path:
        from safetensors.torch import save_file

        self.acc.wait_for_everyone()
        final = self.out / "checkpoints" / f"epoch-{self.epoch}"
        if self.acc.is_main_process:
            with atomic_directory(final) as tmp:
                save_file(self.trainable_state(), str(tmp / "trainable.safetensors"))
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(self.lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
                save_config(self.cfg, tmp / "config.yaml")
                # state.json is written last: a checkpoint without it is incomplete and never resumed from
                (tmp / "state.json").write_text(json.dumps(dict(
                    epoch=self.epoch, global_step=self.global_step, digest=self.cfg.digest(),
                    nonfinite_total=self.nonfinite_total, unet_rows=self.unet_rows)))
            done = sorted(self.out.glob("checkpoints/epoch-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
            keep_newest(done, self.cfg.log.checkpoints_total_limit)
        self.acc.wait_for_everyone()
        return final

    def _load_checkpoint(self, where: str) -> None:
        from safetensors.torch import load_file

        ckpt = latest_checkpoint(self.out) if where == "latest" else Path(where)
        if ckpt is None or not (ckpt / "state.json").is_file():
            raise SPOError(f"no complete checkpoint to resume from at {where!r} (looked in {self.out / 'checkpoints'})")
        state = json.loads((ckpt / "state.json").read_text())
        if state["digest"] != self.cfg.digest():
            raise SPOError(f"checkpoint {ckpt} was written by a run with a different config; resume with the same "
                           f"config (only log.* and train.num_epochs may change)")
        weights = load_file(str(ckpt / "trainable.safetensors"))
        unet = self.acc.unwrap_model(self.unet)
        params = dict(unet.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(ckpt / "lr_scheduler.pt", weights_only=True))
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.unet_rows = dict(state.get("unet_rows", self.unet_rows))
        self.log(f"[spo] resumed from {ckpt} (epoch {self.epoch}, step {self.global_step})")

    def save_outputs(self) -> Path:
        """LoRA in the diffusers format (`load_lora_weights` reads it), or a full pipeline directory."""
        self.acc.wait_for_everyone()
        unet = self.acc.unwrap_model(self.unet)
        ranks = self.out / "ranks"
        ranks.mkdir(parents=True, exist_ok=True)
        # One fingerprint per process: data-parallel processes must end with identical weights.
        (ranks / f"rank-{self.acc.process_index}.sha256").write_text(weights_fingerprint(self.trainable_state()))
        target = self.out / ("lora" if self.cfg.model.use_lora else "pipeline")
        if self.acc.is_main_process:
            with atomic_directory(target) as tmp:
                if self.cfg.model.use_lora:
                    save_lora(unet, tmp, self.cfg.model.lora_rank, self.cfg.model.lora_alpha, type(self.diffusion.pipe))
                else:
                    self.diffusion.pipe.unet = unet
                    self.diffusion.pipe.save_pretrained(tmp)
            from spo.plots import training_curves

            training_curves(self.out / "metrics.jsonl", self.out / "curves.png")
        self.acc.end_training()
        return target


def save_lora(unet, directory: Path, rank: int, alpha: float, pipeline_cls=None) -> None:
    """The UNet's LoRA in the format `pipeline_cls.load_lora_weights` reads (SD's pipeline by default)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    # The adapter metadata carries lora_alpha; without it diffusers would reload alpha = rank.
    metadata = unet.peft_config["default"].to_dict()
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}
    pipeline_cls = pipeline_cls or StableDiffusionPipeline
    pipeline_cls.save_lora_weights(str(directory), unet_lora_layers=layers, safe_serialization=True,
                                   unet_lora_adapter_metadata=metadata)
    family = FAMILIES.get(pipeline_cls.__name__, "sd")  # so that a LoRA is never applied to the other family
    (directory / "spo_lora.json").write_text(json.dumps({"rank": rank, "alpha": alpha, "family": family}))


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].numpy().tobytes())
    return h.hexdigest()


def latest_checkpoint(out: Path) -> Path | None:
    done = [p for p in out.glob("checkpoints/epoch-*[0-9]") if (p / "state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None
