"""Training the latent step judge (`spo train-latent-judge`), in one of two ways.

On preference pairs (the default; no network calls, no decodes): every image of the preference data is
VAE-encoded once and every caption encoded once (the diffusion model's own conditioning); then each step
noises both latents of a pair with the SAME noise to one random t (uniform, as the SPM recipe) and applies
the PickScore loss (soft Bradley–Terry targets, ties 0.5/0.5, per-prompt weights) to the judge's two scores
— the SPM's recipe minus its guided step and decode.

Distilled from a pixel step judge (`distill.teacher`): the diffusion model draws candidate sets exactly as
the resampler does (K siblings x_{t-1} of one x_t), the teacher scores them through the pixel path, and the
judge learns to reproduce the teacher's scores within each set (mean squared error of the set-centred
scores, so its score gaps, and so the keep threshold, are on the teacher's scale). Why: a judge trained on
pairs of *different* images ranks siblings, which differ only by the step's noise, by whatever direction
its latent features happen to favour, and SPO then moves the policy along that direction (on the world it
lowered the true utility, docs/results.md §2.3). Siblings are the only comparisons SPO ever asks for.
"""

from __future__ import annotations

import contextlib
import dataclasses
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


@dataclass
class CandidateSets:
    """The diffusion model's own candidate sets, as the resampler draws them, with the teacher's scores."""

    latents: torch.Tensor  # (N, K, C, H, W) the K siblings of each set, at noise level t
    t: torch.Tensor  # (N,) the noise level the candidates are at (0: final latents)
    text: torch.Tensor  # (P, L, D) conditioning embeddings of the prompts
    prompt_index: torch.Tensor  # (N,) row of `text` for each set
    scores: torch.Tensor  # (N, K) the teacher's scores

    def __len__(self) -> int:
        return len(self.t)

    def select(self, rows: torch.Tensor) -> "CandidateSets":
        return CandidateSets(self.latents[rows], self.t[rows], self.text, self.prompt_index[rows], self.scores[rows])

    @staticmethod
    def cat(parts: list["CandidateSets"]) -> "CandidateSets":
        """One collection of several (each with its own prompts)."""
        offsets = torch.tensor([0] + [len(p.text) for p in parts]).cumsum(0)
        return CandidateSets(torch.cat([p.latents for p in parts]), torch.cat([p.t for p in parts]),
                             torch.cat([p.text for p in parts]),
                             torch.cat([p.prompt_index + offsets[i] for i, p in enumerate(parts)]),
                             torch.cat([p.scores for p in parts]))

    def split_prompts(self, held_out_fraction: float) -> tuple["CandidateSets", "CandidateSets"]:
        """(train, held out): the sets of the last `held_out_fraction` of the prompts are held out."""
        held = self.prompt_index >= len(self.text) - int(round(held_out_fraction * len(self.text)))
        return self.select((~held).nonzero().squeeze(1)), self.select(held.nonzero().squeeze(1))


@torch.no_grad()
def sample_candidate_sets(diffusion, teacher, prompts: list[str], sample, batch_size: int,
                          generator: torch.Generator, log=print, reads: str = "noisy") -> CandidateSets:
    """Run the resampler (pixel path, `teacher` as its judge) over `prompts` and keep every scored set: the
    candidates themselves (reads="noisy") or their guided x0-predictions, the latents the teacher's images are
    decoded from (reads="x0")."""
    from spo.resampler import resample

    latents, t, prompt_index, scores = [], [], [], []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]

        def keep(candidates, t_score, set_scores, outputs, start=start):
            b, k = set_scores.shape
            if reads == "x0" and outputs is not None:
                tb = torch.full((len(candidates),), t_score, device=candidates.device)
                candidates = diffusion.x0_prediction(candidates, outputs, tb)
            latents.append(candidates.reshape(b, k, *candidates.shape[1:]).float().cpu())
            t.append(torch.full((b,), float(t_score)))
            prompt_index.append(torch.arange(start, start + b))
            scores.append(set_scores.float().cpu())

        resample(diffusion, teacher, batch, sample.num_steps, sample.guidance_scale, sample.eta,
                 sample.num_candidates, sample.threshold, sample.divert_start_step, generator,
                 inner_steps=sample.inner_steps, on_scored=keep)
        log(f"[latent-judge] sampled candidate sets for {min(start + batch_size, len(prompts))}/{len(prompts)} prompts")
    text = torch.cat([diffusion.encode_prompts(prompts[i:i + batch_size])[0].embeds.float().cpu()
                      for i in range(0, len(prompts), batch_size)])
    return CandidateSets(torch.cat(latents), torch.cat(t), text, torch.cat(prompt_index), torch.cat(scores))


