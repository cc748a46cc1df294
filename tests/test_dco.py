"""dco.py: the schedule against diffusers' DDPMScheduler (oracle), and math identities of the losses."""
import math

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

import dco

SCHED = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def test_schedule_matches_diffusers_and_known_values():
    ours = dco.alphas_cumprod(SCHED)
    ref = DDPMScheduler(**SCHED).alphas_cumprod
    assert (ours - ref).abs().max() < 1e-6
    assert abs(ours[0].item() - 0.99915) < 1e-6 and abs(ours[999].item() - 0.0046601) < 1e-6
    sigma = ((1 - ours) / ours).sqrt()
    assert abs(sigma[999].item() - 14.6146) < 1e-3 and abs(sigma[0].item() - 0.029168) < 1e-5


def test_add_noise_and_snr_match_diffusers():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    sched = DDPMScheduler(**SCHED)
    ac = dco.alphas_cumprod(SCHED)
    assert (dco.add_noise(x0, eps, t, ac) - sched.add_noise(x0, eps, t)).abs().max() < 1e-5
    assert torch.allclose(dco.snr(t, ac), compute_snr(sched, t), rtol=1e-5)
    w = dco.min_snr_weights(t, ac, gamma=5.0)
    assert torch.allclose(w, torch.clamp(compute_snr(sched, t), max=5.0) / compute_snr(sched, t), rtol=1e-5)


def test_unsupported_schedule_is_refused():
    try:
        dco.alphas_cumprod({"beta_schedule": "squaredcos_cap_v2"})
    except ValueError as e:
        assert "scaled_linear" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_offset_noise_is_a_per_channel_constant():
    like = torch.zeros(2, 4, 8, 8)
    a = dco.sample_noise(like, 0.0, torch.Generator().manual_seed(1))
    b = dco.sample_noise(like, 0.1, torch.Generator().manual_seed(1))
    diff = b - a
    assert diff.abs().max() > 0 and torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff), atol=1e-6)


def _preds(seed=0, b=4):
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(b, 4, 8, 8, generator=g)
    return eps + 0.1 * torch.randn(b, 4, 8, 8, generator=g), eps + 0.1 * torch.randn(b, 4, 8, 8, generator=g), eps


def official_batch_dco_loss(eps_theta, eps_phi, eps, beta):
    """The official code's reduction (kyungmnlee/dco@164ae17 customize.py:936-941): the errors averaged over the batch
    first, then one log-sigmoid. Kept here, beside the tests that compare it with dco.dco_loss's per-sample form."""
    l_theta = dco.per_sample_mse(eps_theta, eps).mean()
    l_phi = dco.per_sample_mse(eps_phi, eps).detach().mean()
    return -torch.nn.functional.logsigmoid(beta * (l_phi - l_theta))


def test_dco_loss_is_log2_and_reward_zero_when_theta_equals_phi():
    eps_theta, _, eps = _preds()
    loss, reward = dco.dco_loss(eps_theta, eps_theta.clone(), eps, beta=1000.0)
    assert abs(loss.item() - math.log(2)) < 1e-6 and reward.abs().max() == 0


def test_dco_loss_formula_per_sample_and_batch():
    eps_theta, eps_phi, eps = _preds()
    beta = 1000.0
    l_t = ((eps_theta - eps) ** 2).mean(dim=(1, 2, 3))
    l_p = ((eps_phi - eps) ** 2).mean(dim=(1, 2, 3))
    loss, reward = dco.dco_loss(eps_theta, eps_phi, eps, beta)
    expected = torch.stack([-torch.log(torch.sigmoid(-beta * (a - b))) for a, b in zip(l_t, l_p)]).mean()
    assert torch.allclose(loss, expected, rtol=1e-5) and torch.allclose(reward, l_p - l_t)
    loss_b = official_batch_dco_loss(eps_theta, eps_phi, eps, beta)
    assert torch.allclose(loss_b, -torch.log(torch.sigmoid(-beta * (l_t.mean() - l_p.mean()))), rtol=1e-5)
    assert not torch.allclose(loss, loss_b)  # the two reductions really differ for batch > 1 ...
    one = [x[:1] for x in (eps_theta, eps_phi, eps)]  # ... and agree for batch 1
    assert torch.allclose(dco.dco_loss(*one, beta)[0], official_batch_dco_loss(*one, beta))


