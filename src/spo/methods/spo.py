"""The SPO loss: DPO on a single denoising transition, with the ratio clipped in log space."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F


def spo_loss(log_ratio_win: torch.Tensor, log_ratio_lose: torch.Tensor, beta: float, eps: float):
    """−log σ(β (clip(log r_w) − clip(log r_l))), clip to [log(1−ε), log(1+ε)].

    Clipping the log-ratio (never exp-then-clamp) keeps the loss and its gradient finite however far
    the policy drifts: outside the band the gradient is exactly zero instead of 0 × inf.
    Returns the mean loss and the per-pair implicit reward margin β (log r_w − log r_l) before clipping.
    """
    lo, hi = math.log(1 - eps), math.log(1 + eps)
    wd = torch.float64 if log_ratio_win.dtype == torch.float64 else torch.float32
    clipped_w = log_ratio_win.to(wd).clamp(lo, hi)
    clipped_l = log_ratio_lose.to(wd).clamp(lo, hi)
    loss = -F.logsigmoid(beta * (clipped_w - clipped_l))
    return loss.mean(), beta * (log_ratio_win.to(wd) - log_ratio_lose.to(wd)).detach()


# ------------------------------------------------------------------ one batch of pairs


def transition_inputs(pairs, cond, uncond):
    """Model inputs for a batch of pairs: x_t once per pair, plus x_t_lose where it differs (inner steps)."""
    from spo.models import Conditioning, as_conditioning

    cond, uncond = as_conditioning(cond), as_conditioning(uncond)
    extra = (~pairs.shared).nonzero().flatten()
    x = torch.cat([pairs.x_t, pairs.x_t_lose[extra]])
    t = torch.cat([pairs.timesteps, pairs.timesteps[extra]])
    t_prev = torch.cat([pairs.prev_timesteps, pairs.prev_timesteps[extra]])
    return x, t, t_prev, Conditioning.cat([cond, cond[extra]]), Conditioning.cat([uncond, uncond[extra]]), extra


def pair_loss(diffusion, policy, reference_out: torch.Tensor, pairs, cond, uncond, guidance: float,
              eta: float, beta: float, eps: float):
    """SPO loss of a batch of pairs with ONE policy and ONE reference evaluation per pair.

    Win and lose share x_t, t and prompt, so μ_θ(x_t) and μ_ref(x_t) serve both; only the
    evaluated x_{t-1} differs in the closed-form log-ratio. (Transitions inside an inner-steps
    rollout start from different states and get their own evaluation.) `reference_out` is the
    reference model's guided output on `transition_inputs(pairs, cond, uncond)`; `diffusion` is the
    model-family adapter that gives the guided output and the transition.
    """
    from spo.sampling import transition_log_ratio

    x, t, t_prev, c, u, extra = transition_inputs(pairs, cond, uncond)
    out = diffusion.guided_output(x, t, c, u, guidance, model=policy)
    mean_pol, std, _ = diffusion.transition(out, t, t_prev, x, eta)
    mean_ref, _, _ = diffusion.transition(reference_out, t, t_prev, x, eta)
    n = len(pairs)
    lose_rows = torch.arange(n, device=x.device)
    lose_rows[extra] = n + torch.arange(len(extra), device=x.device)
    log_ratio_win = transition_log_ratio(pairs.win, mean_pol[:n], mean_ref[:n], std[:n])
    log_ratio_lose = transition_log_ratio(pairs.lose, mean_pol[lose_rows], mean_ref[lose_rows], std[lose_rows])
    loss, margin = spo_loss(log_ratio_win, log_ratio_lose, beta, eps)
    return loss, dict(margin=margin, log_ratio_win=log_ratio_win.detach(), log_ratio_lose=log_ratio_lose.detach())


def share_out(parts: list, rank: int, world: int, generator: torch.Generator):
    """All processes' pairs, shuffled identically everywhere, cut into `world` equal shares."""
    from spo.resampler import Pairs

    allp = Pairs.cat([p for p in parts if len(p)]) if any(len(p) for p in parts) else parts[0]
    n = len(allp) - len(allp) % world
    if n == 0:
        return allp.select(torch.zeros(0, dtype=torch.long))
    order = torch.randperm(len(allp), generator=generator)[:n]
    return allp.select(order[rank::world])


# ------------------------------------------------------------------ the method


