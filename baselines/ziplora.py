"""ZipLoRA: merge two LoRAs by learning which input columns of each layer's update each LoRA keeps.

    python merge.py output/dog output/style --method ziplora --model tiny --output output/dog_in_style_zip

Shah, Ruiz, Cole, Lu, Lazebnik, Li, Jampani, "ZipLoRA: Any Subject in Any Style by Effectively Merging LoRAs"
(2023, arXiv 2311.13600), Sec. 4. The post-optimisation baseline of the DCO paper's merge table (DCO, Sec. 5.3):
DreamBooth LoRAs of a subject and a style interfere when simply added, so ZipLoRA learns, for every layer i, one
merger coefficient per *column* of each update,

    dW_m = dW_a diag(m_a) + dW_b diag(m_b),        m_a, m_b in R^in, both starting at 1 (= the plain sum),

and fits them so that the merged model reproduces each LoRA on its own concept, with the two LoRAs pushed onto
different columns (the paper's merger loss, Sec. 4):

    L = || eps_m(x_a, p_a) - eps_a(x_a, p_a) ||^2 + || eps_m(x_b, p_b) - eps_b(x_b, p_b) ||^2 + lambda sum_i |cos(m_a^i, m_b^i)|

eps_m: the UNet with the merged update, eps_a: the UNet with LoRA a alone; x_a: noisy latents of concept a's own
training images (noise and t drawn as in training), p_a: their captions (with a's token).

Which axis "column" is. In W's [out, in] convention (y = W x, torch's nn.Linear), column j of dW holds what input
feature j writes to every output; the paper's analysis compares LoRAs column by column and the public
implementation (mkshing/ziplora-pytorch) keeps one coefficient per *input* feature, broadcast over dW's last axis.
We do the same: dW diag(m) x = B A (m * x), so the merger scales the columns of the down-projection A, and the
merged update is still a plain rank-(r_a + r_b) LoRA: [s_a B_a | s_b B_b] @ [A_a diag(m_a) ; A_b diag(m_b)]
(see scale_columns). No new file format: merge.py writes it as it writes the exact sum.

Choices where the paper leaves details open (documented facts from the public implementation, no code taken):
- the loss is on the whole UNet's noise prediction (the paper compares the models' outputs), not layer by layer;
- the penalty is |cos| per layer, as the paper names it, averaged over layers (mkshing: mean |m_a * m_b|, a
  scale-dependent dot product; the cosine cannot be lowered by shrinking both vectors, which the fit already
  resists), so lambda does not depend on how many layers the model has; lambda = 0.01 as mkshing's default;
- 100 steps, as mkshing's example run, but Adam at lr 1e-2, not its 5e-5 (default 1e-4): Adam moves a coefficient
  by about lr per step, so 5e-5 could move it by at most 0.005 in 100 steps, i.e. leave the plain sum; 1e-2 lets a
  column go from 1 to 0 within the run;
- one image per concept per step (train.py's batch 1); only layers both LoRAs have get mergers (a layer only one LoRA
  has is kept as it is, nothing can interfere there); UNet LoRA layers only (train.py trains no text-encoder LoRA).
"""
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from dco import add_noise, alphas_cumprod, sample_noise, sample_timesteps
from lora import _replace
from vae import latent_dist_sample

STEPS, LR, LAMBDA = 100, 1e-2, 0.01


class ZipLoRALinear(nn.Module):
    """A frozen nn.Linear plus LoRA a and LoRA b, each through its merger vector over the input columns.
    mode "merged": W x + s_a B_a A_a (m_a * x) + s_b B_b A_b (m_b * x); mode "a" / "b": W x + that LoRA alone
    (m ignored), the targets. s = weight * alpha / r is folded into up, as lora.concat_loras does."""

    def __init__(self, base: nn.Linear, a=None, b=None, weights=(1.0, 1.0)):
        super().__init__()
        self.base, self.mode = base.requires_grad_(False), "merged"
        self.branches = []
        for name, layer, w in (("a", a, weights[0]), ("b", b, weights[1])):
            if layer is None:
                continue
            down, up, alpha = layer
            self.register_buffer(f"down_{name}", down.float().to(base.weight.device))
            self.register_buffer(f"up_{name}", (up.float() * (w * alpha / down.shape[0])).to(base.weight.device))
            # a merger only where both LoRAs write: alone, a LoRA has nothing to be zipped with
            m = torch.ones(base.in_features, device=base.weight.device)
            setattr(self, f"m_{name}", nn.Parameter(m) if a is not None and b is not None else m)
            self.branches.append(name)

    def forward(self, x):
        out = self.base(x)
        for name in self.branches:
            if self.mode in ("merged", name):
                h = x * getattr(self, f"m_{name}").to(x.dtype) if self.mode == "merged" else x
                down, up = getattr(self, f"down_{name}"), getattr(self, f"up_{name}")
                out = out + F.linear(F.linear(h, down.to(x.dtype)), up.to(x.dtype))
        return out


