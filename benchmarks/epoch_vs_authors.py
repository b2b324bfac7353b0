"""One whole SPO epoch on the embedded world (CPU): our trainer against the SPO authors' epoch structure (issue #14).

Three variants run the same epoch of `configs/world.yaml` (same prompts, K, threshold, DDIM steps, CFG, eta,
LoRA rank and alpha, sampling and training batch sizes, inner epochs, optimizer, the same world model `world:sd`
loaded by our loader, and the same judge `world:spm`):

  ours         `spo.trainer.Trainer.train_epoch`, unchanged: the resampler (one guided call on the K candidates
               at the next step, decoded x0-predictions, the SPM; the call reused to continue), then per
               minibatch one reference call (the LoRA UNet with adapters off) and one policy call.
  authors      a re-implementation, written here from reading RockeyCoss/SPO, of the authors' epoch:
               * sampling (spo_training_and_inference/spo/custom_diffusers/multi_sample_pipeline.py,
                 `multi_sample_pipeline`): prompts encoded once per sampling batch and the empty prompt once per
                 run (train_scripts/train_spo.py); a DDIM loop whose every step is one UNet call on the
                 CFG-doubled batch; from `divert_start_step` on, K candidates x_{t-1} drawn from one x_t and kept
                 as a (K, b) block; at the next step the UNet runs on all K·b candidates, their x0-predictions
                 are decoded by the VAE (no clamp) and scored by the preference model with the candidates'
                 timestep (clamped to [-1, 1] for the world SPM: see below), the best and worst form a pair
                 when the 2-way softmax gap exceeds the threshold (spo/preference_models/compare_funcs.py,
                 `preference_score_compare`), and the trajectory continues from a random candidate by
                 gathering that candidate's x0 / eps from the same UNet call (not recomputed); after the last
                 step the K·b final latents are decoded and scored at t=0; the preference model gets token ids
                 tokenised once per batch and repeated K times (spo/preference_models/preference_model_fns.py:
                 image, input_ids, timesteps);
               * a pair stores x_t, t, the (win, lose) x_{t-1} and the prompt's text embedding, so training
                 never re-encodes text; the pairs are permuted once, then cut into minibatches;
               * training (train_scripts/train_spo.py): a reference UNet made by `copy.deepcopy` of the base
                 UNet before the LoRA is added; per minibatch FOUR guided UNet calls, policy(win), ref(win),
                 policy(lose), ref(lose), each on the CFG-doubled batch (the reference calls without
                 `torch.no_grad`, as there: nothing in them requires grad); four full Gaussian log-probs
                 (spo/custom_diffusers/ddim_with_logprob.py: previous timestep t − 1000/steps clamped at 0,
                 mean over all but the batch dimension); ratio = clamp(exp(log p − log p_ref), 1 − eps, 1 + eps);
                 loss = −log σ(β log r_w − β log r_l); backward, gradient-norm clip, AdamW step, zero_grad.
  ours_latent  our trainer with `model.judge=latent` (`world:latent_judge` scores the K noisy candidates: no decode,
               no CLIP, and the next guided call only for the continued candidate).

Made equal on purpose (not the authors' code): `train.inner_epochs` passes over each round's pairs (their loop
makes one pass), the gradient-norm clip (their `clip_grad_norm_` gets the parameter `filter` the optimizer
constructor has already consumed), and every random draw: the authors variant draws its noise, continuation
choices and permutations from our named streams in our resampler's order, so on the same policy it samples the
same pairs as ours (checked below) and trains on the same minibatches. The DDIM arithmetic is our
`spo.sampling.ddim_transition` (the same formula as their `ddim_step_fetch_x0` + `ddim_step_fetch_x_t_1`). Their
PickScore wrapper clamps pixels after its own resize; the world SPM preprocesses inside its forward and takes
images in [-1, 1], so the authors' variant clamps the decoded images before calling it (elementwise, and without
it the two samplers would score differently).

Before anything is timed the script checks, in float32, in this process: (1) our resampler and the authors'
sampler give the same pairs from the same random streams; (2) on pairs of that round, with the LoRA moved off its
zero init, our loss, the authors' loss and the 4-call loss of `benchmarks/throughput.py` agree, with their LoRA
gradients. Then each (variant, repeat) runs in a fresh process (1 torch thread): `--warmup-epochs` untimed epochs,
then one timed epoch; peak memory is the RSS high-water mark minus the RSS after the base model and the judge were
loaded (the reference copy, LoRA, optimizer state and activations count). Variants are interleaved over the repeats
in rotating order.

    OMP_NUM_THREADS=1 python benchmarks/epoch_vs_authors.py              # benchmarks/results/epoch_vs_authors.{json,md}
    OMP_NUM_THREADS=1 python benchmarks/epoch_vs_authors.py --quick --out /tmp/eva   # smoke test (~1 min)
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
VARIANT_OVERRIDES = {  # what each of our variants changes in the recipe (the authors' variant: nothing)
    "ours": [], "authors": [], "ours_latent": ["model.judge=latent"],
    "ours_x0_latent": ["model.judge=latent", "model.latent_judge=world:latent_judge_distilled"],
    "ours_x0_onpolicy": ["model.judge=latent", "model.latent_judge=world:latent_judge_onpolicy"],
    "ours_tiny_decoder": ["model.scoring_decoder=world:tiny_decoder"]}
VARIANTS = tuple(VARIANT_OVERRIDES)
LABELS = {"ours": "ours (pixel SPM)", "authors": "authors' structure (pixel SPM)",
          "ours_latent": "ours, model.judge=latent (noisy latents, world:latent_judge)",
          "ours_x0_latent": "ours, model.judge=latent (x0 latents, world:latent_judge_distilled)",
          "ours_x0_onpolicy": "ours, model.judge=latent (x0 latents, world:latent_judge_onpolicy)",
          "ours_tiny_decoder": "ours, pixel SPM, model.scoring_decoder=world:tiny_decoder"}
LATENT_VARIANTS = ("ours_latent", "ours_x0_latent", "ours_x0_onpolicy")
QUICK = ["sample.batch_size=2", "sample.num_steps=6", "sample.divert_start_step=2", "sample.threshold=0",
         "train.batch_size=4"]
TARGET = 0.5  # issue #14: our whole epoch with the latent judge <= 0.5x the authors' structure


def _throughput():
    """benchmarks/throughput.py as a module (its 4-call loss, LoRA helper, equivalence helpers, RSS probes)."""
    spec = importlib.util.spec_from_file_location("bench_throughput", REPO / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def load_cfg(args, variant: str, workdir: str):
    from spo.config import SPOConfig, load_config

    overrides = (QUICK if args.quick else []) + list(args.override) + [
        f"train.num_epochs={args.warmup_epochs + 1}", f"log.output_dir={workdir}", "log.report_to=none",
        "log.checkpointing_steps=0", "log.validation_steps=0"]
    overrides += VARIANT_OVERRIDES[variant]
    cfg = load_config(SPOConfig, args.config, overrides)
    s = cfg.sample
    if variant == "authors" and (s.inner_steps or s.keep_rule != "best_worst" or s.continuation != "random"
                                 or cfg.train.gradient_accumulation_steps != 1 or cfg.train.mixed_precision != "no"
                                 or not cfg.model.use_lora):
        raise SystemExit("the authors' structure has inner_steps 0, keep_rule best_worst, continuation random, "
                         "no gradient accumulation, LoRA, and this benchmark runs it in fp32: reset those overrides")
    return cfg


# ------------------------------------------------------------------ counting the work


class WorkCounter:
    """Rows through the UNet(s) (with / without an autograd graph), the VAE decoder and the judge, via hooks."""

    def __init__(self, unets, decoder, judge):
        self.handles = [u.register_forward_hook(self._unet, with_kwargs=True) for u in unets]
        self.handles.append(decoder.register_forward_pre_hook(lambda m, a: self._add("decoded_images", a[0])))
        self.handles.append(judge.register_forward_pre_hook(lambda m, a: self._add("judge_rows", a[0])))
        self.reset()

    def reset(self):
        self.counts = dict(unet_rows_graph=0, unet_rows_no_graph=0, unet_calls=0, decoded_images=0, judge_rows=0)

    def _add(self, key, x):
        self.counts[key] += len(x)

    def _unet(self, module, args, kwargs, output):
        x = args[0] if args else kwargs["sample"]
        sample = output[0] if isinstance(output, tuple) else output.sample
        self.counts["unet_calls"] += 1
        self._add("unet_rows_graph" if sample.requires_grad else "unet_rows_no_graph", x)


def lora_fingerprint(unet) -> float:
    """Sum of |lora_A| over the adapters: equal in two processes iff their LoRA inits drew the same numbers."""
    return float(sum(p.detach().abs().sum() for n, p in unet.named_parameters() if "lora_A" in n))


# ------------------------------------------------------------------ the authors' structure


def authors_text(diffusion, prompts):
    """Their prompt encoding: the pipeline's tokenizer padded to its max length, then text_encoder(ids)[0]."""
    import torch

    tok = diffusion.pipe.tokenizer
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(diffusion.device)
    with torch.no_grad():
        return diffusion.pipe.text_encoder(ids)[0]


