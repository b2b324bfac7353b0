"""The Diffusion-DPO baseline (Wallace et al. 2023): offline DPO on preference pairs of final images.

For a pair (winner, loser) of clean latents, one random t and one noise draw shared by both: the
loss asks the policy to denoise the winner better, and the loser worse, than the frozen reference:

    −log σ(−β/2 · [(‖ε_θ(x_t^w) − ε‖² − ‖ε_ref(x_t^w) − ε‖²) − (‖ε_θ(x_t^l) − ε‖² − ‖ε_ref(x_t^l) − ε‖²)])

with ‖·‖² the per-sample mean squared error, as in the authors' training script. The label is the
final image's preference, applied at whatever t was drawn — the contrast SPO's step-wise labels make.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def per_sample_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output.float() - target.float()).pow(2).flatten(1).mean(1)


def diffusion_dpo_loss(policy_err_win, policy_err_lose, ref_err_win, ref_err_lose, beta: float):
    """Mean loss, and the per-pair implicit reward margin (> 0 when the policy prefers the winner)."""
    margin = -0.5 * beta * ((policy_err_win - ref_err_win) - (policy_err_lose - ref_err_lose))
    return -F.logsigmoid(margin).mean(), margin.detach()


def cycled_order(n_items: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """n indices into n_items: whole shuffled passes, then part of one more."""
    passes = [torch.randperm(n_items, generator=generator) for _ in range(-(-n // n_items))]
    return torch.cat(passes)[:n]


class DiffusionDPO:
    """The Diffusion-DPO baseline: offline preference pairs (`dpo.*`), one random t per pair."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._stats = {}

    def load_data(self, trainer) -> None:
        from spo.errors import SPOError
        from spo.plugins import resolve
        from spo.preference.data import load_preference_dataset

        d = self.cfg.dpo
        data = load_preference_dataset(resolve(d.dataset), d.split)
        # Diffusion-DPO learns from strict preferences only; ties are dropped as in the authors' script.
        self.pairs_data = data.filter(lambda a, b: a != b, input_columns=["label_0", "label_1"])
        trainer.dataset_size = len(self.pairs_data)
        trainer.log(f"[diffusion-dpo] {len(self.pairs_data)} pairs with a strict preference "
                    f"({len(data) - len(self.pairs_data)} ties dropped)")
        if len(self.pairs_data) == 0:
            raise SPOError(f"no strictly preferred pairs in {d.dataset} ({d.split})")

    def load_models(self, trainer) -> None:
        pass

    def batches(self, trainer, epoch: int, start: int = 0):
        """`dpo.pairs_per_epoch` offline pairs, the same order on every process, each taking its share."""
        from spo.methods.base import SafePoint
        from spo.preference.data import PairCollator
        from spo.runtime import stream

        cfg, acc, d = self.cfg, trainer.acc, trainer.diffusion
        collate = PairCollator(d.resolution)
        order = cycled_order(len(self.pairs_data), cfg.dpo.pairs_per_epoch, stream(cfg.train.seed, epoch, 0, "dpo_order"))
        mine = order[acc.process_index :: acc.num_processes].tolist()
        if start == 0:
            self._stats = dict(pairs_trained=0)
        t0 = time.time()
        starts = range(0, len(mine), cfg.train.batch_size)
        for k in range(start, len(starts)):
            batch = collate([self.pairs_data[i] for i in mine[starts[k] : starts[k] + cfg.train.batch_size]])
            if batch is not None:
                first_wins = (batch["labels"][:, 0] > 0.5)[:, None, None, None]
                win = torch.where(first_wins, batch["img0"], batch["img1"])
                lose = torch.where(first_wins, batch["img1"], batch["img0"])
                gen = stream(cfg.train.seed, epoch, acc.process_index, "dpo_noise", k)
                yield self._noised_pair_batch(d, win, lose, batch["captions"], gen)
                self._stats["pairs_trained"] += len(win)
            yield SafePoint(k + 1)
        self._stats.update(pairs_per_s=self._stats["pairs_trained"] / max(time.time() - t0, 1e-9),
                           data={k: v for k, v in collate.report.summary().items() if k != "pairs used"})

    @staticmethod
    def _noised_pair_batch(d, win, lose, captions, gen):
        """Winner and loser latents noised with one shared noise and t per pair, their targets and prompts."""
        n = len(captions)
        latents = d.encode_images(torch.cat([win, lose]))
        noise = torch.randn(latents[:n].shape, generator=gen).to(latents).repeat(2, 1, 1, 1)  # shared by the pair
        t = torch.randint(0, d.scheduler.config.num_train_timesteps, (n,), generator=gen).repeat(2).to(latents.device)
        x_t = d.noised(latents, noise, t)
        target = d.training_target(latents, noise, t)
        cond, _ = d.encode_prompts(captions + captions)
        return x_t, t, target, cond, n

    def loss(self, trainer, batch):
        x_t, t, target, cond, n = batch
        g = trainer.diffusion.regression_guidance(self.cfg.sample.guidance_scale)
        err_ref = per_sample_mse(trainer.reference_output(x_t, t, cond, cond, guidance=g), target)
        err_pol = per_sample_mse(trainer.diffusion.guided_output(x_t, t, cond, cond, g, model=trainer.unet), target)
        loss, margin = diffusion_dpo_loss(err_pol[:n], err_pol[n:], err_ref[:n], err_ref[n:], self.cfg.dpo.beta)
        return loss, dict(reward_accuracy=(margin > 0).float().mean().item(), margin=margin.mean().item())

    def epoch_metrics(self) -> dict:
        return dict(self._stats)

    def progress_state(self) -> dict:
        return dict(self._stats)

    def restore_progress(self, state: dict) -> None:
        self._stats = dict(state)
