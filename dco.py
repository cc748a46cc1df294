"""The noise schedule and the losses of DCO, each a short pure function.

Paper: Lee, Kwak, Sohn, Shin, "Direct Consistency Optimization for Robust Customization of Text-to-Image
Diffusion Models", NeurIPS 2024 (arXiv 2402.12004). Notation follows the paper: x_0 a (latent) image, c its
caption, eps ~ N(0, I) the noise, t ~ U{0..999}, eps_theta the model being fine-tuned (UNet + LoRA), eps_phi the
frozen pretrained model (the same UNet with LoRA scale 0).

DreamBooth / plain fine-tuning minimises the diffusion loss
    l_theta = || eps_theta(x_t, c, t) - eps ||^2.                                                  (DB)
DCO instead minimises (paper, Sec. 3)
    L_DCO = -log sigmoid( -beta * ( l_theta - l_phi ) ),   l_phi = || eps_phi(x_t, c_base, t) - eps ||^2,
i.e. theta is rewarded only for how much it *beats* the pretrained model on the same noisy input. phi reads the
caption in words it knows: c_base is c with each learned token replaced by its init word ("a photo of <dog>" ->
"a photo of dog"); without a learned token c_base = c. The loss is
the Diffusion-DPO / reward-model form with the pretrained model as the reference: the implicit reward
r = l_phi - l_theta is pushed up, but the log-sigmoid saturates once theta is clearly better, so there is no
incentive to drift further from phi than the concept needs -- that is the "consistency" of the title.
"""
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------
# DDPM noise schedule (Ho et al. 2020): SDXL's "scaled_linear" betas, and what fine-tunes' scheduler configs change


def scaled_linear_betas(beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000):
    """SDXL's betas: linear in sqrt-space (Stability calls it "linear", diffusers "scaled_linear")."""
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2


def zero_terminal_snr(alphas_cumprod):
    """Lin, Liu, Li, Yang 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1: shift
    sqrt(alpha_bar) so that the last one is 0, and scale it so that the first one is unchanged.

    Why: SDXL's alpha_bar_999 = 0.0047 leaves 7% of the image in x_999, so training never shows the model pure noise,
    yet sampling starts from pure noise (the model then cannot make a very dark or bright image). After the rescale
    x_999 is pure noise: SNR_999 = 0. (The paper goes back to betas; only alpha_bar is needed here.)"""
    s = alphas_cumprod.sqrt()
    s = (s - s[-1]) * s[0] / (s[0] - s[-1])
    return s ** 2


def check_scheduler_config(cfg):
    """Refuse, in one line naming the field, what this code would otherwise get silently wrong in training and in
    both samplers (sample.check_sampler_config adds what only sampling uses)."""
    schedule, prediction = cfg.get("beta_schedule", "scaled_linear"), cfg.get("prediction_type", "epsilon")
    if schedule not in ("scaled_linear", "linear") or cfg.get("trained_betas"):
        what = "trained_betas" if cfg.get("trained_betas") else f"beta_schedule {schedule!r}"
        raise ValueError(f"scheduler config: {what} is not supported; SDXL bases use beta_schedule scaled_linear "
                         "(or linear)")
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(f"scheduler config: prediction_type {prediction!r} is not supported; use epsilon or "
                         "v_prediction")
    if cfg.get("rescale_betas_zero_snr") and prediction == "epsilon":
        # At SNR 0 the input x_T holds no image and equals eps: an eps-model's x_0 = (x_T - eps) / 0 is undefined
        # (Lin et al. 2023, Sec. 3.2: zero terminal SNR needs v-prediction).
        raise ValueError("scheduler config: rescale_betas_zero_snr true needs prediction_type v_prediction (at zero "
                         "SNR an epsilon model cannot recover x_0 from pure noise); correct whichever is wrong")


