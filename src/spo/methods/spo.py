"""The SPO loss: DPO on a single denoising transition, with the ratio clipped in log space."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from spo.compilation import CompiledSampling


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


def epoch_prompts(n_prompts: int, per_epoch: int, epoch: int, seed: int) -> list[int]:
    """Prompt indices of an epoch: consecutive slices of shuffled passes over the prompt set.

    Without replacement: every prompt comes once per pass; an epoch smaller than the set takes the
    next `per_epoch` of the current pass and continues into a fresh shuffle when it runs out.
    """
    from spo.runtime import stream

    first, last = epoch * per_epoch, (epoch + 1) * per_epoch
    out = []
    for p in range(first // n_prompts, -(-last // n_prompts)):
        order = torch.randperm(n_prompts, generator=stream(seed, p, 0, "prompt_order")).tolist()
        lo, hi = max(first - p * n_prompts, 0), min(last - p * n_prompts, n_prompts)
        out += order[lo:hi]
    return out


class SPO:
    """Step-aware preference optimisation, on-policy as the authors run it.

    An epoch is a sequence of rounds. In each round every process samples `sample.batch_size` prompts
    of its disjoint shard with the step-wise resampler and the current policy; the round's pairs of all
    processes are pooled and shared out equally, and trained on before the next round samples. Host
    memory holds one round's pairs of all processes.
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self._stats = {}
        self.nonfinite_rounds = 0  # resampler rounds in a row that sampled NaN/inf
        self.compiled = CompiledSampling(cfg.model.compile)  # model.compile: the resampler's network calls

    def load_data(self, trainer) -> None:
        from spo.prompts import load_prompts

        self.prompts = load_prompts(self.cfg.prompts)
        trainer.dataset_size = len(self.prompts)

    def load_models(self, trainer) -> None:
        from spo.preference.judges import load_latent_judge, load_step_judge

        m = self.cfg.model
        self.judge_input = "images"
        if m.judge == "latent":
            self.spm = load_latent_judge(m.latent_judge, trainer.acc.device, trainer.diffusion)
            self.judge_input = "x0_latents" if self.spm.config.reads == "x0" else "latents"
        else:
            self.spm = load_step_judge(m.spm, trainer.acc.device)
            if m.scoring_decoder:  # the judge's decodes only; the trainer's freeze() moves it with the VAE
                from spo.plugins import resolve

                trainer.diffusion.set_scoring_decoder(resolve(m.scoring_decoder))

    def judge(self, images, captions, t):
        """The step judge; in fp32 even under a half-precision run unless sample.judge_precision=autocast.

        A latent judge gets latents (noisy, or x0-predictions) and the prompts' conditioning in place of images and
        captions."""
        if self.cfg.sample.judge_precision == "autocast":
            return self.spm(images, captions, t)
        with torch.autocast(images.device.type, enabled=False):
            return self.spm(images.float(), captions, t)

    def rounds_per_epoch(self, world: int) -> int:
        s = self.cfg.sample
        return s.batches_per_epoch or max(1, len(self.prompts) // (s.batch_size * world))

    def round_prompts(self, epoch: int, rnd: int, rank: int, world: int) -> list[str]:
        """This process's prompts of one round: its disjoint slice of the epoch's shuffled prompts."""
        s = self.cfg.sample
        per_round = s.batch_size * world
        idx = epoch_prompts(len(self.prompts), per_round * self.rounds_per_epoch(world), epoch, self.cfg.train.seed)
        mine = idx[rnd * per_round : (rnd + 1) * per_round][rank::world]
        return [self.prompts[i] for i in mine]

    def sample(self, trainer, epoch: int, rnd: int = 0):
        """One resampler round of this process with the policy as it stands: (pairs, stats, prompts)."""
        from spo.resampler import resample
        from spo.runtime import stream

        s, acc = self.cfg.sample, trainer.acc
        prompts = self.round_prompts(epoch, rnd, acc.process_index, acc.num_processes)
        gen = stream(self.cfg.train.seed, epoch, acc.process_index, "sample", rnd)
        trainer.diffusion.unet = acc.unwrap_model(trainer.unet)
        trainer.unet.eval()
        with acc.autocast(), self.compiled(trainer.diffusion.unet):
            result = resample(trainer.diffusion, self.judge, prompts, s.num_steps, s.guidance_scale, s.eta,
                              s.num_candidates, s.threshold, s.divert_start_step, gen, s.inner_steps, s.keep_rule,
                              s.continuation, judge_input=self.judge_input)
        trainer.unet.train()
        return result.pairs, result.stats, prompts

    def batches(self, trainer, epoch: int, start: int = 0):
        """Rounds `start`.. of the epoch: sample, pool and share the pairs, yield minibatches, then a SafePoint."""
        from spo.methods.base import SafePoint

        acc = trainer.acc
        if start == 0:
            self._stats = dict(pairs_sampled=0, pairs_trained=0, sample_seconds=0.0, train_seconds=0.0, kept=0,
                               candidates=0, score_sum=0.0)
        for rnd in range(start, self.rounds_per_epoch(acc.num_processes)):
            t0 = time.time()
            pairs, round_stats, prompts = self.sample(trainer, epoch, rnd)
            pairs = self._finite_only(pairs, round_stats)
            for st in round_stats:
                self._stats["kept"] += st.kept
                self._stats["candidates"] += st.candidates
                self._stats["score_sum"] += st.score_sum
            mine, all_prompts = self._pool(acc, pairs, prompts, epoch, rnd)
            self._stats["sample_seconds"] += time.time() - t0
            self._stats["pairs_sampled"] += len(pairs)
            self._stats["pairs_trained"] += len(mine)
            trainer.log_scalars({f"sample/{k}": v for k, v in _sampling_summary(round_stats).items()})
            t0 = time.time()
            yield from self._minibatches(trainer, mine, all_prompts, epoch, rnd)
            self._stats["train_seconds"] += time.time() - t0
            yield SafePoint(rnd + 1)

    def _finite_only(self, pairs, round_stats):
        """Drop pairs with NaN/inf latents; give up when rounds keep producing them (a diverged policy).

        NaN candidates also give NaN scores, which keep no pair at all: the judge's scores are checked too.
        """
        finite = torch.stack([torch.isfinite(getattr(pairs, n)).flatten(1).all(1)
                              for n in ("x_t", "win", "lose", "x_t_lose")]).all(0)
        scores_finite = all(math.isfinite(st.score_sum) for st in round_stats)
        if finite.all() and scores_finite:
            self.nonfinite_rounds = 0
            return pairs
        self.nonfinite_rounds += 1
        if self.nonfinite_rounds >= self.cfg.train.max_nonfinite_in_a_row:
            from spo.errors import SPOError

            raise SPOError(f"{self.nonfinite_rounds} resampler rounds in a row sampled NaN/inf latents: the policy "
                           f"has diverged; lower train.learning_rate and resume from an earlier checkpoint")
        return pairs.select(finite.nonzero().flatten())

    def _pool(self, acc, pairs, prompts, epoch: int, rnd: int):
        """Every process's pairs of the round, shuffled identically everywhere; this process's equal share."""
        from accelerate.utils import gather_object

        from spo.resampler import Pairs
        from spo.runtime import stream

        everyone = gather_object([(pairs, prompts)])
        shifted, offset = [], 0
        for part, part_prompts in everyone:  # prompt indices become indices into the concatenated list
            shifted.append(Pairs(**{**part.__dict__, "prompt_index": part.prompt_index + offset}))
            offset += len(part_prompts)
        all_prompts = [p for _, ps in everyone for p in ps]
        share = share_out(shifted, acc.process_index, acc.num_processes, stream(self.cfg.train.seed, epoch, 0, "share", rnd))
        return share, all_prompts

    def _minibatches(self, trainer, mine, all_prompts, epoch: int, rnd: int):
        from spo.runtime import stream

        t = self.cfg.train
        inner_epochs = t.inner_epochs
        for inner in range(inner_epochs if len(mine) else 0):
            gen = stream(t.seed, epoch, 0, "shuffle", rnd * inner_epochs + inner)
            order = torch.randperm(len(mine), generator=gen)
            for start in range(0, len(mine), t.batch_size):
                batch = mine.select(order[start : start + t.batch_size]).to(trainer.acc.device)
                cond, uncond = trainer.diffusion.encode_prompts([all_prompts[i] for i in batch.prompt_index.tolist()])
                yield batch, cond, uncond

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
        lw, ll, margin = info["log_ratio_win"], info["log_ratio_lose"], info["margin"]
        decided = margin != 0  # exact ties (policy = reference, e.g. the first step) are neither right nor wrong
        return loss, dict(
            reward_accuracy=(margin[decided] > 0).float().mean().item() if decided.any() else float("nan"),
            ratio_win=lw.exp().mean().item(), ratio_lose=ll.exp().mean().item(),
            clipped=((lw < lo) | (lw > hi) | (ll < lo) | (ll > hi)).float().mean().item())

    def epoch_metrics(self) -> dict:
        s = dict(self._stats)
        candidates = max(1, s.pop("candidates"))
        s["fraction_kept"], s["spm_score"] = s.pop("kept") / candidates, s.pop("score_sum") / candidates
        s["pairs_per_s"] = s["pairs_trained"] * self.cfg.train.inner_epochs / max(s["train_seconds"], 1e-9)
        return s

    def progress_state(self) -> dict:
        """What `epoch_metrics` needs to cover a whole epoch after a restart inside it."""
        return dict(self._stats)

    def restore_progress(self, state: dict) -> None:
        self._stats = dict(state)


def _sampling_summary(stats) -> dict:
    candidates = max(1, sum(s.candidates for s in stats))
    return dict(fraction_kept=sum(s.kept for s in stats) / candidates,
                spm_score=sum(s.score_sum for s in stats) / candidates)