def _guided(unet, x, t, embeds_both, guidance):
    """One UNet call on the CFG-doubled batch (embeds_both = [uncond; cond]), then the guidance combination."""
    import torch

    out = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=embeds_both).sample
    uncond, cond = out.chunk(2)
    return uncond + guidance * (cond - uncond)


def _keep(scores, threshold):
    """Their compare function: sort the K scores of each prompt, softmax over the best and the worst."""
    import torch

    ranked, order = torch.sort(scores, dim=0, descending=True)
    ends = ranked[[0, -1]].softmax(dim=0)
    return order[0], order[-1], ends[0] - ends[1], ends[0] - ends[1] > threshold


def authors_sample(diffusion, spm, cond, neg, judge_ids, s, gen, on_scored=None) -> dict:
    """One sampling batch in the structure of their `multi_sample_pipeline`; see the module docstring.

    Noise is drawn from `gen` as (b, K, ...) and viewed as their (K, b, ...) block, so that the draws are the
    ones our resampler makes. Returns the pairs as stacked tensors (t, x_t, next = (win, lose), embeds, ...).
    """
    import torch

    from spo.sampling import ddim_transition, predict_x0

    unet, vae, sched = diffusion.unet, diffusion.vae, diffusion.scheduler
    b, k, D = len(cond), s.num_candidates, s.divert_start_step
    sched.set_timesteps(s.num_steps)
    timesteps, gap = sched.timesteps.long(), sched.config.num_train_timesteps // s.num_steps
    c = unet.config
    x = torch.randn((b, c.in_channels, c.sample_size, c.sample_size), generator=gen) * sched.init_noise_sigma
    x = x.to(diffusion.device)
    embeds = torch.cat([neg.expand(b, -1, -1), cond])
    ids_k = judge_ids.repeat(k, 1)  # candidate-major, like their extra_info
    cols = torch.arange(b)
    x_t = x if D == 0 else None  # "current_latents": the state the current candidates were drawn from
    cands = last_t = None
    found = []

    def preference(images, ids, t):
        # Their scorer clamps the pixels to [0, 1] inside its preprocessing (after its resize); the world SPM
        # takes images in [-1, 1] and preprocesses them itself, so the clamp comes first here.
        return spm(images.clamp(-1, 1), ids, t).float()

    def step_mean_std(out, t, latents):
        tb = torch.full((len(latents),), int(t))
        mean, std, _ = ddim_transition(sched, out, tb, (tb - gap).clamp(min=0), latents, s.eta)
        return mean, std

    def record(scores, step):
        best, worst, gaps, valid = _keep(scores, s.threshold)
        if on_scored is not None:
            on_scored(step, scores)
        found.append(dict(t=torch.full((int(valid.sum()),), int(last_t)), x_t=x_t[valid],
                          next=torch.stack([cands[best, cols], cands[worst, cols]], 1)[valid], embeds=cond[valid],
                          prompt=cols[valid], step=torch.full((int(valid.sum()),), step), gap=gaps[valid]))

    for i, t in enumerate(timesteps):
        out = _guided(unet, x, t.expand(len(x)), embeds, s.guidance_scale)
        if i < D:
            mean, std = step_mean_std(out, t, x)
            x = mean + std * torch.randn(x.shape, generator=gen).to(x.device)
            if i == D - 1:
                x_t = x
            continue
        if i == D:  # first branching: from here on the UNet sees the K·b candidates
            embeds = torch.cat([neg.expand(k * b, -1, -1), cond.repeat(k, 1, 1)])
        else:  # score the candidates drawn at the previous step through this call's x0-prediction
            x0 = predict_x0(sched, x, out, t.expand(len(x)))
            images = vae.decode(x0.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
            scores = preference(images, ids_k, t.expand(len(x))).view(k, b)
            record(scores, i - 1)
            choice = torch.randint(k, (b,), generator=gen)
            out = out.view(k, b, *out.shape[1:])[choice, cols]  # reuse the chosen candidate's call
            x_t = cands[choice, cols]
        mean, std = step_mean_std(out, t, x_t)
        noise = torch.randn((b, k, *x_t.shape[1:]), generator=gen).to(x_t.device).transpose(0, 1)
        cands = mean[None] + std[None] * noise
        x, last_t = cands.flatten(0, 1), t
        if i == len(timesteps) - 1:  # the final latents, decoded and scored at t = 0
            images = vae.decode(x.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
            scores = preference(images, ids_k, torch.zeros(len(x), dtype=torch.long)).view(k, b)
            record(scores, i)
    return {key: torch.cat([f[key] for f in found]) for key in found[0]}


def authors_minibatch_loss(unet, ref, sched, x_t, t, win, lose, embeds, neg, s, tr):
    """Their training step's loss: four guided UNet calls, four full Gaussian log-probs, exp-clamp-log ratios."""
    import torch

    from spo.sampling import ddim_transition, gaussian_log_prob

    both = torch.cat([neg.expand(len(x_t), -1, -1), embeds])
    t_prev = (t - sched.config.num_train_timesteps // s.num_steps).clamp(min=0)

    def log_prob(model, x_next):
        mean, std, _ = ddim_transition(sched, _guided(model, x_t, t, both, s.guidance_scale), t, t_prev, x_t, s.eta)
        return gaussian_log_prob(x_next, mean, std)

    lp_win = log_prob(unet, win)
    lp_win_ref = log_prob(ref, win)
    lp_lose = log_prob(unet, lose)
    lp_lose_ref = log_prob(ref, lose)
    ratio_win = torch.clamp(torch.exp(lp_win - lp_win_ref), 1 - tr.eps, 1 + tr.eps)
    ratio_lose = torch.clamp(torch.exp(lp_lose - lp_lose_ref), 1 - tr.eps, 1 + tr.eps)
    loss = -torch.log(torch.sigmoid(tr.beta * torch.log(ratio_win) - tr.beta * torch.log(ratio_lose))).mean()
    return loss


class AuthorsRun:
    """Their setup (our loaders for world:sd and world:spm; deep-copied reference; LoRA as theirs) and epoch."""

    def __init__(self, cfg, on_loaded=None):
        import torch
        from accelerate.utils import set_seed
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        from spo.methods.spo import SPO
        from spo.models import load_diffusion
        from spo.plugins import resolve
        from spo.preference.judges import load_step_judge

        self.cfg = cfg
        set_seed(cfg.train.seed)  # the same global draws as Trainer.setup, so the LoRA init matches ours
        self.diffusion = load_diffusion(resolve(cfg.model.pretrained), vae=resolve(cfg.model.vae) or None,
                                        sample=cfg.sample)
        self.spm = load_step_judge(cfg.model.spm, "cpu")
        self.diffusion.freeze("cpu", torch.float32)
        if on_loaded is not None:
            on_loaded()
        self.unet = self.diffusion.unet.requires_grad_(False)
        self.ref = copy.deepcopy(self.unet).requires_grad_(False)
        m = cfg.model
        self.unet.add_adapter(LoraConfig(r=m.lora_rank, lora_alpha=m.lora_alpha, init_lora_weights="gaussian",
                                         target_modules=list(m.lora_targets)))
        cast_training_params(self.unet, dtype=torch.float32)
        self.trainable = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.train.learning_rate,
                                           weight_decay=cfg.train.adam_weight_decay)
        self.neg = authors_text(self.diffusion, [""])  # the empty prompt, encoded once per run
        self.method = SPO(cfg)  # only for the prompt schedule: the same prompts as ours, round by round
        self.method.load_data(SimpleNamespace())

    def sample(self, prompts, gen):
        import torch

        self.unet.eval()
        with torch.no_grad():  # their pipeline function is decorated with torch.no_grad
            cond = authors_text(self.diffusion, prompts)
            pairs = authors_sample(self.diffusion, self.spm, cond, self.neg, self.spm.tokenize(prompts),
                                   self.cfg.sample, gen)
        self.unet.train()
        return pairs

    def train(self, pairs, epoch: int, rnd: int) -> list[float]:
        import torch

        from spo.runtime import stream

        tr, seed = self.cfg.train, self.cfg.train.seed
        n, losses = len(pairs["t"]), []
        perm = torch.randperm(n, generator=stream(seed, epoch, 0, "share", rnd))  # their valid_perm
        pairs = {key: v[perm] for key, v in pairs.items()}
        for inner in range(tr.inner_epochs if n else 0):
            order = torch.randperm(n, generator=stream(seed, epoch, 0, "shuffle", rnd * tr.inner_epochs + inner))
            for start in range(0, n, tr.batch_size):
                i = order[start:start + tr.batch_size]
                loss = authors_minibatch_loss(self.unet, self.ref, self.diffusion.scheduler, pairs["x_t"][i],
                                              pairs["t"][i], pairs["next"][i, 0], pairs["next"][i, 1],
                                              pairs["embeds"][i], self.neg, self.cfg.sample, tr)
                loss.backward()
                if tr.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.trainable, tr.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
                losses.append(loss.item())
        return losses

    def epoch(self, epoch: int) -> dict:
        from spo.runtime import stream

        stats = dict(sample_seconds=0.0, train_seconds=0.0, pairs_sampled=0, pairs_trained=0, optimizer_steps=0)
        losses = []
        for rnd in range(self.method.rounds_per_epoch(1)):
            t0 = time.perf_counter()
            pairs = self.sample(self.method.round_prompts(epoch, rnd, 0, 1),
                                stream(self.cfg.train.seed, epoch, 0, "sample", rnd))
            t1 = time.perf_counter()
            round_losses = self.train(pairs, epoch, rnd)
            stats["train_seconds"] += time.perf_counter() - t1
            stats["sample_seconds"] += t1 - t0
            stats["pairs_sampled"] += len(pairs["t"])
            stats["pairs_trained"] += len(pairs["t"])
            stats["optimizer_steps"] += len(round_losses)
            losses += round_losses
        stats["loss"] = sum(losses) / len(losses) if losses else float("nan")
        return stats


# ------------------------------------------------------------------ the equivalence check (driver process)


def verify(args, tp) -> dict:
    """Same pairs from our resampler and the authors' sampler; same loss and LoRA gradients on them."""
    import torch

    from spo.resampler import resample
    from spo.runtime import stream

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_cfg(args, "authors", tmp)
    run = AuthorsRun(cfg)
    s, seed, d = cfg.sample, cfg.train.seed, run.diffusion
    prompts = run.method.round_prompts(args.warmup_epochs, 0, 0, 1)[:args.verify_prompts]
    scores = {"ours": {}, "authors": {}}

    def our_judge(images, captions, t):  # the SPM, recording the scores of each candidate set (b-major rows)
        out = run.spm(images, captions, t)
        scores["ours"][len(scores["ours"])] = out.view(len(prompts), s.num_candidates)
        return out

    t0 = time.perf_counter()
    with torch.no_grad():
        ours = resample(d, our_judge, prompts, s.num_steps, s.guidance_scale, s.eta, s.num_candidates, s.threshold,
                        s.divert_start_step, stream(seed, 0, 0, "sample", 0))
        run.unet.eval()
        theirs = authors_sample(d, run.spm, authors_text(d, prompts), run.neg, run.spm.tokenize(prompts), s,
                                stream(seed, 0, 0, "sample", 0),
                                on_scored=lambda step, sc: scores["authors"].setdefault(step, sc.T))
    sampling = compare_pairs(ours.pairs, theirs, scores, s.divert_start_step)
    sampling["seconds"] = time.perf_counter() - t0

    # the loss check: a few of these pairs (first and last diverted step included), LoRA off its init
    tp.HP_SAMPLE, tp.HP_TRAIN, tp.HP_MODEL = cfg.sample, cfg.train, cfg.model  # throughput reads these globals
    pairs = ours.pairs.select(torch.linspace(0, len(ours.pairs) - 1, min(4, len(ours.pairs))).round().long())
    cond_all, uncond_all = d.encode_prompts(prompts)
    cond, uncond = cond_all.embeds[pairs.prompt_index], uncond_all.embeds[pairs.prompt_index]
    unet, sched = run.unet, d.scheduler
    unet.train()
    ratios = tp.move_lora_off_init(unet, sched, pairs, cond, uncond, seed)
    losses = {
        "ours": lambda: tp.ours_loss(unet, sched, pairs, cond, uncond),
        "authors": lambda: authors_minibatch_loss(unet, run.ref, sched, pairs.x_t, pairs.timesteps, pairs.win,
                                                  pairs.lose, cond, run.neg, s, cfg.train),
        "throughput_4call": lambda: tp.straightforward_loss(unet, run.ref, sched, pairs, cond, uncond),
    }
    result = {}
    for name, fn in losses.items():
        run.optimizer.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()
        result[name] = (loss.item(), torch.cat([p.grad.flatten().double() for p in run.trainable]))
    base_loss, base_grad = result["ours"]
    lo, hi = math.log(1 - cfg.train.eps), math.log(1 + cfg.train.eps)
    loss_check = dict(pairs=len(pairs), steps=sorted(set(pairs.step_index.tolist())), loss_ours=base_loss,
                      log_ratio_abs_max=ratios.abs().max().item(),
                      clipped_fraction=((ratios < lo) | (ratios > hi)).float().mean().item(),
                      grad_nonzero=int((base_grad != 0).sum()), grad_numel=base_grad.numel())
    for name in ("authors", "throughput_4call"):
        loss, grad = result[name]
        loss_check[f"loss_{name}"] = loss
        loss_check[f"loss_rel_diff_{name}"] = abs(loss - base_loss) / max(abs(base_loss), 1e-30)
        loss_check[f"grad_rel_diff_{name}"] = ((grad - base_grad).norm() / base_grad.norm().clamp(min=1e-30)).item()
    ok = (sampling["pairs_ours"] == sampling["pairs_authors"] == sampling["matched"] > 0
          and sampling["latent_max_abs_diff"] < 1e-3 and loss_check["loss_rel_diff_authors"] < 1e-4
          and loss_check["grad_rel_diff_authors"] < 1e-3 and loss_check["grad_nonzero"] > 0)
    return dict(ok=ok, prompts=len(prompts), sampling=sampling, loss=loss_check)


def compare_pairs(ours, theirs: dict, scores: dict, divert: int) -> dict:
    """Pairs of both samplers matched by (diverted step, prompt); latent and score differences."""
    key_o = {(int(st), int(p)): j for j, (st, p) in enumerate(zip(ours.step_index, ours.prompt_index))}
    key_a = {(int(st), int(p)): j for j, (st, p) in enumerate(zip(theirs["step"], theirs["prompt"]))}
    both = sorted(set(key_o) & set(key_a))
    diff = 0.0
    for key in both:
        o, a = key_o[key], key_a[key]
        for ours_x, their_x in ((ours.x_t[o], theirs["x_t"][a]), (ours.win[o], theirs["next"][a, 0]),
                                (ours.lose[o], theirs["next"][a, 1])):
            diff = max(diff, (ours_x - their_x).abs().max().item())
    score_diff = max((scores["ours"][j] - scores["authors"][divert + j]).abs().max().item()
                     for j in range(len(scores["ours"])))
    scale = max(sc.abs().max().item() for sc in scores["ours"].values())
    return dict(pairs_ours=len(ours), pairs_authors=len(theirs["t"]), matched=len(both),
                candidate_sets=len(scores["ours"]) * len(scores["ours"][0]),
                latent_max_abs_diff=diff, score_max_abs_diff=score_diff, score_max_abs=scale,
                timesteps_equal=all(int(ours.timesteps[key_o[k]]) == int(theirs["t"][key_a[k]]) for k in both))


# ------------------------------------------------------------------ timed workers (one fresh process each)


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    tp = _throughput()
    mem = {}

    def mark_loaded():
        mem["baseline_bytes"], mem["peak_reset_after_load"] = tp.rss_kb() * 1024, tp.reset_peak_rss()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_cfg(args, args.worker, tmp)
        t0 = time.perf_counter()
        if args.worker == "authors":
            run = AuthorsRun(cfg, on_loaded=mark_loaded)
            unets, diffusion, judge, reference = [run.unet, run.ref], run.diffusion, run.spm, run.ref
            epoch_fn = run.epoch
        else:
            trainer = _setup_trainer(cfg, mark_loaded)
            base = trainer.acc.unwrap_model(trainer.unet)
            unets, diffusion, judge, reference = [base], trainer.diffusion, trainer.method.spm, None
            epoch_fn = lambda e: _ours_epoch(trainer, e)  # noqa: E731
        setup_s = time.perf_counter() - t0
        fingerprint = lora_fingerprint(unets[0])
        counter = WorkCounter(unets, diffusion.vae.decoder, judge)
        t0 = time.perf_counter()
        for e in range(args.warmup_epochs):
            epoch_fn(e)
        warmup_s = time.perf_counter() - t0
        counter.reset()
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        stats = epoch_fn(args.warmup_epochs)
        wall = time.perf_counter() - t0
        load_after = os.getloadavg()
        if args.worker != "authors":
            trainer.lock.release()
    peak = tp.peak_rss_kb() * 1024
    return dict(variant=args.worker, epoch_seconds=wall, sampling_seconds=stats["sample_seconds"],
                training_seconds=stats["train_seconds"],
                other_seconds=wall - stats["sample_seconds"] - stats["train_seconds"],
                pairs_sampled=stats["pairs_sampled"], pairs_trained=stats["pairs_trained"],
                optimizer_steps=stats["optimizer_steps"], loss=stats["loss"], **counter.counts,
                peak_bytes=peak, peak_over_baseline_bytes=peak - mem["baseline_bytes"], **mem,
                reference_bytes=tp.tensor_bytes(reference) if reference is not None else 0,
                lora_fingerprint=fingerprint, setup_seconds=setup_s, warmup_seconds=warmup_s,
                load_average_before=list(load_before), load_average_after=list(load_after),
                threads=torch.get_num_threads())


def _setup_trainer(cfg, on_loaded):
    """Our Trainer, set up as `spo train` does; `on_loaded` runs after the model and the judge are loaded."""
    from spo.trainer import Trainer

    trainer = Trainer(cfg, overwrite=True, log=lambda m: None)
    original = trainer._trainable_network  # called by setup() right after the model and the judge are loaded

    def after_loading(unet):
        on_loaded()
        return original(unet)

    trainer._trainable_network = after_loading
    return trainer.setup()


def _ours_epoch(trainer, epoch: int) -> dict:
    steps = trainer.global_step
    m = trainer.train_epoch(epoch)
    return dict(sample_seconds=m["sample_seconds"], train_seconds=m["train_seconds"],
                pairs_sampled=m["pairs_sampled"], pairs_trained=m["pairs_trained"],
                optimizer_steps=trainer.global_step - steps, loss=m.get("loss", float("nan")))


# ------------------------------------------------------------------ driver and report


def spawn(args, variant: str, out_json: Path, log) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--json", str(out_json),
           "--config", str(args.config), "--threads", str(args.threads), "--warmup-epochs", str(args.warmup_epochs)]
    cmd += (["--quick"] if args.quick else []) + (["--override", *args.override] if args.override else [])
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"worker {variant} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(out_json.read_text())
    result["process_seconds"] = time.time() - t0
    log(f"  {variant:12s} epoch {result['epoch_seconds']:7.2f} s (sampling {result['sampling_seconds']:.2f}, "
        f"training {result['training_seconds']:.2f}), {result['pairs_sampled']} pairs, process "
        f"{result['process_seconds']:.0f} s")
    return result


def _repo_relative(path) -> str:
    """A path inside the repository as the repository names it (reports must not name this machine's folders)."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def span(values) -> dict:
    return dict(median=statistics.median(values), min=min(values), max=max(values), values=values)


def ratios(runs: dict) -> dict:
    """Per repeat r: variant / authors for the epoch and each phase; median and range over the repeats."""
    out = {}
    for v in (v for v in runs if v != "authors"):
        out[f"{v}/authors"] = {key: span([a[key] / b[key] for a, b in zip(runs[v], runs["authors"])])
                               for key in ("epoch_seconds", "sampling_seconds", "training_seconds")}
    return out


def driver(args) -> dict:
    import torch

    log = lambda msg: print(msg, flush=True)  # noqa: E731
    t_start = time.time()
    torch.set_num_threads(args.threads)
    tp = _throughput()
    machine = tp.machine_info("cpu", args.threads)
    machine["load_average_before"] = list(os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_cfg(args, "ours", tmp)
    log(f"[epoch_vs_authors] {machine['cpu']}, {machine['cores']} cores, {args.threads} thread(s); checking "
        "that the authors' structure computes what ours does ...")
    check = verify(args, tp)
    log(f"  sampling: {check['sampling']['pairs_ours']} vs {check['sampling']['pairs_authors']} pairs, "
        f"{check['sampling']['matched']} matched, max latent diff {check['sampling']['latent_max_abs_diff']:.1e}; "
        f"loss rel diff {check['loss']['loss_rel_diff_authors']:.1e}, grad rel diff "
        f"{check['loss']['grad_rel_diff_authors']:.1e} -> {'equal' if check['ok'] else 'NOT EQUAL'}")
    if not check["ok"]:
        raise SystemExit(f"the authors' structure does not compute what ours does: {check}")
    variants = args.variants
    runs = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="spo-epoch-vs-authors-") as tmp:
        for r in range(args.repeats):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            log(f"repeat {r + 1}/{args.repeats}: {', '.join(order)}")
            for v in order:
                runs[v].append(spawn(args, v, Path(tmp) / f"{v}-{r}.json", log))
    machine["load_average_after"] = list(os.getloadavg())
    s, t, m = cfg.sample, cfg.train, cfg.model
    results = dict(
        command="OMP_NUM_THREADS=1 python benchmarks/epoch_vs_authors.py " + " ".join(map(shlex.quote, args.argv)),
        machine=machine, quick=args.quick, repeats=args.repeats, warmup_epochs=args.warmup_epochs,
        config=dict(file=_repo_relative(args.config), overrides=(QUICK if args.quick else []) + list(args.override),
                    prompts=cfg.prompts, model=m.pretrained, spm=m.spm, latent_judge=m.latent_judge,
                    prompts_per_round=s.batch_size, rounds_per_epoch=s.batches_per_epoch,
                    num_candidates=s.num_candidates, threshold=s.threshold, num_steps=s.num_steps,
                    divert_start_step=s.divert_start_step, guidance_scale=s.guidance_scale, eta=s.eta,
                    lora_rank=m.lora_rank, lora_alpha=m.lora_alpha, train_batch_size=t.batch_size,
                    inner_epochs=t.inner_epochs, learning_rate=t.learning_rate, beta=t.beta, eps=t.eps,
                    max_grad_norm=t.max_grad_norm, seed=t.seed),
        verify=check, runs=runs, ratios=ratios(runs), wall_seconds=None)
    results["wall_seconds"] = time.time() - t_start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from spo.files import atomic_write_text

    atomic_write_text(out / f"{args.name}.json", json.dumps(results, indent=1))
    atomic_write_text(out / f"{args.name}.md", markdown(results))
    log(f"[epoch_vs_authors] wrote {out / args.name}.md/.json in {results['wall_seconds']:.0f} s")
    return results


def _fmt(sp: dict, f: str = ".2f", scale: float = 1.0) -> str:
    return f"{sp['median'] * scale:{f}} ({sp['min'] * scale:{f}}–{sp['max'] * scale:{f}})"


COPIED = """## What the re-implementation copies from the authors' structure

Read from RockeyCoss/SPO and re-implemented here (`AuthorsRun`, `authors_sample`, `authors_minibatch_loss`):

- **Epoch** (`spo_training_and_inference/train_scripts/train_spo.py`): for each sampling batch of prompts, sample
  with the step-wise pipeline, permute the batch's pairs once, then train on them in minibatches before the next
  batch is sampled; `unet.eval()` while sampling, `unet.train()` while training; prompts encoded once per batch
  (`text_encoder(input_ids)[0]`), the empty prompt once per run.
- **Reference**: `copy.deepcopy` of the base UNet, taken before the LoRA (rank r, alpha r, gaussian init, to_q/to_k/
  to_v/to_out.0) is added; frozen; evaluated without `torch.no_grad` as in their loop (no input requires grad).
- **Sampling and scoring** (`spo_training_and_inference/spo/custom_diffusers/multi_sample_pipeline.py`,
  `ddim_seperate.py`): each DDIM step one UNet call on the CFG-doubled batch; from `divert_start_step` on K
  candidates per prompt kept as a (K, b) block; the next step's UNet call runs on all K·b candidates and serves
  twice: its x0-predictions are decoded (VAE, no clamp) and scored at that timestep, and the randomly continued
  candidate's x0 / eps are gathered from it (no recomputation); after the last step the K·b final latents are
  decoded and scored at t = 0. The preference model gets token ids tokenised once per batch and repeated K times
  (`spo/preference_models/preference_model_fns.py`), and the pair rule is their sort + 2-way softmax gap
  (`spo/preference_models/compare_funcs.py`).
- **Pairs** carry the prompt's text embedding, so training never re-encodes text.
- **Training step** (`train_spo.py`, `spo/custom_diffusers/ddim_with_logprob.py`): four guided UNet calls per
  minibatch (policy and reference, each on win and on lose, each CFG-doubled), four full Gaussian log-probs
  (previous timestep t − 1000/steps clamped at 0, mean over non-batch dimensions), ratio = clamp(exp(Δ log p),
  1 − ε, 1 + ε), loss = −log σ(β log r_w − β log r_l), backward, AdamW step, zero_grad.
"""

NOT_EQUAL = """## What is not the authors' code, and why

- Model loading, the judge and the DDIM arithmetic are ours (`load_diffusion`, `load_step_judge("world:spm")`,
  `spo.sampling.ddim_transition` / `predict_x0`), so that all variants run the same model and the same judge. The
  world SPM preprocesses inside its own forward (the authors' PickScore wrapper resizes bicubically to 224 px and
  clamps the pixels to [0, 1] after the resize); it takes images in [-1, 1], so the authors' variant clamps the
  decoded images before calling it (an elementwise op), and both samplers then score identically.
- Made equal to our recipe, to compare equal work: `train.inner_epochs` passes over each round's pairs (their loop
  makes one), a gradient-norm clip in every variant (in their script `clip_grad_norm_` receives the parameter
  `filter` that the optimizer constructor has already consumed, so it most likely clips nothing; the LoRA is tiny
  and the clip costs almost nothing), and the random numbers: noise, continuation choices and permutations come
  from our named streams in our resampler's order (their code draws them from the global generator), so the
  authors' variant samples the same pairs as ours on the same policy and trains on the same minibatches.
