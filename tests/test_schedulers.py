"""What SDXL fine-tunes put in scheduler/scheduler_config.json, honoured: timestep_spacing (leading, trailing,
linspace), steps_offset, rescale_betas_zero_snr and prediction_type v_prediction, plus guidance_rescale. Each setting
is written into a copy of the tiny random SDXL's folder and sampled by us and by diffusers' StableDiffusionXLPipeline
with EulerDiscreteScheduler / DDIMScheduler read from that same folder, same seed: latents and decoded images are
compared. Training a v-prediction base: the target is v, DCO starts at log 2, --snr-gamma weighs both errors.
Unsupported fields are refused in one line that names them. CPU, fp32."""
import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dco
import sample
import train
from sdxl import load_sdxl

SDXL_SCHEDULER = Path(__file__).parent / "data" / "sdxl" / "scheduler" / "scheduler_config.json"
H, W = 64, 96
PROMPT = "a photo of a dog on the beach"
V_PRED = {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "rescale_betas_zero_snr": True}
LOG2 = torch.tensor(math.log(2.0)).item()  # -log sigmoid(0) in float32


@pytest.fixture(scope="module")
def variant(tiny_sdxl, tmp_path_factory):
    """variant(**fields) -> a copy of the tiny SDXL folder whose scheduler_config.json has `fields` changed."""
    made = {}

    def make(**fields):
        key = json.dumps(fields, sort_keys=True)
        if key not in made:
            folder = tmp_path_factory.mktemp("variant") / "sdxl"
            shutil.copytree(tiny_sdxl[0], folder)
            path = folder / "scheduler" / "scheduler_config.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), **fields}, indent=2))
            made[key] = folder
        return made[key]

    return make


class ListDDIM:
    """diffusers' DDIM steps from t to t - T // N, the next timestep of its list only for "leading" spacing
    (huggingface/diffusers#12633, open). For linspace with N = 4 the list is 999, 666, 333, 0, a stride of 333 =
    1000 // 3: telling step() N = 3 makes it step along the list, which is the DDIM of Song et al. (sample_ddim)."""

    @staticmethod
    def patch(scheduler):
        set_timesteps = scheduler.set_timesteps

        def along_the_list(n, device=None, **kw):
            set_timesteps(n, device=device, **kw)
            stride = int(scheduler.timesteps[0] - scheduler.timesteps[1])
            scheduler.num_inference_steps = scheduler.config.num_train_timesteps // stride
            assert scheduler.config.num_train_timesteps // scheduler.num_inference_steps == stride

        scheduler.set_timesteps = along_the_list
        return scheduler