def set_scores(judge, sets: CandidateSets, rows: torch.Tensor) -> torch.Tensor:
    """The judge's (len(rows), K) scores of the chosen candidate sets."""
    device = next(judge.parameters()).device
    n, k = len(rows), sets.latents.shape[1]
    latents = sets.latents[rows].reshape(n * k, *sets.latents.shape[2:]).to(device)
    text = sets.text[sets.prompt_index[rows]].repeat_interleave(k, 0).to(device)
    return judge(latents, text, sets.t[rows].repeat_interleave(k).to(device)).view(n, k)


def centred_score_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the scores after removing each set's mean: only differences within a set count."""
    centre = lambda s: s - s.mean(-1, keepdim=True)  # noqa: E731
    return (centre(student.float()) - centre(teacher.float())).pow(2).mean()


def set_agreement(student: torch.Tensor, teacher: torch.Tensor, threshold: float) -> dict:
    """How often the student makes the resampler's choices the teacher makes, over (N, K) score rows."""
    from spo.resampler import pair_gap

    d_s, d_t = student[:, :, None] - student[:, None], teacher[:, :, None] - teacher[:, None]
    upper = torch.ones(student.shape[1], student.shape[1], dtype=torch.bool).triu(1)
    keep_s, keep_t = pair_gap(student) > threshold, pair_gap(teacher) > threshold
    same_pair = (student.argmax(1) == teacher.argmax(1)) & (student.argmin(1) == teacher.argmin(1))
    return dict(sets=len(student), same_best=(student.argmax(1) == teacher.argmax(1)).float().mean().item(),
                same_worst=(student.argmin(1) == teacher.argmin(1)).float().mean().item(),
                same_pair=same_pair.float().mean().item(),
                pair_order=((d_s > 0) == (d_t > 0))[:, upper].float().mean().item(),
                kept_student=keep_s.float().mean().item(), kept_teacher=keep_t.float().mean().item(),
                kept_same=(keep_s == keep_t).float().mean().item())


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
    from spo.preference.latent_judge import LatentJudgeEnsemble
    from spo.runtime import RunLock, check_output_dir, replace_old_run

    cfg.validate()
    m, tr = cfg.model, cfg.train
    output = Path(cfg.log.output_dir)
    with RunLock(output, log=log):
        check_output_dir(output, "config.yaml", overwrite, False)
        torch.manual_seed(tr.seed)
        diffusion = load_diffusion(resolve(m.diffusion_model), vae=resolve(m.vae) or None)
        if tr.t_max >= diffusion.scheduler.config.num_train_timesteps:
            raise SPOError(f"train.t_max must be < {diffusion.scheduler.config.num_train_timesteps}, got {tr.t_max}")
        t0 = time.time()
        distill = bool(cfg.distill.teacher)
        held_out_policy = None
        if distill:
            data, held_out, held_out_policy = _distill_data(cfg, diffusion, log)
        else:
            data, held_out = _pair_data(cfg, diffusion, log), None
        data_seconds = time.time() - t0
        replace_old_run(output, "config.yaml", overwrite, False, _ONE_PROCESS)
        output.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output / "config.yaml")
        members, reports, t1 = [], [], time.time()
        for i in range(m.ensemble_size):
            if i:  # member 0 draws its weights as a single judge does; the others from their own seed
                torch.manual_seed(tr.seed + i)
            judge = _initial_judge(cfg, diffusion, data.text).to(diffusion.device)
            member_tr = dataclasses.replace(tr, seed=tr.seed + i)
            before = _agreement(judge, held_out, cfg.sample.threshold) if distill else None
            batch_loss = _distill_loss(judge, data, member_tr) if distill else _pair_loss(judge, diffusion, data, member_tr)
            metrics_name = "metrics.jsonl" if i == 0 else f"metrics_member_{i}.jsonl"
            metrics = _optimise(judge, batch_loss, member_tr, cfg.log.log_every, output / metrics_name, log)
            member_report = dict(seed=member_tr.seed, last=metrics)
            if distill:
                member_report.update(held_out_agreement_before=before,
                                     held_out_agreement=_agreement(judge, held_out, cfg.sample.threshold))
            members.append(judge)
            reports.append(member_report)
        train_seconds = time.time() - t1
        judge = members[0] if len(members) == 1 else LatentJudgeEnsemble(members)
        final = output / "latent_judge"
        with atomic_directory(final) as tmp:
            judge.save_pretrained(tmp)
        n_params = sum(p.numel() for p in judge.parameters())
        report = dict(parameters=n_params, steps=tr.max_steps, encode_seconds=round(data_seconds, 1),
                      train_seconds=round(train_seconds, 1), last=reports[0]["last"])
        if len(members) > 1:
            report.update(members=reports)
        if distill:
            after = _agreement(judge, held_out, cfg.sample.threshold)
            report.update(train_sets=len(data), held_out_sets=len(held_out),
                          held_out_agreement_before=reports[0]["held_out_agreement_before"], held_out_agreement=after)
            log(f"[latent-judge] held-out agreement with the teacher: {after}")
            if held_out_policy is not None:  # the sets of the tuned policies' held-out prompts
                report.update(held_out_policy_sets=len(held_out_policy),
                              held_out_agreement_on_policy=_agreement(judge, held_out_policy, cfg.sample.threshold))
                log(f"[latent-judge] ... on the policies' sets: {report['held_out_agreement_on_policy']}")
        else:
            report.update(pairs=len(data))
        atomic_write_text(output / "train_report.json", json.dumps(report, indent=2))
        log(f"[latent-judge] {n_params} parameters, {len(members)} x {tr.max_steps} steps in {train_seconds:.1f}s")
        return final