class SPO:
    """Step-aware preference optimisation: pairs from the step-wise resampler, the SPO pair loss."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._stats = {}

    def load_data(self, trainer) -> None:
        from spo.prompts import load_prompts

        self.prompts = load_prompts(self.cfg.prompts)
        trainer.dataset_size = len(self.prompts)

    def load_models(self, trainer) -> None:
        from spo.plugins import resolve
        from spo.preference.spm import load_scorer_model

        self.judge = load_scorer_model(resolve(self.cfg.model.spm)).eval().requires_grad_(False).to(trainer.acc.device)

    def sample(self, trainer, epoch: int):
        """This process's resampler batches of the epoch, with the policy as it stands: (pairs, stats, prompts)."""
        from spo.resampler import Pairs, resample
        from spo.runtime import stream

        s, acc = self.cfg.sample, trainer.acc
        gen = stream(self.cfg.train.seed, epoch, acc.process_index, "sample")
        trainer.diffusion.pipe.unet = acc.unwrap_model(trainer.unet)
        parts, stats, prompts = [], [], []
        trainer.unet.eval()
        for _ in range(s.batches_per_epoch):
            idx = torch.randint(len(self.prompts), (s.batch_size,), generator=gen)
            batch_prompts = [self.prompts[i] for i in idx]
            with acc.autocast():
                result = resample(trainer.diffusion, self.judge, batch_prompts, s.num_steps, s.guidance_scale, s.eta,
                                  s.num_candidates, s.threshold, s.divert_start_step, gen, s.inner_steps)
            result.pairs.prompt_index += len(prompts)
            prompts += batch_prompts
            parts.append(result.pairs)
            stats += result.stats
        trainer.unet.train()
        return Pairs.cat(parts), stats, prompts

    def batches(self, trainer, epoch: int):
        """Sample the epoch, pool every process's pairs, then yield this process's share in minibatches."""
        from accelerate.utils import gather_object

        from spo.resampler import Pairs
        from spo.runtime import stream

        cfg, acc = self.cfg, trainer.acc
        t0 = time.time()
        pairs, stats, prompts = self.sample(trainer, epoch)
        self._stats = dict(pairs_sampled=len(pairs), sample_seconds=time.time() - t0, **_sampling_summary(stats))
        everyone = gather_object([(pairs, prompts)])
        shifted, offset = [], 0
        for part, part_prompts in everyone:  # prompt indices become indices into the concatenated list
            shifted.append(Pairs(**{**part.__dict__, "prompt_index": part.prompt_index + offset}))
            offset += len(part_prompts)
        all_prompts = [p for _, ps in everyone for p in ps]
        mine = share_out(shifted, acc.process_index, acc.num_processes, stream(cfg.train.seed, epoch, 0, "share"))
        self._stats["pairs_trained"] = len(mine)
        if len(mine) == 0:
            return
        t0 = time.time()
        for inner in range(cfg.train.inner_epochs):
            order = torch.randperm(len(mine), generator=stream(cfg.train.seed, epoch, 0, "shuffle", inner))
            for start in range(0, len(mine), cfg.train.batch_size):
                batch = mine.select(order[start : start + cfg.train.batch_size]).to(acc.device)
                cond, uncond = trainer.diffusion.encode_prompts([all_prompts[i] for i in batch.prompt_index.tolist()])
                yield batch, cond, uncond
        self._stats["pairs_per_s"] = len(mine) * cfg.train.inner_epochs / max(time.time() - t0, 1e-9)

    def loss(self, trainer, batch):
        pairs, cond, uncond = batch
        s, t = self.cfg.sample, self.cfg.train
        x, ts, _, c, u, _ = transition_inputs(pairs, cond, uncond)
        ref = trainer.reference_output(x, ts, c, u, s.guidance_scale)
        loss, info = pair_loss(trainer.diffusion, trainer.unet, ref, pairs, cond, uncond, s.guidance_scale, s.eta,
                               t.beta, t.eps)
        if not torch.isfinite(loss):
            return loss, {}
        lo, hi = math.log(1 - t.eps), math.log(1 + t.eps)
        lw, ll = info["log_ratio_win"], info["log_ratio_lose"]
        return loss, dict(
            reward_accuracy=(info["margin"] > 0).float().mean().item(), ratio_win=lw.exp().mean().item(),
            ratio_lose=ll.exp().mean().item(),
            clipped=((lw < lo) | (lw > hi) | (ll < lo) | (ll > hi)).float().mean().item())

    def epoch_metrics(self) -> dict:
        return dict(self._stats)


def _sampling_summary(stats) -> dict:
    candidates = max(1, sum(s.candidates for s in stats))
    return dict(fraction_kept=sum(s.kept for s in stats) / candidates,
                spm_score=sum(s.score_sum for s in stats) / candidates)