def _diffusers(pipe, folder, sampler, steps, seed, cfg, guidance_rescale=0.0, fix_ddim=False):
    """diffusers' latents and decoded image [1, H, W, 3] in [0, 1], with the scheduler read from `folder`."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline

    cls = EulerDiscreteScheduler if sampler == "euler" else DDIMScheduler
    scheduler = cls.from_pretrained(folder, subfolder="scheduler")
    if fix_ddim:
        ListDDIM.patch(scheduler)
    ref = StableDiffusionXLPipeline(**{**pipe.components, "scheduler": scheduler})
    ref.set_progress_bar_config(disable=True)
    latents = ref(PROMPT, num_inference_steps=steps, guidance_scale=cfg, guidance_rescale=guidance_rescale, height=H,
                  width=W, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
    with torch.no_grad():
        image = ref.vae.decode(latents / ref.vae.config.scaling_factor).sample
    return latents, (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _ours(folder, sampler, steps, seed, cfg, guidance_rescale=0.0):
    sd = load_sdxl(str(folder))
    latents = sample.generate_latents(sd, PROMPT, height=H, width=W, steps=steps, cfg=cfg, sampler=sampler, seed=seed,
                                      guidance_rescale=guidance_rescale, progress=False)
    return latents, sample.decode(sd, latents).permute(0, 2, 3, 1).numpy()


def _compare(name, ours, theirs):
    """-> (image max diff in 1/255, latent max abs diff), printed for the report."""
    (lat, img), (ref_lat, ref_img) = ours, theirs
    latent_diff = (lat - ref_lat).abs().max().item()
    image_diff = np.abs((img * 255).round() - (ref_img * 255).round()).max()
    print(f"{name}: image max diff {image_diff:.0f}/255, latents max abs diff {latent_diff:.3g} "
          f"(|latents| up to {ref_lat.abs().max():.3g})")
    return image_diff, latent_diff


# ----------------------------------------------------------------------------------------------------------
# Schedules against diffusers' schedulers (no model: cheap, so many step counts)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_schedules_match_diffusers(spacing, zero_snr):
    """Timesteps, sigmas and the start of Euler; timesteps and alpha_bar of DDIM. (Trailing: for a few N, e.g. 48 or
    61, numpy's float arange in diffusers breaks a .5 tie the other way or adds a 1001st-timestep step; we take
    round(T - k T/N) - 1 exactly.)"""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    cfg = {**json.loads(SDXL_SCHEDULER.read_text()), "timestep_spacing": spacing, "rescale_betas_zero_snr": zero_snr,
           "prediction_type": "v_prediction" if zero_snr else "epsilon"}
    abar = dco.alphas_cumprod(cfg)
    assert (abar[-1] == 0) == zero_snr and abs(abar[0] - 0.99915) < 1e-6  # Lin et al.: first kept, last zero
    euler, ddim = EulerDiscreteScheduler.from_config(cfg), DDIMScheduler.from_config(cfg)
    assert (abar - ddim.alphas_cumprod).abs().max() < 1e-6
    for steps in (1, 2, 3, 4, 5, 7, 10, 25, 30, 50):
        sigmas, t = sample.euler_schedule(abar, steps, cfg["steps_offset"], spacing)
        euler.set_timesteps(steps)
        assert torch.equal(t.float(), euler.timesteps), (steps, t, euler.timesteps)
        assert ((sigmas - euler.sigmas).abs() / euler.sigmas.clamp(min=1)).max() <= 1e-5 and sigmas[-1] == 0
        start = (sigmas[0] ** 2 + 1) ** 0.5 if spacing == "leading" else sigmas[0]  # generate_latents' start_sigma
        assert abs(start / euler.init_noise_sigma - 1) <= 1e-6
        alphas, t2 = sample.ddim_schedule(abar, steps, cfg["steps_offset"], spacing)
        ddim.set_timesteps(steps)
        assert torch.equal(t2, ddim.timesteps)
        assert (alphas[:-1] - ddim.alphas_cumprod[t2]).abs().max() <= 1e-6 and alphas[-1] == ddim.final_alpha_cumprod
    if zero_snr and spacing != "leading":
        assert t[0] == 999 and abs(sigmas[0] - 4096) < 1e-3  # abar_999 = 0 -> 2^-24, as diffusers


# ----------------------------------------------------------------------------------------------------------
# Same seed, same picture as diffusers


SETTINGS = {  # name: (scheduler config fields, sampler, steps, cfg, guidance_rescale)
    "trailing, Euler": ({"timestep_spacing": "trailing"}, "euler", 4, 5.0, 0.0),
    "trailing, DDIM": ({"timestep_spacing": "trailing"}, "ddim", 4, 5.0, 0.0),
    "linspace, Euler (fractional t)": ({"timestep_spacing": "linspace"}, "euler", 5, 5.0, 0.0),
    "leading, steps_offset 0, DDIM": ({"steps_offset": 0}, "ddim", 4, 5.0, 0.0),
    "v_prediction + trailing + zero SNR, Euler": (V_PRED, "euler", 4, 5.0, 0.0),
    "v_prediction + trailing + zero SNR, DDIM": (V_PRED, "ddim", 4, 5.0, 0.0),
    "v_prediction (leading), Euler": ({"prediction_type": "v_prediction"}, "euler", 4, 5.0, 0.0),
    "linear betas, Euler": ({"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, "euler", 4, 5.0, 0.0),
    "set_alpha_to_one, DDIM": ({"set_alpha_to_one": True}, "ddim", 4, 5.0, 0.0),
    "guidance_rescale 0.7, Euler": ({}, "euler", 4, 7.5, 0.7),
    "guidance_rescale 0.7, v_prediction + zero SNR, DDIM": (V_PRED, "ddim", 4, 7.5, 0.7),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_same_seed_same_picture_as_diffusers(name, variant, tiny_sdxl):
    fields, sampler, steps, cfg, rescale = SETTINGS[name]
    folder = variant(**fields)
    ours = _ours(folder, sampler, steps, 3, cfg, rescale)
    image_diff, latent_diff = _compare(name, ours, _diffusers(tiny_sdxl[1], folder, sampler, steps, 3, cfg, rescale))
    assert image_diff <= 2 and latent_diff <= 1e-3
    # the setting matters: the folder's default (leading, epsilon, no rescale) gives another picture
    plain = _ours(tiny_sdxl[0], sampler, steps, 3, cfg)[0]
    assert (plain - ours[0]).abs().max() > 0.1


def test_linspace_ddim_steps_along_the_list(variant, tiny_sdxl):
    """DDIM with linspace spacing equals diffusers' DDIM made to step along its own list (ListDDIM); unpatched
    diffusers steps 999 -> 749 -> ... (diffusers#12633) and gives another picture."""
    folder = variant(timestep_spacing="linspace")
    ours = _ours(folder, "ddim", 4, 3, 5.0)
    image_diff, latent_diff = _compare("linspace, DDIM", ours, _diffusers(tiny_sdxl[1], folder, "ddim", 4, 3, 5.0,
                                                                          fix_ddim=True))
    assert image_diff <= 2 and latent_diff <= 1e-3
    unpatched = _diffusers(tiny_sdxl[1], folder, "ddim", 4, 3, 5.0)[0]
    diff = (unpatched - ours[0]).abs().max()
    print(f"linspace, DDIM: unpatched diffusers (steps to t - T // N) differs by {diff:.3g}")
    assert diff > 0.1


def test_guidance_rescale_under_consistency_guidance_follows_the_official_pipeline():
    """Under consistency guidance phi rescales towards std(eps_phi(x_t, c_base)), as the official pipeline
    (reward_guidance.py:513-515 rescales noise_pred towards noise_pred_text, phi's prediction with the base prompt);
    at phi = 1 the result is the guided prediction with exactly that std, per image."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 4, 8, 8, generator=g) * torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1)

    class Stub(torch.nn.Module):  # a "UNet" that returns its fixed rows [empty, c_base, c] whatever the input
        def forward(self, x, t, context, pooled, time_ids):
            return rows

    cond = (torch.zeros(3, 77, 64), torch.zeros(3, 32), torch.zeros(3, 6), 0.0)
    x = torch.zeros(1, 4, 8, 8)
    plain = sample.guided_eps(Stub(), cond, cfg=5.0, wcon=3.0)(x, 1)
    assert torch.allclose(plain, rows[0] + 5 * (rows[1] - rows[0]) + 3 * (rows[2] - rows[1]), atol=1e-5)
    full = sample.guided_eps(Stub(), cond, cfg=5.0, wcon=3.0, guidance_rescale=1.0)(x, 1)
    assert abs(full.std() - rows[1].std()) < 1e-5 and torch.allclose(full / full.std(), plain / plain.std(), atol=1e-5)
    half = sample.guided_eps(Stub(), cond, cfg=5.0, wcon=3.0, guidance_rescale=0.7)(x, 1)
    assert torch.allclose(half, 0.7 * full + 0.3 * plain, atol=1e-5)  # Lin et al. Eq. 16


# ----------------------------------------------------------------------------------------------------------
# Refused, in one line naming the field


@pytest.mark.parametrize("fields,sampler,name", [
    ({"timestep_spacing": "karras"}, "euler", "timestep_spacing"),
    ({"use_karras_sigmas": True}, "euler", "use_karras_sigmas"),
    ({"interpolation_type": "log_linear"}, "euler", "interpolation_type"),
    ({"final_sigmas_type": "sigma_min"}, "euler", "final_sigmas_type"),
    ({"timestep_type": "continuous"}, "euler", "timestep_type"),
    ({"clip_sample": True}, "ddim", "clip_sample"),
    ({"prediction_type": "sample"}, "euler", "prediction_type"),
    ({"beta_schedule": "squaredcos_cap_v2"}, "ddim", "beta_schedule"),
    ({"rescale_betas_zero_snr": True}, "euler", "rescale_betas_zero_snr"),  # with epsilon prediction
])
def test_unsupported_settings_are_refused_in_one_line(fields, sampler, name, tiny_sdxl):
    sd = load_sdxl(str(tiny_sdxl[0]))
    sd.scheduler = {**sd.scheduler, **fields}
    with pytest.raises(ValueError, match=name) as e:
        sample.generate_latents(sd, PROMPT, height=H, width=W, steps=2, sampler=sampler, progress=False)
    assert "\n" not in str(e.value) and str(e.value).startswith("scheduler config: ")


def test_guidance_rescale_out_of_range_is_refused(tiny_sdxl):
    sd = load_sdxl(str(tiny_sdxl[0]))
    for phi in (-0.1, 1.5):
        with pytest.raises(ValueError, match="--guidance-rescale"):
            sample.generate_latents(sd, PROMPT, height=H, width=W, steps=1, guidance_rescale=phi, progress=False)
    with pytest.raises(SystemExit, match="--guidance-rescale"):  # the CLI: before the model is loaded
        sample.main(["--prompt", PROMPT, "--model", "no/such-model", "--guidance-rescale", "2"])


def test_clip_sample_does_not_concern_euler(tiny_sdxl):
    sd = load_sdxl(str(tiny_sdxl[0]))
    sd.scheduler = {**sd.scheduler, "clip_sample": True}  # DDIMScheduler's field; diffusers' Euler ignores it
    sample.generate_latents(sd, PROMPT, height=H, width=W, steps=1, progress=False)


# ----------------------------------------------------------------------------------------------------------
# Training a v-prediction base


def _train(folder, tmp_path, name, *extra):
    images = tmp_path / name / "dog"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
    args = train.parse_args(["--images", str(images), "--model", str(folder), "--output", str(tmp_path / name / "out"),
                             "--resolution", "64", "--device", "cpu", "--sample-steps", "0", "--checkpoint-every", "0",
                             *extra])
    with contextlib.redirect_stderr(io.StringIO()):
        train.train(args)
    return [json.loads(line) for line in open(tmp_path / name / "out" / "log.jsonl")]


def test_v_prediction_training(variant, tiny_sdxl, tmp_path, monkeypatch):
    """DCO on a v-prediction zero-SNR base with --snr-gamma 5 starts at exactly log 2, and its target is v: read as
    v it gives back exactly the noise and the latent that an epsilon base's run (same seed) draws."""
    batches = []
    get_batch = train.get_batch

    def spy(*args, **kwargs):  # get_batch -> (t, micro-batches): keep this process's first micro-batch
        t, micro = get_batch(*args, **kwargs)
        micro = list(micro)
        batches.append(micro[0])
        return t, iter(micro)
    monkeypatch.setattr(train, "get_batch", spy)
    log = _train(variant(**V_PRED), tmp_path, "v", "--steps", "2", "--snr-gamma", "5")
    v_batch = batches[0]
    _train(tiny_sdxl[0], tmp_path, "eps", "--steps", "1", "--loss", "db")
    eps_batch = batches[-1]
    print("v-prediction DCO, --snr-gamma 5:", [(r["loss"], r["implicit_reward"]) for r in log])
    assert log[0]["loss"] == LOG2 and log[0]["implicit_reward"] == 0.0  # the weights multiply a zero gap
    assert all(math.isfinite(r["loss"]) for r in log) and log[1]["implicit_reward"] != 0.0

    t = v_batch.t
    assert torch.equal(t, eps_batch.t)
    a = dco._at(dco.alphas_cumprod(V_PRED), t, v_batch.xt)
    x0 = a.sqrt() * v_batch.xt - (1 - a).sqrt() * v_batch.target  # the rotation back (sample.x0_and_eps)
    eps = (1 - a).sqrt() * v_batch.xt + a.sqrt() * v_batch.target
    a_eps = dco._at(dco.alphas_cumprod(), t, eps_batch.xt)
    assert (eps - eps_batch.target).abs().max() < 1e-5  # the epsilon run's target is its noise
    assert (x0 - (eps_batch.xt - (1 - a_eps).sqrt() * eps_batch.target) / a_eps.sqrt()).abs().max() < 1e-4

    snr = dco.snr(t, dco.alphas_cumprod(V_PRED))
    assert torch.allclose(v_batch.weights, snr.clamp(max=5) / (snr + 1)) and eps_batch.weights is None


def test_epsilon_with_zero_snr_is_refused_before_writing(variant, tmp_path):
    out = tmp_path / "out"
    images = tmp_path / "dog"
    images.mkdir()
    Image.new("RGB", (64, 64)).save(images / "0.png")
    with pytest.raises(SystemExit) as e:
        train.main(["--images", str(images), "--model", str(variant(rescale_betas_zero_snr=True)), "--output",
                    str(out), "--resolution", "64", "--device", "cpu"])
    assert "rescale_betas_zero_snr" in str(e.value) and not out.exists()


def test_snr_gamma_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="--snr-gamma"):
        train.parse_args(["--images", str(tmp_path), "--snr-gamma", "0"])