def test_dco_gradient_starts_as_scaled_dreambooth_and_saturates():
    """At theta = phi, dL_DCO/d eps_theta = beta/2 * dL_DB/d eps_theta (sigmoid(0) = 1/2) for one sample;
    once theta is much better than phi the gradient vanishes (the loss saturates)."""
    eps_theta, _, eps = _preds(b=1)
    beta = 10.0
    x = eps_theta.clone().requires_grad_()
    dco.dco_loss(x, eps_theta.clone(), eps, beta)[0].backward()
    y = eps_theta.clone().requires_grad_()
    dco.diffusion_loss(y, eps).backward()
    assert torch.allclose(x.grad, beta / 2 * y.grad, rtol=1e-5, atol=1e-9)
    z = eps.clone().requires_grad_()  # theta perfect, phi far off
    loss, reward = dco.dco_loss(z + 1e-3, eps + 1.0, eps, beta=1000.0)
    loss.backward()
    assert loss.item() < 1e-6 and reward.item() > 0.9 and z.grad.abs().max() < 1e-6


def test_dco_gradient_never_touches_phi():
    eps_theta, eps_phi, eps = _preds()
    p = eps_phi.clone().requires_grad_()
    loss, _ = dco.dco_loss(eps_theta, p, eps)
    assert not loss.requires_grad  # l_phi is detached: the frozen model is only a reference


def test_prior_preservation_adds_weighted_class_term():
    a, b, eps = _preds()
    inst = dco.diffusion_loss(a, eps)
    cls = dco.diffusion_loss(b, eps)
    assert torch.allclose(dco.prior_preservation_loss(a, eps, b, eps, prior_weight=0.5), inst + 0.5 * cls)
    assert torch.allclose(dco.diffusion_loss(a, eps), torch.nn.functional.mse_loss(a, eps))


def test_add_noise_and_snr_match_diffusers_at_every_step():
    """All 1000 training timesteps at once, one sample per t, against DDPMScheduler (the oracle)."""
    sched = DDPMScheduler(**SCHED)
    ac = dco.alphas_cumprod(SCHED)
    t = torch.arange(1000)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(1000, 4, 2, 2, generator=g), torch.randn(1000, 4, 2, 2, generator=g)
    diff = (dco.add_noise(x0, eps, t, ac) - sched.add_noise(x0, eps, t)).abs().max().item()
    rel = ((dco.snr(t, ac) - compute_snr(sched, t)) / compute_snr(sched, t)).abs().max().item()
    print(f"1000 steps: add_noise max abs diff {diff:.3g}, SNR max rel diff {rel:.3g}")
    # SNR = abar / (1 - abar): near t = 0, abar ~ 0.999 holds only ~5 digits of 1 - abar in float32 (one ulp of
    # abar is 6e-8 of 1 - abar ~ 3e-3), so both libraries sit ~2e-5 (relative) from the float64 value there.
    assert diff <= 1e-5 and rel <= 5e-5
    assert dco.snr(t, ac)[0] > 1000 and dco.snr(t, ac)[-1] < 5e-3  # the range really was covered


def test_dco_loss_on_hand_made_tensors():
    """Numbers small enough to check by hand: l_theta = 1, l_phi = 1/4, beta = 2 -> log(1 + e^{3/2});
    second sample l_theta = 0, l_phi = 1 -> log(1 + e^{-2})."""
    eps = torch.zeros(2, 1, 2, 2)
    eps_theta = torch.stack([torch.ones(1, 2, 2), torch.zeros(1, 2, 2)])
    eps_phi = torch.stack([torch.full((1, 2, 2), 0.5), torch.tensor([[[1.0, -1.0], [1.0, -1.0]]])])
    loss, reward = dco.dco_loss(eps_theta, eps_phi, eps, beta=2.0)
    per_sample = [math.log(1 + math.exp(1.5)), math.log(1 + math.exp(-2.0))]
    assert abs(loss.item() - sum(per_sample) / 2) < 1e-6
    assert torch.allclose(reward, torch.tensor([-0.75, 1.0]))
    loss_b = official_batch_dco_loss(eps_theta, eps_phi, eps, beta=2.0)  # mean errors 1/2 and 5/8
    assert abs(loss_b.item() - math.log(1 + math.exp(2.0 * (0.5 - 0.625)))) < 1e-6
    w = torch.tensor([2.0, 0.5])  # per-sample weights scale both errors
    loss_w, _ = dco.dco_loss(eps_theta, eps_phi, eps, beta=2.0, weights=w)
    assert abs(loss_w.item() - (math.log(1 + math.exp(3.0)) + math.log(1 + math.exp(-1.0))) / 2) < 1e-6