- Not reproduced (no effect on one CPU process): accelerate's `prepare`/`accumulate`, the cross-process gather of
  pairs, wandb logging, checkpoint hooks, the validation images after an epoch.
- `ours_latent` uses a different judge, so it keeps different pairs: its pair count, and so its training work,
  differs from the other two (see the pairs columns).
"""


def markdown(r: dict) -> str:
    c, m, runs, v = r["config"], r["machine"], r["runs"], r["verify"]
    lines = [
        "# One SPO epoch: our trainer vs the authors' epoch structure", "",
        "`benchmarks/epoch_vs_authors.py` (issue #14). One whole epoch of `configs/world.yaml` on the embedded world, "
        f"CPU, {m['torch_threads']} torch thread(s), each (variant, repeat) a fresh process, {r['repeats']} "
        f"interleaved repeat(s) after {r['warmup_epochs']} untimed warm-up epoch(s) per process. Medians, "
        "(min–max) over the repeats.", "",
        f"Epoch: {c['prompts_per_round']} prompts per round × {c['rounds_per_epoch'] or 'all'} round(s), K = "
        f"{c['num_candidates']}, threshold {c['threshold']}, DDIM {c['num_steps']} steps diverted from step "
        f"{c['divert_start_step']}, CFG {c['guidance_scale']}, eta {c['eta']}, LoRA rank {c['lora_rank']} (alpha "
        f"{c['lora_alpha']}), training batch {c['train_batch_size']}, inner epochs {c['inner_epochs']}, lr "
        f"{c['learning_rate']}, β {c['beta']}, ε {c['eps']}; model `{c['model']}`, judge `{c['spm']}` "
        f"(`{c['latent_judge']}` for ours_latent)."
        + (" **--quick: a smoke test, not for quoting.**" if r["quick"] else ""), "",
        "| variant | epoch s | sampling s | training s | other s | pairs sampled | optimizer steps | UNet rows "
        "with graph / without | decoded images | judge rows | peak RSS over loaded model, MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in runs:
        rs = runs[name]
        col = lambda key, f=".2f", scale=1.0: _fmt(span([x[key] for x in rs]), f, scale)  # noqa: E731
        first = rs[0]
        lines.append(
            f"| {LABELS[name]} | {col('epoch_seconds')} | {col('sampling_seconds')} | {col('training_seconds')} | "
            f"{col('other_seconds')} | {col('pairs_sampled', '.0f')} | {col('optimizer_steps', '.0f')} | "
            f"{first['unet_rows_graph']} / {first['unet_rows_no_graph']} | {first['decoded_images']} | "
            f"{first['judge_rows']} | {col('peak_over_baseline_bytes', '.1f', 2 ** -20)} |")
    lines += ["", "Ratios per repeat (a variant's run divided by the authors' run of the same repeat):", "",
              "| ratio | whole epoch | sampling phase | training phase |", "|---|---|---|---|"]
    for key, rat in r["ratios"].items():
        lines.append(f"| {key} | **{_fmt(rat['epoch_seconds'])}** | {_fmt(rat['sampling_seconds'])} | "
                     f"{_fmt(rat['training_seconds'])} |")
    lines.append("")
    for name in (v for v in LATENT_VARIANTS if v in runs):
        lat = r["ratios"][f"{name}/authors"]["epoch_seconds"]
        verdict = "met" if lat["max"] <= TARGET else ("met at the median" if lat["median"] <= TARGET else "not met")
        lines += [f"Target of issue #14, our whole epoch with the latent judge ({name}) ≤ {TARGET}× the authors' "
                  f"structure: median {lat['median']:.2f}, worst repeat {lat['max']:.2f} -> **{verdict}**"
                  + (" (quick run: not meaningful)" if r["quick"] else "") + ".", ""]
    sv, lv = v["sampling"], v["loss"]
    lines += [
        "## Checked before timing (float32)", "",
        f"- Same pairs: on {v['prompts']} prompt(s) of the timed epoch's round, from the same random streams, our "
        f"resampler kept {sv['pairs_ours']} pairs and the authors' sampler {sv['pairs_authors']}; {sv['matched']} "
        f"match by (step, prompt), latents differ by at most {sv['latent_max_abs_diff']:.1e} and the "
        f"{sv['candidate_sets']} candidate sets' scores by at most {sv['score_max_abs_diff']:.1e} (scores up to "
        f"{sv['score_max_abs']:.1f}).",
        f"- Same loss: on {lv['pairs']} of these pairs (steps {lv['steps']}), with the LoRA moved off its init (max "
        f"|log r| {lv['log_ratio_abs_max']:.3f}, {lv['clipped_fraction']:.0%} clipped), the authors' loss differs "
        f"from ours by {lv['loss_rel_diff_authors']:.1e} (relative) and its LoRA gradient by "
        f"{lv['grad_rel_diff_authors']:.1e} (L2, relative); throughput.py's 4-call loss by "
        f"{lv['loss_rel_diff_throughput_4call']:.1e} / {lv['grad_rel_diff_throughput_4call']:.1e}.",
        f"- LoRA init identical in ours and the authors' variant: "
        f"{'yes' if runs['ours'][0]['lora_fingerprint'] == runs['authors'][0]['lora_fingerprint'] else 'no'} "
        "(the same global draws after the same seed).", "",
        "Work per epoch (from hooks, first repeat): *UNet rows with graph* are evaluated under autograd (policy "
        "calls of training), *without* are sampling, scoring and reference calls (CFG doubles every row). *Other s* "
        "is the epoch minus the sampling and training phases (trainer loop). Peak memory: RSS high-water mark "
        "(reset after the base model and the judge were loaded) minus the RSS then: the reference copy (authors "
        "only), LoRA, optimizer state, activations.", "",
        COPIED, NOT_EQUAL,
        "## Run", "", "```", r["command"], "```", "",
        f"- machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, diffusers {m['diffusers']}, peft "
        f"{m['peft']}, Python {m['python']}; {m['torch_threads']} torch thread(s) per process (OMP_NUM_THREADS too)",
        f"- load average (1, 5, 15 min) before {', '.join(f'{x:.2f}' for x in m['load_average_before'])}, after "
        f"{', '.join(f'{x:.2f}' for x in m['load_average_after'])}; per timed epoch in the JSON (other jobs share the "
        "machine: compare variants within a repeat)",
        f"- order: repeat r runs the variants rotated by r ({', '.join(runs)}; then starting from the next); "
        f"total wall time {r['wall_seconds']:.0f} s; raw numbers in the JSON next to this file"]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder for <name>.json/.md")
    p.add_argument("--name", default="epoch_vs_authors", help="output file stem")
    p.add_argument("--quick", action="store_true", help="2 prompts, 6 steps, threshold 0, 1 repeat: a smoke test")
    p.add_argument("--config", default=str(REPO / "configs" / "world.yaml"))
    p.add_argument("--override", nargs="*", default=[], help="config overrides key=value for every variant")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default 3; --quick 1)")
    p.add_argument("--warmup-epochs", type=int, default=None, help="untimed epochs per process (default 1; --quick 0)")
    p.add_argument("--verify-prompts", type=int, default=4, help="prompts of the sampler equivalence check")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated variants to time (ours and authors always run: the ratios' denominator "
                        f"and the pair whose equal training the report checks); "
                        f"default all: {','.join(VARIANTS)}")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.warmup_epochs = (0 if args.quick else 1) if args.warmup_epochs is None else args.warmup_epochs
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    args.variants = [v for v in VARIANTS if v in chosen or v in ("ours", "authors")]
    return args


def main(argv=None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU benchmark: accelerate must not pick a GPU
    args = parse_args(argv)
    if args.worker:
        Path(args.json).write_text(json.dumps(worker(args)))
        return None
    return driver(args)


if __name__ == "__main__":
    main()
