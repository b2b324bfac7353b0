"""The SPO loss: hand-worked values, log-space clipping, and finiteness at the last low-σ steps in fp16."""

import math

import pytest
import torch

from spo.methods.spo import spo_loss
from spo.sampling import ddim_transition, transition_log_ratio


def test_loss_matches_hand_computation_inside_the_clip_band():
    lw, ll = torch.tensor([0.05, -0.02]), torch.tensor([-0.03, 0.01])
    loss, margin = spo_loss(lw, ll, beta=10.0, eps=0.1)
    hand = (math.log1p(math.exp(-10 * 0.08)) + math.log1p(math.exp(-10 * -0.03))) / 2
    assert loss.item() == pytest.approx(hand, rel=1e-6)
    torch.testing.assert_close(margin, torch.tensor([0.8, -0.3]))


def test_clipping_is_in_log_space_and_stops_the_gradient_outside_the_band():
    lw = torch.tensor([5.0, 0.01], requires_grad=True)  # exp(5) far outside [0.9, 1.1]
    ll = torch.tensor([-5.0, 0.0], requires_grad=True)
    loss, _ = spo_loss(lw, ll, beta=10.0, eps=0.1)
    loss.backward()
    clipped = math.log(1.1) - math.log(0.9)
    expected = (math.log1p(math.exp(-10 * clipped)) + math.log1p(math.exp(-10 * 0.01))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert lw.grad[0].item() == 0.0 and ll.grad[0].item() == 0.0
    assert lw.grad[1].item() < 0 and ll.grad[1].item() > 0


def test_huge_log_ratios_give_finite_loss_and_gradients():
    lw = torch.tensor([1e4, -1e4, float(1e30)], requires_grad=True)
    ll = torch.tensor([-1e4, 1e4, 0.0], requires_grad=True)
    loss, _ = spo_loss(lw, ll, beta=10.0, eps=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lw.grad).all() and torch.isfinite(ll.grad).all()


def test_fp16_unet_outputs_at_the_final_steps_match_float64():
    from spo.world.architecture import scheduler

    sched = scheduler()
    sched.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([51, 1, 1, 51])  # the last, lowest-σ transitions
    x_t = torch.randn(4, 4, 8, 8, generator=g)
    out_ref = torch.randn(4, 4, 8, 8, generator=g)
    out_pol = (out_ref + 0.01 * torch.randn(4, 4, 8, 8, generator=g)).half().requires_grad_(True)
    mean_ref, std, _ = ddim_transition(sched, out_ref.half(), t, t - 50, x_t.half(), eta=1.0)
    mean_pol, _, _ = ddim_transition(sched, out_pol, t, t - 50, x_t.half(), eta=1.0)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    x_w, x_l = mean_ref[:2] + std[:2] * noise, mean_ref[2:] + std[2:] * noise.flip(0)
    lw = transition_log_ratio(x_w, mean_pol[:2], mean_ref[:2], std[:2])
    ll = transition_log_ratio(x_l, mean_pol[2:], mean_ref[2:], std[2:])
    loss, _ = spo_loss(lw, ll, beta=10.0, eps=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(out_pol.grad.float()).all()

    # the same computation in float64 from the same (fp16-rounded) inputs
    pol64 = out_pol.detach().double().requires_grad_(True)
    m_ref64, std64, _ = ddim_transition(sched, out_ref.half().double(), t, t - 50, x_t.half().double(), eta=1.0)
    m_pol64, _, _ = ddim_transition(sched, pol64, t, t - 50, x_t.half().double(), eta=1.0)
    assert m_pol64.dtype == torch.float64
    lw64 = transition_log_ratio(x_w.double(), m_pol64[:2], m_ref64[:2], std64[:2])
    ll64 = transition_log_ratio(x_l.double(), m_pol64[2:], m_ref64[2:], std64[2:])
    loss64, _ = spo_loss(lw64, ll64, beta=10.0, eps=0.1)
    loss64.backward()
    assert loss.item() == pytest.approx(loss64.item(), rel=1e-4)
    torch.testing.assert_close(lw.double(), lw64.detach(), rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(out_pol.grad.double(), pol64.grad, rtol=1e-2, atol=1e-4)
