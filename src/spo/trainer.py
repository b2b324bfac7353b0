"""The generic training loop: accelerator, optimisation, non-finite guard, logging, checkpoints, export.

What is trained on, and with which loss, belongs to the method (`spo.methods`: SPO samples its pairs
with the step-wise resampler; Diffusion-DPO reads offline pairs). Every random draw of an epoch comes
from streams seeded by (seed, epoch, process, purpose), so a run resumed from an epoch checkpoint
continues exactly like the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import signal
import threading
import time
from pathlib import Path

import torch

from spo.config import SPOConfig, check_resume_config, save_config, to_plain
from spo.errors import SPOError
from spo.files import atomic_directory, atomic_write_text
from spo.lora import check_init_lora, load_lora_into
from spo.methods import get_method
from spo.models import FAMILIES, check_lora_targets, lora_save_kwargs, read_call_defaults, save_pipeline
from spo.runtime import (
    RunLock,
    assert_finite,
    check_output_dir,
    init_trackers,
    make_accelerator,
    peak_memory_mb,
    replace_old_run,
    resume_checkpoint,
    rotate_checkpoints,
    run_name,
    weights_fingerprint,
    write_manifest,
)

__all__ = ["Trainer", "SPOTrainer", "save_lora", "run_summary"]


def _lock_released(always: bool):
    """Release the trainer's run lock when the method raises (SPOError, KeyboardInterrupt, ...) or, with
    `always`, whenever it returns: setup() takes the lock, train() ends the run."""
    def wrap(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            try:
                result = method(self, *args, **kwargs)
            except BaseException:
                if getattr(self, "lock", None) is not None:
                    self.lock.release()
                raise
            if always and getattr(self, "lock", None) is not None:
                self.lock.release()
            return result
        return run
    return wrap


class Trainer:
    """setup() -> train() -> save_outputs(); each epoch trains on the batches its method yields."""

    def __init__(self, cfg: SPOConfig, overwrite: bool = False, resume: str = "", log=print):
        cfg.validate()
        self.cfg, self.overwrite, self.resume, self.log = cfg, overwrite, resume, log
        self.method = get_method(cfg.method)(cfg)
        self.out = Path(cfg.log.output_dir)
        self.epoch = self.global_step = self.nonfinite_in_a_row = self.nonfinite_total = 0
        self.unet_rows = {"forward": 0, "train": 0}
        self.dataset_size = 0
        self.position = 0  # where the current epoch continues (the method's SafePoint position)
        self.partial_metrics: dict[str, list[float]] = {}  # the current epoch's per-step metrics so far
        self.last_checkpoint_step = self.last_validation_step = 0
        self.stop_requested = False

    # ---------------------------------------------------------------- setup

    @_lock_released(always=False)
    def setup(self) -> "Trainer":
        from accelerate.utils import set_seed

        from spo.models import load_diffusion
        from spo.plugins import resolve

        cfg = self.cfg
        # A missing optimizer package or a mismatched init LoRA fails before any model is loaded.
        optimizer_cls = optimizer_class(cfg.train.optimizer)
        if cfg.model.init_lora:
            check_init_lora(cfg.model)
        self.method.load_data(self)
        self.acc = make_accelerator(self.out, cfg.train.mixed_precision, cfg.train.gradient_accumulation_steps,
                                    cfg.log.report_to)
        # One run per folder, taken before anything is read from or deleted in it; train() releases it.
        self.lock = RunLock(self.out, log=self.log, active=self.acc.is_main_process).acquire()
        check_output_dir(self.out, "run.json", self.overwrite, bool(self.resume))
        if cfg.train.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        set_seed(cfg.train.seed)  # the LoRA initialisation draws from the global generators
        self.diffusion = load_diffusion(resolve(cfg.model.pretrained), vae=resolve(cfg.model.vae) or None,
                                        sample=cfg.sample)
        if cfg.model.use_lora:  # a misspelt target fails before the judge loads, and is never skipped silently
            check_lora_targets(self.diffusion.unet, cfg.model.lora_targets)
        self.method.load_models(self)
        self.diffusion.freeze(self.acc.device, self.weight_dtype)
        unet = self._trainable_network(self.diffusion.unet)
        self.trainable = [p for p in unet.parameters() if p.requires_grad]
        optimizer = optimizer_cls(self.trainable, lr=cfg.train.learning_rate, weight_decay=cfg.train.adam_weight_decay)
        self.unet, self.optimizer = self.acc.prepare(unet, optimizer)
        # Stepped once per optimizer step here (not through accelerate, which would step it per process).
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        if self.resume:
            self._load_checkpoint(self.resume)
        replace_old_run(self.out, "run.json", self.overwrite, bool(self.resume), self.acc)  # all loaded: now safe
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
            (self.out / "run.json").write_text(json.dumps({"digest": cfg.digest(), "prompts": self.dataset_size}))
        init_trackers(self.acc, cfg.log.tracker_project, to_plain(cfg), cfg.log.report_to, run_name(cfg.log))
        return self

    def _trainable_network(self, unet):
        """LoRA adapters on the frozen network (reference = adapters off), or the whole network and a frozen copy."""
        m = self.cfg.model
        if m.use_lora:
            from diffusers.training_utils import cast_training_params
            from peft import LoraConfig

            # The frozen base in the mixed-precision dtype, the LoRA weights in fp32 (diffusers' recipe).
            unet.requires_grad_(False)
            if self.weight_dtype != torch.float32:
                unet.to(dtype=self.weight_dtype)
            unet.add_adapter(LoraConfig(r=m.lora_rank, lora_alpha=m.lora_alpha, init_lora_weights="gaussian",
                                        target_modules=list(m.lora_targets)))
            cast_training_params(unet, dtype=torch.float32)
            if m.init_lora:  # a run continued from another run's LoRA; the reference stays the base (adapters off)
                load_lora_into(unet, Path(m.init_lora))
            self.reference_unet = None
        else:
            unet.requires_grad_(True)
            self.reference_unet = copy.deepcopy(unet).requires_grad_(False).to(self.acc.device)
        if m.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.to(self.acc.device)
        for model in (unet, self.reference_unet):
            if model is not None:
                model.register_forward_pre_hook(self._count_unet_rows, with_kwargs=True)
        return unet

    def _count_unet_rows(self, module, args, kwargs) -> None:
        """Machine-independent compute: UNet rows evaluated with gradients (forward + backward) or without."""
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))  # a UNet's or a transformer's
        if sample is not None:
            self.unet_rows["train" if torch.is_grad_enabled() else "forward"] += len(sample)

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of frozen weights: the mixed-precision dtype (trainable weights always stay fp32)."""
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.cfg.train.mixed_precision, torch.float32)

    # ---------------------------------------------------------------- what methods call

    def reference_output(self, x_t, t, cond, uncond, guidance: float) -> torch.Tensor:
        """The frozen base model's guided output: adapters switched off, no second copy of the UNet."""
        with torch.no_grad():
            if self.reference_unet is not None:
                return self.diffusion.guided_output(x_t, t, cond, uncond, guidance, model=self.reference_unet)
            base = self.acc.unwrap_model(self.unet)
            base.disable_adapters()
            try:
                return self.diffusion.guided_output(x_t, t, cond, uncond, guidance, model=base)
            finally:
                base.enable_adapters()

    # ---------------------------------------------------------------- optimisation

    def train_epoch(self, epoch: int) -> dict | None:
        """Train on the batches the method yields for `epoch` from `self.position` on; epoch-mean metrics,
        or None when a stop was requested (a checkpoint was written at a safe point)."""
        from spo.methods.base import SafePoint

        metrics = self.partial_metrics
        for batch in self.method.batches(self, epoch, self.position):
            if isinstance(batch, SafePoint):
                self.position = batch.position
                if self._at_safe_point():
                    return None
                continue
            with self.acc.accumulate(self.unet):
                with self.acc.autocast():
                    loss, info = self.method.loss(self, batch)
                if not self._optimize(loss):
                    continue
            scalars = {"loss": loss.item(), **info}
            for k, v in scalars.items():
                metrics.setdefault(k, []).append(v)
            if self.acc.sync_gradients:
                self.log_scalars({f"train/{k}": v for k, v in scalars.items()} | {"train/lr": self.lr_scheduler.get_last_lr()[0]})
        out = {k: sum(v) / len(v) for k, v in metrics.items()}
        out.update(self.method.epoch_metrics())
        self.partial_metrics, self.position = {}, 0
        return out

    def _at_safe_point(self) -> bool:
        """Validation images and a step checkpoint when due (or a stop was asked for); True = stop now."""
        lg = self.cfg.log
        if lg.validation_steps and lg.validation_prompts and self.global_step - self.last_validation_step >= lg.validation_steps:
            self.validate()
        every = self.cfg.log.checkpointing_steps
        aligned = self.acc.step % self.cfg.train.gradient_accumulation_steps == 0  # no half-accumulated gradient
        due = every and self.global_step - self.last_checkpoint_step >= every
        if aligned and (due or self.stop_requested):
            self.save_checkpoint()
        return aligned and self.stop_requested

    @torch.no_grad()
    def validate(self) -> Path:
        """The validation prompts drawn by the current policy with fixed seeds (seed i for prompt i; DDIM 20,
        CFG 5, eta 0: the paper's evaluation sampler): a PNG grid in OUT/validation/ and the tracker's images."""
        from spo.generation import generate
        from spo.plots import captioned_grid

        self.last_validation_step = self.global_step
        prompts = list(self.cfg.log.validation_prompts)
        self.diffusion.unet = self.acc.unwrap_model(self.unet)
        self.unet.eval()
        images = generate(self.diffusion.pipe, prompts, seed=0, desc="validation")
        self.unet.train()
        path = self.out / "validation" / f"step-{self.global_step}.png"
        if self.acc.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            captioned_grid(images, prompts, path, cols=min(8, len(prompts)), title=f"step {self.global_step}")
            self._log_images(images, prompts)
        return path

    def _log_images(self, images, prompts: list[str]) -> None:
        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images("validation", images, self.global_step, dataformats="NHWC")
                tracker.writer.flush()
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": [wandb.Image(im, caption=p) for im, p in zip(images, prompts)]},
                            step=self.global_step)

    def log_scalars(self, scalars: dict) -> None:
        """Per-step scalars to the tracker, against the optimizer step."""
        if self.cfg.log.report_to != "none":
            self.acc.log({k: v for k, v in scalars.items() if isinstance(v, (int, float))}, step=self.global_step)

    def _lr_factor(self, step: int) -> float:
        """Learning-rate multiplier: linear warm-up over optimizer steps, then the schedule over the run."""
        t = self.cfg.train
        warm = min(1.0, (step + 1) / t.lr_warmup_steps) if t.lr_warmup_steps and t.lr_scheduler != "constant" else 1.0
        if t.lr_scheduler in ("constant", "constant_with_warmup"):
            return warm
        progress = min(1.0, (self.epoch + self.position / max(1, self.method_rounds())) / t.num_epochs)
        decay = 1 - progress if t.lr_scheduler == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return warm * decay

    def method_rounds(self) -> int:
        rounds = getattr(self.method, "rounds_per_epoch", None)
        return rounds(self.acc.num_processes) if rounds else 1

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
        self.optimizer.zero_grad()
        if acc.sync_gradients:
            self.global_step += 1
            self.lr_scheduler.step()
        return True

    # ---------------------------------------------------------------- the loop

    @_lock_released(always=True)
    def train(self, on_epoch_end=None) -> Path | None:
        """Run the remaining epochs; `on_epoch_end(trainer)` is called after each (e.g. to snapshot or evaluate).

        SIGINT/SIGTERM: the run stops at the next safe point with a checkpoint (`--resume latest` continues
        it exactly) and returns None.
        """
        from tqdm.auto import tqdm

        cfg = self.cfg
        bar = tqdm(total=cfg.train.num_epochs, initial=self.epoch, desc=cfg.method, disable=not self.acc.is_main_process)
        with _stop_on_signals(self):
            while self.epoch < cfg.train.num_epochs:
                t0 = time.time()
                m = self.train_epoch(self.epoch)
                if m is None:
                    bar.close()
                    self.log(f"[{cfg.method}] stopped at epoch {self.epoch}, position {self.position}; "
                             f"continue with --resume latest")
                    return None
                self.epoch += 1
                m.update(epoch=self.epoch, step=self.global_step, lr=self.lr_scheduler.get_last_lr()[0],
                         epoch_seconds=time.time() - t0, peak_memory_mb=peak_memory_mb(self.acc.device),
                         nonfinite_skipped=self.nonfinite_total, unet_forward_rows=self.unet_rows["forward"],
                         unet_train_rows=self.unet_rows["train"])
                self._record(m)
                bar.update(1)
                bar.set_postfix(loss=f"{m.get('loss', float('nan')):.4f}",
                                acc=f"{m.get('reward_accuracy', float('nan')):.2f}", pairs=m.get("pairs_trained", 0))
                if self.epoch % cfg.log.checkpointing_epochs == 0 or self.epoch == cfg.train.num_epochs:
                    self.save_checkpoint()
                if on_epoch_end is not None:
                    on_epoch_end(self)
        bar.close()
        if self.cfg.log.validation_prompts and self.last_validation_step != self.global_step:
            self.validate()  # the final policy, always
        return self.save_outputs()

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
        name = f"epoch-{self.epoch}" + (f"-round-{self.position}" if self.position else "")
        final = self.out / "checkpoints" / name
        state = self.trainable_state()
        assert_finite(state, f"checkpoint {final.name}")
        if self.acc.is_main_process:
            with atomic_directory(final) as tmp:
                save_file(state, str(tmp / "trainable.safetensors"))
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(self.lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
                if self.acc.scaler is not None:  # fp16: the loss scale is part of the state an exact resume needs
                    torch.save(self.acc.scaler.state_dict(), tmp / "scaler.pt")
                save_config(self.cfg, tmp / "config.yaml")
                # state.json, then the manifest (sizes and checksums of every file) last: a resume verifies them
                (tmp / "state.json").write_text(json.dumps(dict(
                    epoch=self.epoch, position=self.position, global_step=self.global_step, digest=self.cfg.digest(),
                    nonfinite_total=self.nonfinite_total, unet_rows=self.unet_rows,
                    partial_metrics=self.partial_metrics, method_progress=self._method_progress(), manifest=1)))
                write_manifest(tmp)
            rotate_checkpoints(self.out, "epoch", self.cfg.log.checkpoints_total_limit, keep=final)
        self.last_checkpoint_step = self.global_step
        self.acc.wait_for_everyone()
        return final

    def _method_progress(self) -> dict:
        state = getattr(self.method, "progress_state", None)
        return state() if state and self.position else {}

    def _load_checkpoint(self, where: str) -> None:
        from safetensors.torch import load_file

        ckpt = resume_checkpoint(self.out, "epoch", "state.json", where, self.log)
        state = json.loads((ckpt / "state.json").read_text())
        check_resume_config(ckpt / "config.yaml", self.cfg)  # names the fields that differ
        weights = load_file(str(ckpt / "trainable.safetensors"))
        params = dict(self.acc.unwrap_model(self.unet).named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(ckpt / "lr_scheduler.pt", weights_only=True))
        if self.acc.scaler is not None and (ckpt / "scaler.pt").is_file():
            self.acc.scaler.load_state_dict(torch.load(ckpt / "scaler.pt", weights_only=True))
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.position, self.partial_metrics = state.get("position", 0), state.get("partial_metrics", {})
        if self.position and hasattr(self.method, "restore_progress"):
            self.method.restore_progress(state.get("method_progress", {}))
        self.last_checkpoint_step = self.global_step
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.unet_rows = dict(state.get("unet_rows", self.unet_rows))
        self._truncate_metrics(self.epoch)
        self.log(f"[{self.cfg.method}] resumed from {ckpt} (epoch {self.epoch}, position {self.position}, "
                 f"step {self.global_step})")

    def _truncate_metrics(self, epochs_done: int) -> None:
        """metrics.jsonl keeps only the epochs the checkpoint has seen: the resumed run writes the rest again."""
        path = self.out / "metrics.jsonl"
        if not self.acc.is_main_process or not path.is_file():
            return
        rows = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if json.loads(line).get("epoch", 0) <= epochs_done]
        if len(kept) != len(rows):
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def save_outputs(self) -> Path:
        """LoRA in the diffusers format (`load_lora_weights` reads it), or a full pipeline directory."""
        self.acc.wait_for_everyone()
        unet = self.acc.unwrap_model(self.unet)
        assert_finite(self.trainable_state(), "the trained weights")
        ranks = self.out / "ranks"
        ranks.mkdir(parents=True, exist_ok=True)
        # One fingerprint per process: data-parallel processes must end with identical weights.
        (ranks / f"rank-{self.acc.process_index}.sha256").write_text(weights_fingerprint(self.trainable_state()))
        target = self.out / ("lora" if self.cfg.model.use_lora else "pipeline")
        if self.acc.is_main_process:
            with atomic_directory(target) as tmp:
                if self.cfg.model.use_lora:
                    save_lora(unet, tmp, self.cfg.model.lora_rank, self.cfg.model.lora_alpha, type(self.diffusion.pipe))
                    write_model_card(tmp, self.cfg, type(self.diffusion.pipe).__name__)
                else:
                    self.diffusion.unet = unet
                    save_pipeline(self.diffusion.pipe, tmp)
            from spo.plots import training_curves

            training_curves(self.out / "metrics.jsonl", self.out / "curves.png")
        self.acc.end_training()
        if self.cfg.log.push_to_hub and self.acc.is_main_process:  # last: a failed upload loses nothing
            from spo.hub import push_lora

            push_lora(self.out, self.cfg.log.hub_repo_id)
            self.log(f"[{self.cfg.method}] pushed {target} to https://huggingface.co/{self.cfg.log.hub_repo_id}")
        return target


