"""DDIM as a Gaussian transition: against float64 hand computations and diffusers' DDIMScheduler.step."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from spo.sampling import ddim_schedule, ddim_transition, gaussian_log_prob, transition_log_ratio


def _scheduler(prediction_type="epsilon", steps=20):
    s = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    s.set_timesteps(steps)
    return s


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_mean_and_sample_match_diffusers_ddim_step(prediction_type, eta):
    sched = _scheduler(prediction_type)
    g = torch.Generator().manual_seed(0)
    for t in sched.timesteps[[0, 7, 19]].tolist():
        x_t = torch.randn(2, 4, 8, 8, generator=g)
        out = torch.randn(2, 4, 8, 8, generator=g)
        noise = torch.randn(2, 4, 8, 8, generator=g)
        mean, std, _ = ddim_transition(sched, out, torch.full((2,), t), torch.full((2,), t - 50), x_t, eta)
        ref_mean = sched.step(out, t, x_t, eta=0.0).prev_sample  # eta only adds noise; the mean is shared
        ref_sample = sched.step(out, t, x_t, eta=eta, variance_noise=noise).prev_sample
        if eta == 0.0:
            torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mean + std * noise, ref_sample, rtol=1e-5, atol=1e-5)


def test_transition_against_float64_hand_computation_with_per_sample_timesteps():
    sched = _scheduler()
    t = torch.tensor([951, 501, 1])
    g = torch.Generator().manual_seed(1)
    x_t, eps, x = (torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    mean, std, x0 = ddim_transition(sched, eps.float(), t, t - 50, x_t.float(), eta=1.0)
    ac = sched.alphas_cumprod.double()
    for i, ti in enumerate(t.tolist()):
        prev = ti - 50
        a_t = ac[ti]
        a_p = ac[prev] if prev >= 0 else sched.final_alpha_cumprod.double()
        x0_h = (x_t[i] - (1 - a_t).sqrt() * eps[i]) / a_t.sqrt()
        var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
        mean_h = a_p.sqrt() * x0_h + (1 - a_p - var).sqrt() * eps[i]
        torch.testing.assert_close(mean[i].double(), mean_h, rtol=1e-4, atol=1e-5)
        assert std[i].item() == pytest.approx(var.sqrt().item(), rel=1e-5)
        lp_h = (-(x[i] - mean_h) ** 2 / (2 * var) - 0.5 * torch.log(var) - 0.5 * math.log(2 * math.pi)).mean()
        assert gaussian_log_prob(x[i : i + 1], mean[i : i + 1], std[i : i + 1]).item() == pytest.approx(lp_h.item(), rel=1e-4)


def test_the_schedule_is_explicit_and_independent_of_the_schedulers_state():
    sched = _scheduler(steps=20)
    t, prev = ddim_schedule(sched, 20)
    assert t[[0, 10, 19]].tolist() == [951, 451, 1] and prev[[0, 10, 19]].tolist() == [901, 401, -49]
    sched.set_timesteps(5)  # whoever last set the scheduler's steps no longer decides the maths
    assert ddim_schedule(sched, 20)[1].tolist() == prev.tolist()
    assert sched.num_inference_steps == 5  # and the caller's scheduler is left as it was


def test_closed_form_log_ratio_equals_difference_of_log_probs():
    g = torch.Generator().manual_seed(2)
    x, mp, mr = (torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    std = torch.rand(4, 1, 1, 1, generator=g, dtype=torch.float64) + 0.1
    direct = gaussian_log_prob(x, mp, std).double() - gaussian_log_prob(x, mr, std).double()
    closed = transition_log_ratio(x, mp, mr, std).double()
    torch.testing.assert_close(closed, direct, rtol=1e-4, atol=1e-5)
