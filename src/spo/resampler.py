"""The step-wise resampler: sample trajectories and collect one win/lose pair per diverted step.

Ordinary DDIM sampling (eta > 0, so each step is a Gaussian transition) up to `divert_start_step`;
from there, at every step, K candidates x_{t-1} are drawn from the same x_t and scored by the
step-aware preference model through the next step's x0-prediction (that UNet call is kept and
reused to continue the trajectory). The best and the worst candidate form a pair if their
preference gap exceeds `threshold` (`pair_gap`: by default the authors' rule, the 2-way softmax of
the best and worst scores, p_best − p_worst = tanh(Δs/2)); the trajectory then continues from a
candidate chosen uniformly at random, so the next pair is independent of this one. At the last step the
candidates are final latents and are scored as decoded images at t=0.

With a latent judge (`judge_input="latents"`, `spo.preference.latent_judge`) the candidates are scored as
they are, noisy latents at their own noise level (the next timestep, 0 after the last step): no decode,
and the next step's network call is made only for the candidate the trajectory continues from (b rows
instead of b·K). A latent judge that reads x0 (`judge_input="x0_latents"`) keeps the scoring network call and
scores the candidates' x0-prediction latents: no decode, no CLIP. Pairs, gaps, thresholds and every random draw
are the same as with a pixel judge.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch



@dataclass
class Pairs:
    """Win/lose transitions that share x_t, t and prompt (all tensors on CPU)."""

    x_t: torch.Tensor  # (N, C, H, W) the state the preferred transition starts from
    timesteps: torch.Tensor  # (N,)
    prev_timesteps: torch.Tensor  # (N,) the step the transition leads to (negative: the last step)
    win: torch.Tensor  # (N, C, H, W) the preferred x_{t-1}
    lose: torch.Tensor  # (N, C, H, W)
    prompt_index: torch.Tensor  # (N,) index into the prompt list given to `resample`
    step_index: torch.Tensor  # (N,) position of t in the sampling schedule
    gap: torch.Tensor  # (N,) softmax score gap of the pair
    x_t_lose: torch.Tensor | None = None  # (N, C, H, W) start of the lose transition; None = x_t for all
    shared: torch.Tensor | None = None  # (N,) bool: the lose transition starts from x_t too

    def __post_init__(self) -> None:
        if self.x_t_lose is None:
            self.x_t_lose = self.x_t
        if self.shared is None:
            self.shared = torch.ones(len(self.timesteps), dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.timesteps)

    @staticmethod
    def cat(parts: list["Pairs"]) -> "Pairs":
        names = Pairs.__dataclass_fields__
        return Pairs(**{n: torch.cat([getattr(p, n) for p in parts]) for n in names})

    def select(self, index: torch.Tensor) -> "Pairs":
        return Pairs(**{n: getattr(self, n)[index] for n in Pairs.__dataclass_fields__})

    @staticmethod
    def empty(latent_shape) -> "Pairs":
        zeros, none = torch.zeros((0, *latent_shape)), torch.zeros(0, dtype=torch.long)
        return Pairs(zeros, none, none, zeros, zeros, none, none, torch.zeros(0))

    def to(self, device) -> "Pairs":
        return Pairs(**{n: getattr(self, n).to(device) for n in Pairs.__dataclass_fields__})


@dataclass
class StepStats:
    """Per diverted step: how many candidate sets were scored, pairs kept, gaps and scores."""

    step_index: int
    timestep: int
    candidates: int = 0
    kept: int = 0
    gap_sum: float = 0.0
    score_sum: float = 0.0
    chosen_rank_counts: list = field(default_factory=list)  # how often the continuation was the r-th best


@dataclass
class ResampleResult:
    pairs: Pairs
    final_latents: torch.Tensor
    stats: list[StepStats] = field(default_factory=list)


KEEP_RULES = ("best_worst", "kway")


def pair_gap(scores: torch.Tensor, rule: str = "best_worst") -> torch.Tensor:
    """How clearly the best of each row of K scores beats the worst, in [0, 1).

    best_worst (the authors' rule): softmax over the best and the worst score only,
        p_best − p_worst = tanh((s_best − s_worst) / 2);
    kway: softmax over all K scores, max_k p_k − min_k p_k (identical at K = 2, smaller for K > 2).
    """
    if rule == "best_worst":
        return torch.tanh((scores.max(-1).values - scores.min(-1).values).float() / 2)
    if rule == "kway":
        probs = scores.softmax(-1)
        return probs.max(-1).values - probs.min(-1).values
    raise ValueError(f"unknown keep rule {rule!r}; choose one of {KEEP_RULES}")


def _judge_device(judge, default: torch.device) -> torch.device:
    first = next(judge.parameters(), None) if hasattr(judge, "parameters") else None
    return first.device if first is not None else default


def _score_candidates(diffusion, judge, candidates, t_next, cond, uncond, guidance, captions):
    """Judge scores of candidates via the x0-prediction at t_next; also returns the reusable model output."""
    if t_next is None:  # final step: the candidates are clean latents
        images, out, t_score = diffusion.decode(candidates), None, 0
    else:
        tb = torch.full((len(candidates),), t_next, device=candidates.device)  # the schedule's type: int or float
        images, out = diffusion.x0_images(candidates, tb, cond, uncond, guidance)
        t_score = int(t_next)
    device = _judge_device(judge, candidates.device)
    t_judge = torch.full((len(candidates),), t_score, device=device, dtype=torch.long)
    return judge(images.to(device), captions, t_judge).float().to(candidates.device), out


def _score_latents(judge, candidates, t_next, cond):
    """Latent judge scores of candidates at their own noise level (t_next, or 0 for clean final latents)."""
    device = _judge_device(judge, candidates.device)
    t = torch.full((len(candidates),), 0.0 if t_next is None else float(t_next), device=device)
    return judge(candidates.to(device), cond.to(device), t).float().to(candidates.device)


def _score_x0_latents(diffusion, judge, candidates, t_next, cond, uncond, guidance):
    """Latent judge scores of the candidates' guided x0-predictions at t_next (no decode); also the model output."""
    if t_next is None:  # final step: the candidates are clean latents
        x0, out = candidates, None
    else:
        tb = torch.full((len(candidates),), t_next, device=candidates.device)
        out = diffusion.guided_output(candidates, tb, cond, uncond, guidance)
        x0 = diffusion.x0_prediction(candidates, out, tb)
    return _score_latents(judge, x0, t_next, cond), out


JUDGE_INPUTS = ("images", "latents", "x0_latents")


@torch.no_grad()
def resample(diffusion, judge, prompts: list[str], num_steps: int, guidance: float, eta: float,
             num_candidates: int, threshold: float, divert_start_step: int,
             generator: torch.Generator, inner_steps: int = 0, keep_rule: str = "best_worst",
             continuation: str = "random", judge_input: str = "images", on_scored=None) -> ResampleResult:
    """Run the step-wise resampler for one batch of prompts; see the module docstring.

    `diffusion` is a model-family adapter (`spo.models.Diffusion`). judge_input="images": `judge(images,
    captions, t)` scores decoded x0-predictions in [-1, 1] (the step-aware preference model, or any scorer);
    "latents": `judge(latents, conditioning, t)` scores the noisy candidate latents themselves; "x0_latents": the
    same judge call on the candidates' guided x0-predictions at t_next (the network call is kept for continuing).
    `on_scored(candidates (b*K, C, H, W), t_score, scores (b, K), outputs)`, if given, sees every scored candidate
    set (t_score: the noise level the candidates are at, 0 for final latents; outputs: the guided network output
    at t_score, None where none was made); it draws nothing, so pairs are unchanged.
    """
    if judge_input not in JUDGE_INPUTS:
        raise ValueError(f"unknown judge_input {judge_input!r}; choose one of {JUDGE_INPUTS}")
    schedule = diffusion.schedule(num_steps)
    timesteps = [t for t, _ in schedule]
    device, b, k = diffusion.device, len(prompts), num_candidates
    cond, uncond = diffusion.encode_prompts(prompts)
    cond_k, uncond_k = cond.repeat_interleave(k, 0), uncond.repeat_interleave(k, 0)
    captions_k = [p for p in prompts for _ in range(k)]
    x = diffusion.initial_latents(b, generator).to(cond.dtype)

    def model_out(latents, t, c, u):
        tb = torch.full((len(latents),), t, device=device)  # DDIM's integer steps, or a flow model's float times
        return diffusion.guided_output(latents, tb, c, u, guidance)

    def transition(latents, out, i):
        t, t_prev = schedule[i]
        tb = torch.full((len(latents),), t, device=device)
        mean, std, _ = diffusion.transition(out, tb, torch.full_like(tb, t_prev), latents, eta)
        return mean, std

    def noise_like(latents):
        return torch.randn(latents.shape, generator=generator).to(device)

    out = model_out(x, timesteps[0], cond, uncond)
    found, stats = [], []
    rows = torch.arange(b)
    i = 0
    while i < len(timesteps):
        if i < divert_start_step:
            mean, std = transition(x, out, i)
            x = (mean + std * noise_like(x)).to(x.dtype)
            if i + 1 < len(timesteps):
                out = model_out(x, timesteps[i + 1], cond, uncond)
            i += 1
            continue
        span = min(inner_steps + 1, len(timesteps) - i)
        mean, std = transition(x, out, i)
        noise = torch.randn((b, k, *x.shape[1:]), generator=generator).to(device)
        cur = (mean[:, None] + std[:, None] * noise).to(x.dtype).reshape(b * k, *x.shape[1:])
        chain = [x.repeat_interleave(k, 0), cur]  # states along each candidate's rollout
        for j in range(1, span):
            m, sd = transition(cur, model_out(cur, timesteps[i + j], cond_k, uncond_k), i + j)
            cur = (m + sd * noise_like(cur)).to(x.dtype)
            chain.append(cur)
        t_next = timesteps[i + span] if i + span < len(timesteps) else None
        if judge_input == "latents":  # no network call here: only the chosen candidate needs one, below
            scores, cand_out = _score_latents(judge, cur, t_next, cond_k), None
        elif judge_input == "x0_latents":
            scores, cand_out = _score_x0_latents(diffusion, judge, cur, t_next, cond_k, uncond_k, guidance)
        else:
            scores, cand_out = _score_candidates(diffusion, judge, cur, t_next, cond_k, uncond_k, guidance,
                                                 captions_k)
        scores = scores.view(b, k)
        if on_scored is not None:
            on_scored(cur, 0 if t_next is None else t_next, scores, cand_out)
        best, worst = scores.argmax(-1), scores.argmin(-1)
        gap = pair_gap(scores, keep_rule)
        keep = (gap > threshold).cpu()
        st = StepStats(i, int(timesteps[i]), candidates=b, kept=int(keep.sum()), gap_sum=float(gap.sum()),
                       score_sum=float(scores.mean(-1).sum()))
        stats.append(st)
        if keep.any():
            idx = rows[keep]
            w, l = idx * k + best[idx].cpu(), idx * k + worst[idx].cpu()
            for j in range(span):
                t, t_prev = schedule[i + j]
                found.append(Pairs(
                    x_t=chain[j][w].cpu(), timesteps=torch.full((len(idx),), t),
                    prev_timesteps=torch.full((len(idx),), t_prev),
                    win=chain[j + 1][w].cpu(), lose=chain[j + 1][l].cpu(), prompt_index=idx.clone(),
                    step_index=torch.full((len(idx),), i + j), gap=gap[idx].cpu(), x_t_lose=chain[j][l].cpu(),
                    shared=torch.full((len(idx),), j == 0)))
        choice = torch.randint(k, (b,), generator=generator)  # drawn always, so the streams stay aligned
        if continuation != "random":  # the paper's ablation: continue from the winner or the loser
            choice = (best if continuation == "best" else worst).cpu()
        ranks = (scores > scores[rows, choice.to(scores.device)][:, None]).sum(-1).cpu()
        st.chosen_rank_counts = torch.bincount(ranks, minlength=k).tolist()
        x = cur.view(b, k, *x.shape[1:])[rows, choice]
        if t_next is not None and cand_out is not None:
            out = cand_out.view(b, k, *x.shape[1:])[rows, choice]
        elif t_next is not None:
            out = model_out(x, t_next, cond, uncond)
        i += span
    if not found:
        return ResampleResult(Pairs.empty(x.shape[1:]), x, stats)
    return ResampleResult(Pairs.cat(found), x, stats)