def _pair_data(cfg, diffusion, log) -> EncodedPairs:
    from spo.plugins import resolve
    from spo.preference.data import load_preference_dataset

    t0 = time.time()
    pairs = encode_pairs(diffusion, load_preference_dataset(resolve(cfg.data.dataset), cfg.data.split),
                         cfg.train.encode_batch_size, cfg.data.per_prompt_weighting)
    log(f"[latent-judge] encoded {len(pairs)} pairs and {len(pairs.text)} captions in {time.time() - t0:.1f}s")
    return pairs


def _distill_data(cfg, diffusion, log) -> tuple[CandidateSets, CandidateSets, CandidateSets | None]:
    """Sample the candidate sets with the teacher: the base model's, then each tuned policy's (distill.policies).
    Returns (train, held out of the base model, held out of the policies); the sets of the last prompts of every
    draw are held out."""
    from spo.preference.judges import load_step_judge
    from spo.prompts import load_prompts

    d = cfg.distill
    prompts = load_prompts(d.prompts)
    for name, wanted in (("num_prompts", d.num_prompts), ("policy_prompts", d.policy_prompts if d.policies else 0)):
        if len(prompts) < wanted:
            raise SPOError(f"distill.{name}={wanted} but {d.prompts} has {len(prompts)} prompts")
    generator = torch.Generator().manual_seed(cfg.train.seed)
    order = torch.randperm(len(prompts), generator=generator)[:d.num_prompts].tolist()
    teacher = load_step_judge(d.teacher, diffusion.device)
    sets = sample_candidate_sets(diffusion, teacher, [prompts[i] for i in order], cfg.sample, d.batch_size,
                                 generator, log, cfg.model.reads)
    train, held_base = sets.split_prompts(d.held_out_fraction)
    log(f"[latent-judge] {len(sets)} candidate sets of {sets.latents.shape[1]} from the base model, "
        f"{len(held_base)} held out")
    trains, helds = [train], []
    for folder in d.policies:
        order = torch.randperm(len(prompts), generator=generator)[:d.policy_prompts].tolist()
        with policy_lora(diffusion, folder):
            sets = sample_candidate_sets(diffusion, teacher, [prompts[i] for i in order], cfg.sample, d.batch_size,
                                         generator, log, cfg.model.reads)
        train, held = sets.split_prompts(d.held_out_fraction)
        trains.append(train)
        helds.append(held)
        log(f"[latent-judge] {len(sets)} candidate sets from the policy {folder}, {len(held)} held out")
    return CandidateSets.cat(trains), held_base, CandidateSets.cat(helds) if helds else None