def zip_unet(unet, layers_a: dict, layers_b: dict, weights=(1.0, 1.0)) -> dict[str, ZipLoRALinear]:
    """Wrap every UNet Linear either LoRA has ({module: (down, up, alpha)}) in a ZipLoRALinear, in place."""
    zipped = {}
    for name in dict.fromkeys([*layers_a, *layers_b]):
        base = unet.get_submodule(name)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRA layer '{name}' is not a Linear of the base UNet: LoRA trained for another base?")
        zipped[name] = ZipLoRALinear(base, layers_a.get(name), layers_b.get(name), weights)
        _replace(unet, name, zipped[name])
    return zipped


@contextmanager
def mode(zipped: dict, which: str):
    """`with mode(zipped, "a"): unet(...)` runs the UNet with LoRA a alone; back to "merged" after."""
    for m in zipped.values():
        m.mode = which
    try:
        yield
    finally:
        for m in zipped.values():
            m.mode = "merged"


def mergers(zipped: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The trainable (m_a, m_b) pairs, one per layer both LoRAs have."""
    return [(m.m_a, m.m_b) for m in zipped.values() if isinstance(getattr(m, "m_a", None), nn.Parameter)]


def cosine_penalty(pairs) -> torch.Tensor:
    """mean over layers of |cos(m_a, m_b)|: 1 at the start (both all ones), 0 once the two LoRAs use disjoint
    columns (the merger loss's third term; averaged, not summed, so that lambda is independent of the layer count).
    At the start it is at its maximum, so its gradient is 0 there: the reconstruction terms break the symmetry first,
    then it pushes the two vectors apart."""
    return torch.stack([F.cosine_similarity(a, b, dim=0).abs() for a, b in pairs]).mean()


def ziplora_loss(unet, zipped, batch_a, batch_b, lam=LAMBDA):
    """ZipLoRA's merger loss on one batch per concept -> (loss, {"a", "b", "cos"}). A batch is (x_t, t, context, pooled,
    time_ids); the targets (each LoRA alone on its own concept) carry no gradient."""
    parts = {}
    for name, batch in (("a", batch_a), ("b", batch_b)):
        with torch.no_grad(), mode(zipped, name):
            target = unet(*batch)
        parts[name] = F.mse_loss(unet(*batch).float(), target.float())
    parts["cos"] = cosine_penalty(mergers(zipped))
    return parts["a"] + parts["b"] + lam * parts["cos"], {k: v.item() for k, v in parts.items()}


def concept_data(sd, folder, device):
    """A trainer's output folder -> (VAE latent mean, logvar, captions encoded, time_ids): the concept's own training
    images and captions, as train_config.json records them."""
    from product.images import load_image  # train.py's preprocessing: the latents the LoRA was trained on
    config = os.path.join(folder, "train_config.json")
    if not os.path.isfile(config):
        raise ValueError(f"--method ziplora: {folder} has no train_config.json; ZipLoRA fits the merge on each LoRA's "
                         "training images and captions, so pass train.py output folders")
    cfg = json.loads(Path(config).read_text())
    missing = [p for p in cfg["images"] if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"--method ziplora: {folder}'s training image {missing[0]} is gone; ZipLoRA needs the "
                         "training images where train.py read them (or use --method sum)")
    images = [load_image(p, cfg["resolution"]) for p in cfg["images"]]
    vae_dtype = next(sd.vae.parameters()).dtype
    with torch.no_grad():
        x = torch.stack([im for im, _ in images]).float() / 127.5 - 1
        stats = [sd.vae.encode(x[i:i + 1].to(device, vae_dtype)) for i in range(len(images))]
        ctx, pooled = zip(*[sd.encode_prompt([c]) for c in cfg["captions"]])
    mean, logvar = (torch.cat([s[k].float() for s in stats]) for k in (0, 1))
    time_ids = torch.stack([t for _, t in images]).float().to(device)
    return mean, logvar, torch.cat(ctx), torch.cat(pooled), time_ids


def draw(data, acp, g, scaling_factor, dtype):
    """One training-like batch of a concept: a random image, latent ~ its VAE Gaussian, t ~ U, eps ~ N."""
    mean, logvar, ctx, pooled, time_ids = data
    i = torch.randint(len(mean), (1,), generator=g)
    x0 = latent_dist_sample(mean[i].cpu(), logvar[i].cpu(), g) * scaling_factor
    eps = sample_noise(x0, 0.0, g)
    t = sample_timesteps(1, len(acp), generator=g)
    xt = add_noise(x0, eps, t, acp).to(mean.device, dtype)
    return xt, t.to(mean.device), ctx[i], pooled[i], time_ids[i]


def optimise(sd, layers_a, layers_b, folders, weights=(1.0, 1.0), steps=STEPS, lr=LR, lam=LAMBDA, seed=0,
             device="cpu", progress=True):
    """Fit ZipLoRA's mergers for UNet LoRAs a and b (their trainer folders give the data) on `sd` (changed in place:
    its UNet Linears are wrapped) -> ({module: (m_a, m_b) or None}, loss history [(step, loss, parts)])."""
    zipped = zip_unet(sd.unet, layers_a, layers_b, weights)
    pairs = mergers(zipped)
    if not pairs:
        raise ValueError("--method ziplora: the two LoRAs share no UNet layer, there is nothing to zip (their sum is "
                         "already interference-free): use --method sum")
    data = [concept_data(sd, f, device) for f in folders]
    acp, dtype = alphas_cumprod(sd.scheduler), next(sd.unet.parameters()).dtype
    opt = torch.optim.Adam([p for pair in pairs for p in pair], lr=lr)
    g = torch.Generator().manual_seed(seed)
    history = []
    bar = tqdm(range(steps), desc="ziplora", disable=not progress)
    for step in bar:
        a, b = (draw(d, acp, g, sd.vae.scaling_factor, dtype) for d in data)
        loss, parts = ziplora_loss(sd.unet, zipped, a, b, lam)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append((step, loss.item(), parts))
        bar.set_postfix(loss=f"{loss.item():.4g}", cos=f"{parts['cos']:.3f}")
    return {n: (m.m_a.detach().cpu(), m.m_b.detach().cpu()) if hasattr(m, "m_a") and hasattr(m, "m_b") else None
            for n, m in zipped.items()}, history


def scale_columns(layers: dict, coefficients: dict, which: int) -> dict:
    """A LoRA {module: (down, up, alpha)} with dW diag(m) in place of dW: the merger scales the columns of down
    (dW diag(m) = B (A diag(m))), so it stays a LoRA of the same rank. `which`: 0 for LoRA a's m, 1 for b's."""
    out = {}
    for name, (down, up, alpha) in layers.items():
        m = coefficients.get(name)
        out[name] = (down.float() * m[which].to(down.device)[None, :] if m is not None else down, up, alpha)
    return out


def summary(coefficients: dict) -> dict:
    """How zipped the result is: mean |cos(m_a, m_b)| and the share of columns each LoRA has (almost) given up."""
    pairs = [m for m in coefficients.values() if m is not None]
    cos = sum(F.cosine_similarity(a, b, dim=0).abs().item() for a, b in pairs) / len(pairs)
    small = [(a.abs() < 0.1).float().mean().item() for a, _ in pairs], [(b.abs() < 0.1).float().mean().item()
                                                                        for _, b in pairs]
    return {"layers": len(pairs), "mean_abs_cos": round(cos, 4),
            "columns_off_a": round(sum(small[0]) / len(pairs), 4), "columns_off_b": round(sum(small[1]) / len(pairs), 4)}



def zip_sources(sources, weights, model, device=None, steps=STEPS, lr=LR, lam=LAMBDA, seed=0, progress=True):
    """merge.py --method ziplora: two merge.Source LoRAs (trainer folders) -> the same two with every shared UNet
    layer's down-projection column-scaled by its fitted merger, and a summary for the merge's metadata. Summing
    them (merge.merge_loras, exact) then gives dW_a diag(m_a) + dW_b diag(m_b)."""
    from dataclasses import replace

    from sample import add_learned_tokens
    from sdxl import load_sdxl
    if len(sources) != 2:
        raise ValueError(f"--method ziplora merges exactly two LoRAs (a subject and a style), got {len(sources)}")
    for s in sources:
        if set(s.layers) - {"unet"}:
            raise ValueError(f"--method ziplora: {s.path} has text-encoder LoRA layers; ZipLoRA here zips UNet LoRAs "
                             "only (as train.py trains them): use --method sum")
        if not os.path.isdir(s.path):
            raise ValueError(f"--method ziplora: {s.path} is a file; pass the train.py output folder, whose "
                             "train_config.json names the training images ZipLoRA fits on")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as train.py: bf16 on GPU, fp32 on CPU
    sd = load_sdxl(model, device=device, dtype=dtype)
    sd.unet.requires_grad_(False)
    for s in sources:  # the captions name the concepts' tokens
        embeds = os.path.join(s.path, "learned_embeds.safetensors")
        if os.path.isfile(embeds):
            add_learned_tokens(sd, embeds)
    coefficients, history = optimise(sd, sources[0].layers["unet"], sources[1].layers["unet"],
                                     [s.path for s in sources], weights, steps, lr, lam, seed, device, progress)
    zipped = [replace(s, layers={"unet": scale_columns(s.layers["unet"], coefficients, i)})
              for i, s in enumerate(sources)]
    first, last = history[0] if history else None, history[-1] if history else None
    info = {"steps": steps, "lr": lr, "lambda": lam, "seed": seed, **summary(coefficients),
            "loss_first": round(first[1], 6) if first else None, "loss_last": round(last[1], 6) if last else None}
    return zipped, info