SPOTrainer = Trainer  # the name earlier versions exported


@contextlib.contextmanager
def _stop_on_signals(trainer: Trainer):
    """SIGINT/SIGTERM ask the trainer to stop at its next safe point (a second SIGINT stops at once)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def ask(signum, frame):
        if trainer.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.stop_requested = True
        trainer.log(f"[{trainer.cfg.method}] stop requested: checkpoint at the next safe point (Ctrl-C again to abort)")

    previous = {sig: signal.signal(sig, ask) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def write_model_card(directory: Path, cfg: SPOConfig, pipeline_class: str) -> None:
    """What a LoRA folder needs to be handed on: the base model and recipe (spo_lora.json) and a model card
    (README.md, in the conventions of diffusers' training scripts)."""
    info = json.loads((directory / "spo_lora.json").read_text())
    info.update(base_model=cfg.model.pretrained, method=cfg.method, config_digest=cfg.digest())
    (directory / "spo_lora.json").write_text(json.dumps(info))
    save_config(cfg, directory / "training_config.yaml")
    base, s, t = cfg.model.pretrained, cfg.sample, cfg.train
    judge = cfg.model.latent_judge if cfg.model.judge == "latent" else cfg.model.spm
    (directory / "README.md").write_text(f"""---
base_model: {base}
library_name: diffusers
tags: [text-to-image, diffusers, lora, {cfg.method}, preference-optimization]
---

# {cfg.method.upper()} LoRA for {base}

Trained with `spo` ({cfg.method}; Step-aware Preference Optimization, arXiv 2406.04314) on the prompts
`{cfg.prompts}`: LoRA rank {cfg.model.lora_rank}, alpha {cfg.model.lora_alpha:g}, learning rate
{t.learning_rate:g}, {t.num_epochs} epochs, seed {t.seed}; step judge `{judge}`, K = {s.num_candidates},
threshold {s.threshold:g} ({s.keep_rule}), DDIM {s.num_steps} steps, eta {s.eta:g}, CFG {s.guidance_scale:g}.
The full recipe is `training_config.yaml` (config digest {cfg.digest()}).

```python
{usage_snippet(pipeline_class, base, "path/to/this/folder", cfg.model.vae, s.num_steps, s.guidance_scale,
              _base_call_defaults(cfg))}
```
""")


def _base_call_defaults(cfg: SPOConfig) -> dict:
    from spo.plugins import resolve

    return read_call_defaults(resolve(cfg.model.pretrained))


def usage_snippet(pipeline: str, base: str, lora: str | None, vae: str = "", steps: int = 20,
                  guidance: float = 5.0, call_kwargs: dict | None = None) -> str:
    """Python that loads a result in stock diffusers: the base pipeline (with `vae` if the run swapped it in),
    then the LoRA on the pipeline instance (load_lora_weights is not a class method); `call_kwargs` are the
    call arguments the base checkpoint declares (models.CALL_DEFAULTS_FILE)."""
    lines = [f"from diffusers import {pipeline}" + (", AutoencoderKL" if vae else ""), ""]
    if vae:
        lines.append(f'vae = AutoencoderKL.from_pretrained("{vae}")')
    lines.append(f'pipe = {pipeline}.from_pretrained("{base}"' + (", vae=vae)" if vae else ")"))
    if lora:
        lines.append(f'pipe.load_lora_weights("{lora}")')
    extra = "".join(f", {k}={v!r}" for k, v in (call_kwargs or {}).items())
    lines.append(f'image = pipe("a prompt", num_inference_steps={steps}, guidance_scale={guidance:g}{extra}).images[0]')
    return "\n".join(lines)


def run_summary(cfg: SPOConfig, target: Path) -> str:
    """The block `spo train` ends with: where the run's files went, and how to load the result in diffusers."""
    import textwrap

    from spo.plugins import resolve

    out, lg, lora = Path(cfg.log.output_dir), cfg.log, cfg.model.use_lora
    rows = [("LoRA" if lora else "pipeline", target), ("checkpoints", out / "checkpoints"),
            ("metrics", out / "metrics.jsonl"), ("curves", out / "curves.png")]
    if lg.validation_prompts:
        rows.append(("validation images", out / "validation"))
    if lg.report_to in ("tensorboard", "all"):
        rows.append(("TensorBoard logs", out / "logs" / run_name(lg)))
    if lg.report_to in ("wandb", "all"):
        rows.append(("wandb run", f"{lg.tracker_project}/{run_name(lg)}"))
    if lg.push_to_hub:
        rows.append(("hub", f"https://huggingface.co/{lg.hub_repo_id}"))
    # Absolute paths and the resolved base ("world:sd" -> its folder): the snippet works from any directory.
    absolute = str(Path(target).resolve())
    snippet = usage_snippet("DiffusionPipeline", resolve(cfg.model.pretrained) if lora else absolute,
                            absolute if lora else None, resolve(cfg.model.vae) if lora else "",
                            cfg.sample.num_steps, cfg.sample.guidance_scale, _base_call_defaults(cfg))
    width = max(len(name) for name, _ in rows) + 1
    return "\n".join([f"run {run_name(lg)} done:", *(f"  {name + ':':<{width}} {where}" for name, where in rows),
                      "load it in diffusers:", textwrap.indent(snippet, "    ")])


def optimizer_class(name: str):
    """torch's AdamW, or bitsandbytes' 8-bit AdamW (optimizer states in 8 bits: about a quarter of the memory)."""
    if name == "adamw":
        return torch.optim.AdamW
    try:
        import bitsandbytes
    except ImportError:
        raise SPOError("train.optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes "
                       "(or set train.optimizer=adamw)") from None
    return bitsandbytes.optim.AdamW8bit


def save_lora(unet, directory: Path, rank: int, alpha: float, pipeline_cls=None) -> None:
    """The trained network's LoRA in the format `pipeline_cls.load_lora_weights` reads (SD's pipeline by
    default); the adapter metadata carries lora_alpha (without it diffusers would reload alpha = rank)."""
    from diffusers import StableDiffusionPipeline

    pipeline_cls = pipeline_cls or StableDiffusionPipeline
    pipeline_cls.save_lora_weights(str(directory), safe_serialization=True, **lora_save_kwargs(pipeline_cls, unet))
    family = FAMILIES.get(pipeline_cls.__name__, "sd")  # so that a LoRA is never applied to the other family
    (directory / "spo_lora.json").write_text(json.dumps({"rank": rank, "alpha": alpha, "family": family}))