def alphas_cumprod(scheduler_config=None):
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), from a scheduler_config.json dict (SDXL's values by default):
    beta_schedule scaled_linear or linear, and rescale_betas_zero_snr (then alpha_bar_999 = 0 exactly).

    Computed in float64 and returned as float32: 1000 products in fp32 drift by ~1e-6.
    """
    cfg = scheduler_config or {}
    check_scheduler_config(cfg)
    start, end, T = cfg.get("beta_start", 0.00085), cfg.get("beta_end", 0.012), cfg.get("num_train_timesteps", 1000)
    if cfg.get("beta_schedule", "scaled_linear") == "scaled_linear":
        betas = scaled_linear_betas(start, end, T)
    else:
        betas = torch.linspace(start, end, T, dtype=torch.float64)
    abar = torch.cumprod(1.0 - betas, dim=0)
    if cfg.get("rescale_betas_zero_snr"):
        abar = zero_terminal_snr(abar)
    return abar.float()


def _at(values, t, x):
    """values[t] shaped to broadcast against x ([B] -> [B,1,1,1])."""
    return values.to(x.device)[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


def add_noise(x0, eps, t, alphas_cumprod):
    """Forward process q(x_t | x_0): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps  (DDPM Eq. 4)."""
    a = _at(alphas_cumprod, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def snr(t, alphas_cumprod):
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) (Kingma et al. 2021)."""
    a = alphas_cumprod.to(t.device)[t]
    return a / (1 - a)


def sample_timesteps(batch_size, num_train_timesteps=1000, device="cpu", generator=None):
    """t ~ U{0, ..., T-1}, one per sample."""
    return torch.randint(0, num_train_timesteps, (batch_size,), device=device, generator=generator)


def sample_noise(like, offset_noise=0.0, generator=None):
    """eps ~ N(0, I), plus optional offset noise (a per-channel constant, Guttenberg 2023) that lets the model
    learn very dark or bright images; 0 disables it."""
    eps = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    if offset_noise:
        eps = eps + offset_noise * torch.randn(*like.shape[:2], 1, 1, generator=generator, device=like.device,
                                               dtype=like.dtype)
    return eps


def training_target(x0, eps, t, alphas_cumprod, prediction_type="epsilon"):
    """What the UNet learns to predict from x_t: the noise eps, or for a v-prediction base (prediction_type
    v_prediction) the velocity v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022, Sec. 4).
    v stays a useful target at SNR 0, where x_t = eps and predicting eps would be trivial. The losses below only
    compare a prediction with its target, so DCO and DreamBooth on a v-model compare v's."""
    if prediction_type == "epsilon":
        return eps
    a = _at(alphas_cumprod, t, x0)
    return a.sqrt() * eps - (1 - a).sqrt() * x0


def min_snr_weights(t, alphas_cumprod, gamma=5.0, prediction_type="epsilon"):
    """Min-SNR-gamma loss weights (Hang et al. 2023): weigh each step's error as an x_0 error times min(SNR_t, gamma),
    which down-weights the easy low-noise steps that otherwise dominate the gradient.
    An eps error is an x_0 error times SNR (x_0 - x0_hat = (eps_hat - eps) / sqrt(SNR)): weight min(SNR, gamma) / SNR.
    A v error is an x_0 error times SNR + 1 (x_0 - x0_hat = sqrt(1 - abar) (v_hat - v)): min(SNR, gamma) / (SNR + 1).
    (The official code, kyungmnlee/dco@164ae17 customize.py:956-962, has an older diffusers script's v weight
    min(SNR, gamma) / SNR + 1: the same for the epsilon SDXL the paper trains, NaN at zero terminal SNR.)"""
    s = snr(t, alphas_cumprod)
    return torch.clamp(s, max=gamma) / (s + 1 if prediction_type == "v_prediction" else s)


# ----------------------------------------------------------------------------------------------------------
# Losses. "||.||^2" is the mean over the latent's elements (an MSE), as the official code (kyungmnlee/dco@164ae17
# customize.py:937-938): it is what makes the paper's beta = 1000 the right scale.


def per_sample_mse(pred, target):
    """||pred - target||^2 per sample, averaged over all but the batch dimension, in fp32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def diffusion_loss(eps_pred, eps, weights=None):
    """The DreamBooth / LoRA fine-tuning loss (DB): E ||eps_theta(x_t, c, t) - eps||^2, optionally weighted."""
    loss = per_sample_mse(eps_pred, eps)
    return (loss * weights).mean() if weights is not None else loss.mean()


def prior_preservation_loss(eps_pred, eps, eps_pred_prior, eps_prior, prior_weight=1.0, weights=None):
    """DreamBooth with prior preservation (Ruiz et al. 2023, Eq. 2): the instance loss plus lambda times the same
    loss on images of the class that the *base* model generated, so the class word keeps its meaning."""
    return diffusion_loss(eps_pred, eps, weights) + prior_weight * diffusion_loss(eps_pred_prior, eps_prior)


def dco_loss(eps_theta, eps_phi, eps, beta=1000.0, weights=None):
    """The DCO loss (paper, Sec. 3): L = -log sigmoid(beta * r), r = l_phi - l_theta, averaged over the batch.

    eps_theta: the fine-tuned model's prediction (with grad); eps_phi: the frozen pretrained model's on the same x_t
    and t with the base prompt c_base (no grad); eps: the noise that made x_t. weights: optional per-sample weights
    (min-SNR) on both errors. Returns (loss, r): r per sample, detached, is the implicit reward -- how much better than
    the pretrained model theta denoises (> 0: it has learned something phi did not know).

    Why it preserves the base model: dL/dl_theta = beta * sigmoid(-beta * r). At the start (theta = phi, r = 0) that
    is beta/2, a scaled DreamBooth gradient; once theta beats phi by a few 1/beta it decays exponentially, so fitting
    stops short of overwriting what phi knows. (The official code, kyungmnlee/dco@164ae17 customize.py:936-941,
    averages the errors over the batch before its one log-sigmoid: the same for batch size 1, tests/test_dco.py.)"""
    l_theta = per_sample_mse(eps_theta, eps)
    l_phi = per_sample_mse(eps_phi, eps).detach()
    if weights is not None:
        l_theta, l_phi = l_theta * weights, l_phi * weights
    reward = l_phi - l_theta
    return -F.logsigmoid(beta * reward).mean(), reward.detach()


def relative_dco_loss(eps_theta, eps_phi, eps, beta=3.0):
    """DCO with the relative reward (not the paper's; `train.py --relative-reward`): L = -log sigmoid(beta * r / l_phi).
    Weights would cancel in r / l_phi, so there are none (train.py refuses --snr-gamma with it)."""
    l_theta = per_sample_mse(eps_theta, eps)
    l_phi = per_sample_mse(eps_phi, eps).detach()
    reward = relative_reward(l_theta, l_phi)
    return -F.logsigmoid(beta * reward).mean(), reward.detach()


def relative_reward(l_theta, l_phi):
    """r / l_phi = (l_phi - l_theta) / l_phi: theta's improvement over phi as a fraction of phi's own error.

    Why (the tiny world's follow-up, docs/tinyworld_experiments.md): DCO's gradient on l_theta is
    beta sigmoid(-beta r), so one beta asks for the same *absolute* improvement r at every timestep. But an
    eps-prediction error is much larger at low noise (small t: the noise is hard to tell from the image's detail)
    than at high noise (x_t is nearly eps itself), so the low-noise steps, where a subject's detail is learned,
    saturate first (docs/tinyworld_saturation.csv: at beta 30, 5% of the gradient left below t = 250, 95% above
    t = 750). Dividing by l_phi makes the reward scale-free: d L / d l_theta = (beta / l_phi) sigmoid(-beta r / l_phi),
    i.e. plain DCO with a per-sample beta_i = beta / l_phi,i, and beta becomes a relative tolerance ("stop once theta is
    a few 1/beta *fractions* better than phi") that means the same at every timestep and on every model. l_phi is
    phi's error, detached: the division only rescales theta's gradient. At theta = phi it is 0 (the loss is log 2)."""
    return (l_phi - l_theta) / l_phi.clamp_min(torch.finfo(l_phi.dtype).tiny)