def test_dco_gradient_is_half_beta_dreambooth_for_a_batch():
    """theta = phi for every sample of a batch of 4: per-sample reduction -> exactly beta/2 times the gradient of
    the plain diffusion loss; the batch reduction too (one sigmoid(0) = 1/2 for the mean errors)."""
    eps_theta, _, eps = _preds(seed=3, b=4)
    beta = 1000.0
    y = eps_theta.clone().requires_grad_()
    dco.diffusion_loss(y, eps).backward()
    for reduction, loss_fn in (("sample", lambda *a: dco.dco_loss(*a)[0]), ("batch", official_batch_dco_loss)):
        x = eps_theta.clone().requires_grad_()
        loss = loss_fn(x, eps_theta.clone(), eps, beta)
        assert abs(loss.item() - math.log(2)) < 1e-6
        loss.backward()
        rel = ((x.grad - beta / 2 * y.grad).abs().max() / y.grad.abs().max()).item()
        print(f"{reduction}: |grad DCO - beta/2 grad DB| / |grad DB| = {rel:.3g}")
        assert rel <= 1e-5


# ----------------------------------------------------------------------------------------------------------
# Fine-tunes' schedules: linear betas, zero terminal SNR, v-prediction, min-SNR weights


def test_linear_and_zero_terminal_snr_schedules_match_diffusers():
    for fields in ({"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
                   {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}):
        cfg = {**SCHED, **fields}
        ours, ref = dco.alphas_cumprod(cfg), DDPMScheduler(**cfg).alphas_cumprod
        print(f"{fields}: alpha_bar max abs diff {(ours - ref).abs().max():.3g}")
        assert (ours - ref).abs().max() < 1e-6
    zero = dco.alphas_cumprod({**SCHED, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"})
    plain = dco.alphas_cumprod(SCHED)
    assert zero[-1] == 0 and zero[0] == plain[0] and (zero[1:] < plain[1:]).all()  # Lin et al. Alg. 1


def test_v_target_matches_diffusers_and_rotates_back():
    """v = sqrt(abar) eps - sqrt(1 - abar) x_0 against DDPMScheduler.get_velocity, for every t; and
    sample.x0_and_eps recovers (x_0, eps) from (x_t, v) exactly, at abar = 0 too."""
    from sample import x0_and_eps

    g = torch.Generator().manual_seed(2)
    t = torch.arange(1000)
    x0, eps = torch.randn(1000, 4, 2, 2, generator=g), torch.randn(1000, 4, 2, 2, generator=g)
    for cfg in (SCHED, {**SCHED, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}):
        ac = dco.alphas_cumprod(cfg)
        v = dco.training_target(x0, eps, t, ac, "v_prediction")
        assert (v - DDPMScheduler(**cfg).get_velocity(x0, eps, t)).abs().max() < 1e-5
        xt = dco.add_noise(x0, eps, t, ac)
        for i in (0, 500, 999):
            got_x0, got_eps = x0_and_eps(v[i], xt[i], ac[i].item(), "v_prediction")
            assert (got_x0 - x0[i]).abs().max() < 1e-5 and (got_eps - eps[i]).abs().max() < 1e-5
    assert dco.training_target(x0, eps, t, ac) is eps  # epsilon prediction: the noise itself, untouched


def test_min_snr_weights_weigh_the_x0_error_by_min_snr_gamma():
    """Hang et al. 2023 weigh the x_0 error by min(SNR, gamma). The weights for an eps or a v error are whatever
    makes weight * ||pred - target||^2 equal min(SNR, gamma) * ||x0_hat - x_0||^2, for any prediction."""
    from sample import x0_and_eps

    g = torch.Generator().manual_seed(3)
    t = torch.tensor([1, 50, 300, 700, 999])
    x0, eps = torch.randn(5, 4, 4, 4, generator=g), torch.randn(5, 4, 4, 4, generator=g)
    ac = dco.alphas_cumprod(SCHED)
    xt = dco.add_noise(x0, eps, t, ac)
    s = dco.snr(t, ac)
    for prediction in ("epsilon", "v_prediction"):
        target = dco.training_target(x0, eps, t, ac, prediction)
        pred = target + 0.1 * torch.randn(target.shape, generator=g)
        w = dco.min_snr_weights(t, ac, 5.0, prediction)
        x0_err = torch.stack([(x0_and_eps(pred[i], xt[i], ac[t[i]].item(), prediction)[0] - x0[i]).pow(2).mean()
                              for i in range(5)])
        assert torch.allclose(w * dco.per_sample_mse(pred, target), s.clamp(max=5.0) * x0_err, rtol=1e-3)
    assert torch.allclose(dco.min_snr_weights(t, ac, 5.0, "v_prediction"), s.clamp(max=5) / (s + 1))


def test_weights_multiply_a_zero_gap():
    """--snr-gamma in DCO: theta = phi still gives exactly log 2 (both errors get the same weight)."""
    eps_theta, _, eps = _preds()
    loss, _ = dco.dco_loss(eps_theta, eps_theta.clone(), eps, weights=torch.tensor([0.1, 1.0, 5.0, 0.0]))
    assert loss.item() == torch.tensor(math.log(2.0)).item()


def test_relative_reward_is_dco_with_a_per_sample_beta_over_l_phi():
    """The follow-up's variant: -log sigmoid(beta (l_phi - l_theta) / l_phi). Its loss and gradient equal plain DCO's
    with beta_i = beta / l_phi,i per sample (the identity that motivates it: a timestep-adaptive beta); it is log 2 at
    theta = phi with a gradient beta / (2 l_phi) times DreamBooth's; and it is invariant to scaling both errors (eps,
    eps_theta, eps_phi all times k), which the absolute reward is not."""
    eps_theta, eps_phi, eps = _preds(seed=5, b=4)
    eps_phi = eps + (eps_phi - eps) * torch.tensor([0.5, 1.0, 2.0, 4.0]).view(4, 1, 1, 1)  # l_phi differs per sample
    beta = 3.0
    l_phi = ((eps_phi - eps) ** 2).mean(dim=(1, 2, 3))
    x, y = eps_theta.clone().requires_grad_(), eps_theta.clone().requires_grad_()
    rel, r_rel = dco.relative_dco_loss(x, eps_phi, eps, beta)
    ref, r_abs = dco.dco_loss(y, eps_phi, eps, beta / l_phi)
    rel.backward()
    ref.backward()
    assert torch.allclose(rel, ref, rtol=1e-6) and torch.allclose(x.grad, y.grad, rtol=1e-5, atol=1e-12)
    assert torch.allclose(r_rel, r_abs / l_phi, rtol=1e-6)
    k = 10.0  # scale-free: the same loss when every error is k^2 times larger
    assert torch.allclose(dco.relative_dco_loss(k * eps_theta, k * eps_phi, k * eps, beta)[0], rel, rtol=1e-5)
    assert not torch.allclose(dco.dco_loss(k * eps_theta, k * eps_phi, k * eps, beta)[0], ref, rtol=1e-2)
    one = eps_theta[:1].clone().requires_grad_()  # theta = phi: log 2, gradient beta / (2 l_phi) x DreamBooth's
    loss, r = dco.relative_dco_loss(one, eps_theta[:1].clone(), eps[:1], beta)
    loss.backward()
    db = eps_theta[:1].clone().requires_grad_()
    dco.diffusion_loss(db, eps[:1]).backward()
    l0 = ((eps_theta[:1] - eps[:1]) ** 2).mean()
    assert abs(loss.item() - math.log(2)) < 1e-6 and r.abs().max() == 0
    assert torch.allclose(one.grad, beta / (2 * l0) * db.grad, rtol=1e-5, atol=1e-12)


def test_dco_loss_is_the_papers_line_bit_for_bit():
    """dco_loss is -log sigmoid(beta (l_phi - l_theta)) averaged over the batch, exactly (no other arithmetic)."""
    eps_theta, eps_phi, eps = _preds(seed=6)
    l_t = ((eps_theta - eps) ** 2).mean(dim=(1, 2, 3))
    l_p = ((eps_phi - eps) ** 2).mean(dim=(1, 2, 3))
    loss, _ = dco.dco_loss(eps_theta, eps_phi, eps, 30.0)
    assert torch.equal(loss, -torch.nn.functional.logsigmoid(30.0 * (l_p - l_t)).mean())


def test_relative_dco_loss_is_dco_on_the_relative_reward():
    eps_theta, eps_phi, eps = _preds(seed=7)
    a, ra = dco.relative_dco_loss(eps_theta, eps_phi, eps, 3.0)
    l_t, l_p = dco.per_sample_mse(eps_theta, eps), dco.per_sample_mse(eps_phi, eps)
    assert torch.equal(ra, dco.relative_reward(l_t, l_p))
    assert torch.equal(a, -torch.nn.functional.logsigmoid(3.0 * ra).mean())