@contextlib.contextmanager
def policy_lora(diffusion, folder: str):
    """The diffusion model with an SPO run's LoRA loaded (`OUT/lora`), unloaded again afterwards."""
    from spo.plugins import resolve

    path = Path(resolve(folder))
    if not path.is_dir():
        raise SPOError(f"distill.policies: {folder} is not a LoRA folder (an SPO run's OUT/lora)")
    try:
        diffusion.pipe.load_lora_weights(str(path))
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise SPOError(f"distill.policies: cannot load the LoRA in {folder} into the diffusion model "
                       f"({str(exc).splitlines()[0][:200]}); use a run of model.diffusion_model") from None
    try:
        yield diffusion
    finally:
        diffusion.pipe.unload_lora_weights()


def _initial_judge(cfg, diffusion, text: torch.Tensor):
    from spo.plugins import resolve
    from spo.preference.latent_judge import LatentJudgeConfig, LatentStepJudge, check_compatible

    m = cfg.model
    if m.init:
        judge = LatentStepJudge.from_pretrained(resolve(m.init))
        check_compatible(judge, diffusion.initial_latents(1, torch.Generator()).shape[1], text.shape[-1], "model.init")
        judge.config.reads = m.reads  # what it will score from now on (a noisy-latent judge is a fair start for x0)
        return judge.train().requires_grad_(True)
    return LatentStepJudge(LatentJudgeConfig(
        latent_channels=diffusion.initial_latents(1, torch.Generator()).shape[1], text_dim=text.shape[-1],
        text_tokens=text.shape[1], widths=list(m.widths), blocks_per_stage=m.blocks_per_stage, cond_dim=m.cond_dim,
        embed_dim=m.embed_dim, num_train_timesteps=diffusion.scheduler.config.num_train_timesteps,
        diffusion_model=m.diffusion_model, reads=m.reads))


def _pair_loss(judge, diffusion, pairs: EncodedPairs, tr):
    """Bradley–Terry on noised preference pairs: step(generator) -> (loss, batch accuracy)."""
    from spo.preference.train_spm import pickscore_loss

    device = next(judge.parameters()).device

    def step(gen):
        index = torch.randint(len(pairs), (min(tr.batch_size, len(pairs)),), generator=gen)
        t = torch.randint(tr.t_min, tr.t_max + 1, (len(index),), generator=gen)
        s0, s1 = pair_scores(judge, diffusion, pairs, index, t, gen)
        labels = pairs.labels[index].to(device)
        loss = pickscore_loss(s0, s1, labels, pairs.weights[index].to(device))
        decided = labels[:, 0] != 0.5
        correct = ((s0 > s1).float() == labels[:, 0])[decided].float().mean().item() if decided.any() else math.nan
        return loss, correct
    return step


def _distill_loss(judge, sets: CandidateSets, tr):
    """The teacher's scores within sibling sets: step(generator) -> (loss, share of sets with the teacher's best)."""
    device = next(judge.parameters()).device

    def step(gen):
        rows = torch.randint(len(sets), (min(tr.batch_size, len(sets)),), generator=gen)
        student, teacher = set_scores(judge, sets, rows), sets.scores[rows].to(device)
        same_best = (student.argmax(1) == teacher.argmax(1)).float().mean().item()
        return centred_score_loss(student, teacher), same_best
    return step


@torch.no_grad()
def _agreement(judge, sets: CandidateSets, threshold: float) -> dict:
    if not len(sets):
        return {}
    was_training = judge.training
    judge.eval()
    student = torch.cat([set_scores(judge, sets, rows).float().cpu()
                         for rows in torch.arange(len(sets)).split(256)])
    judge.train(was_training)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in set_agreement(student, sets.scores, threshold).items()}


def _optimise(judge, batch_loss, tr, log_every: int, metrics_path: Path, log) -> dict:
    """The training loop proper: draws from one seeded generator, so a run is reproducible."""
    gen = torch.Generator().manual_seed(tr.seed)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=tr.learning_rate, weight_decay=tr.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(tr.lr_warmup_steps, tr.max_steps))
    judge.train()
    window, last = [], {}
    with metrics_path.open("w") as f:
        for step in range(1, tr.max_steps + 1):
            loss, correct = batch_loss(gen)
            if not torch.isfinite(loss):
                raise SPOError(f"non-finite loss at step {step}; lower train.learning_rate")
            optimizer.zero_grad()
            loss.backward()
            if tr.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(judge.parameters(), tr.max_grad_norm)
            optimizer.step()
            schedule.step()
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
