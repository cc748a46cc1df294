"""LoRA adapters for SDXL's Linear layers, and the LoRA files that SDXL tools read and write.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685) freezes a
pretrained weight W [out, in] and learns a low-rank update:  y = W x + b + (alpha / r) * B (A x),
with A = `lora_down` [r, in] and B = `lora_up` [out, r]. DCO (Lee et al. 2024) fine-tunes SDXL's UNet this
way, and its loss compares the LoRA model (theta) with the frozen pretrained model (phi). Here phi is the same
network with the LoRA branch switched off (`scale` 0), so the reference model costs no extra memory, and a
per-sample scale lets one batched forward hold theta rows and phi rows at once (consistency guidance).

B starts at ZERO, so Delta W = 0 and training starts exactly at the pretrained model (the first DCO loss
compares two identical models). A must then be random, or dL/dB = g (A x)^T would stay zero too. We draw A
from N(0, 1/r^2), peft's "gaussian" init, which is what diffusers' SDXL LoRA scripts and the DCO reference code
(`LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian")`) use, so their learning rates carry over.

Files: the diffusers/PEFT layout (`pytorch_lora_weights.safetensors`, loadable by
`StableDiffusionXLPipeline.load_lora_weights`) and the kohya layout (`lora_unet_<SGM name>`) that
ComfyUI/A1111 load. Inside this module a LoRA is a plain dict {module path: (down, up, alpha)}.
"""
import itertools
import json
import os
import re
from collections import Counter
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from product import float8
from product.files import BUNDLE, KOHYA_FILE, PEFT_FILE, open_safetensors, save_tensors  # noqa: F401 (file names: API)
from product.single_file import sgm_unet_name

UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' SDXL LoRA default: 560 modules
UNET_KOHYA = UNET_ATTN + ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")  # every Linear of Transformer2D: 722
TEXT_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_ALL = TEXT_ATTN + ("fc1", "fc2")
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank branch. `weight`/`bias` are the base module's own Parameters (shared, not
    copied), so the base checkpoint keys stay `...to_q.weight`; only `lora_down`/`lora_up` are new."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        if hasattr(base, "weight_scale"):  # fp8 frozen weights (product/float8.py): their per-channel scale
            self.register_buffer("weight_scale", base.weight_scale)
            self.compute_dtype = base.compute_dtype
        else:
            self.weight_scale = None
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha = rank, float(rank if alpha is None else alpha)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = dict(bias=False, device=base.weight.device, dtype=self.branch_dtype())
        self.lora_down = nn.Linear(self.in_features, rank, **kw)
        self.lora_up = nn.Linear(rank, self.out_features, **kw)
        nn.init.normal_(self.lora_down.weight, std=1.0 / rank)
        nn.init.zeros_(self.lora_up.weight)
        self.scale = 1.0  # float, or per-sample LoRA on/off/strength: a list of floats, one per row of the batch
        self.merged = None  # the multiplier baked into `weight` by merge(), else None

    def branch_dtype(self):
        """The LoRA's dtype: the base weight's, or over fp8 weights (which store, never compute) their compute dtype.
        Training makes it fp32 in any case (train.add_lora)."""
        return self.compute_dtype if float8.is_fp8(self.weight) else self.weight.dtype

    def forward(self, x):
        out = float8.linear(x, self.weight, self.bias, self.weight_scale)
        scale = self.scale
        # Skip the branch, do not multiply it by 0: scale 0 must be bit-identical to the base model
        # (diffusers #4751 was a scale-0 LoRA that still changed outputs).
        if self.merged is not None or (not isinstance(scale, (list, tuple)) and scale == 0):
            return out
        # Under autocast the matmuls cast for themselves. Casting x here too (fp32 LoRA on a bf16 base) would make a
        # full-size copy of x per layer and keep it for the backward: three copies for q, k and v of one input.
        if x.dtype != self.lora_down.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_down.weight.dtype)
        if isinstance(scale, (list, tuple)):
            # Per-sample scales read on the host: only the runs of rows that use the LoRA (theta's third of a batched
            # consistency-guidance call) run the branch, on slices of x, and choosing them costs no device sync.
            if len(scale) != x.shape[0]:
                raise ValueError(f"LoRA scale list has {len(scale)} entries for a batch of {x.shape[0]}")
            start = 0
            for s, run in itertools.groupby(scale):
                stop = start + len(list(run))
                if s:
                    out[start:stop] += self._branch(x[start:stop], s).to(out.dtype)
                start = stop
            return out
        return out + self._branch(x, scale).to(out.dtype)

    def _branch(self, x, scale):
        """(scale * alpha / r) * B A x: two thin matmuls, never a materialised Delta W. The scale multiplies the
        small [out, r] up weight rather than the [tokens, out] result: one full-size elementwise pass less."""
        return F.linear(self.lora_down(self.lora_dropout(x)), self.lora_up.weight * (scale * self.alpha / self.rank))

    def delta_weight(self, multiplier: float = 1.0):
        up, down = self.lora_up.weight.float(), self.lora_down.weight.float()
        return (up @ down) * (multiplier * self.alpha / self.rank)

    @torch.no_grad()
    def merge(self, multiplier: float = 1.0):
        """Fold Delta W into `weight` (no branch at inference); forward then ignores `scale`."""
        if self.merged is not None:
            raise ValueError("LoRA is already merged; call unmerge() first")
        if float8.is_fp8(self.weight):
            raise ValueError("cannot merge a LoRA into fp8 weights (they would be quantized again): load in bf16")
        self.weight += self.delta_weight(multiplier).to(self.weight.dtype)
        self.merged = multiplier

    @torch.no_grad()
    def unmerge(self):
        if self.merged is not None:
            self.weight -= self.delta_weight(self.merged).to(self.weight.dtype)
            self.merged = None

    @torch.no_grad()
    def set_lora(self, down, up, alpha):
        """Replace the branch by given weights (their rank may differ from the current one)."""
        kw = dict(bias=False, device=self.weight.device, dtype=self.branch_dtype())
        self.rank, self.alpha = down.shape[0], float(alpha)
        self.lora_down = nn.Linear(self.in_features, self.rank, **kw)
        self.lora_up = nn.Linear(self.rank, self.out_features, **kw)
        self.lora_down.weight.copy_(down)
        self.lora_up.weight.copy_(up)


# ---------------------------------------------------------------------------------------------------------
# Putting LoRA into a model

def _matches(name, targets):
    return any(name == t or name.endswith("." + t) for t in targets)


def _replace(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def inject_lora(model, rank=32, alpha=None, targets=UNET_ATTN, dropout=0.0) -> list[str]:
    """Wrap every nn.Linear whose path ends with one of `targets` in a LoRALinear; freeze everything else.
    Targets: UNET_ATTN (default), UNET_KOHYA (+ feed-forward, proj_in/out), TEXT_ATTN or TEXT_ALL."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    names = [n for n, m in model.named_modules()
             if type(m) in (nn.Linear, float8.Float8Linear) and _matches(n, targets) and not n.endswith((".lora_down", ".lora_up"))]
    if not names:
        raise ValueError(f"inject_lora: no nn.Linear in {type(model).__name__} ends with any of {targets}")
    model.requires_grad_(False)
    for n in names:
        _replace(model, n, LoRALinear(model.get_submodule(n), rank, alpha, dropout))
    return names


def lora_modules(model) -> dict[str, LoRALinear]:
    if model is None:  # a text encoder train.py dropped after encoding its fixed prompts (sdxl.py)
        return {}
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_down.weight, m.lora_up.weight)]


def set_lora_scale(model, scale):
    for m in lora_modules(model).values():
        m.scale = scale


@contextmanager
def lora_scale(model, scale):
    """`with lora_scale(unet, 0.0): ...` runs the pretrained model phi; the old scales come back after."""
    modules = lora_modules(model).values()
    old = [m.scale for m in modules]
    set_lora_scale(model, scale)
    try:
        yield
    finally:
        for m, s in zip(modules, old):
            m.scale = s


def lora_state_dict(model) -> dict[str, torch.Tensor]:
    """The LoRA tensors as they sit in model.state_dict() ('<module>.lora_down.weight', '.lora_up.weight')."""
    return {f"{n}.{k}.weight": getattr(m, k).weight for n, m in lora_modules(model).items()
            for k in ("lora_down", "lora_up")}


def lora_layers(model) -> dict[str, tuple]:
    """{module path: (down [r, in], up [out, r], alpha)}: the form the save and load functions use."""
    return {n: (m.lora_down.weight.detach(), m.lora_up.weight.detach(), m.alpha)
            for n, m in lora_modules(model).items()}


def concat_loras(states: list[dict], weights: list[float]) -> dict[str, tuple]:
    """Sum several LoRAs exactly by stacking their ranks: [B1 s1 | B2 s2] @ [A1 ; A2] = s1 B1 A1 + s2 B2 A2,
    with s_i = weight_i * alpha_i / r_i folded into each up; the result has alpha = total rank (scale 1)."""
    out = {}
    for name in dict.fromkeys(k for s in states for k in s):
        parts = [(s[name], w) for s, w in zip(states, weights) if name in s]
        if len(parts) == 1:  # keep the file's own alpha, so a single LoRA round-trips unchanged
            (down, up, alpha), w = parts[0]
            out[name] = (down, up * w if w != 1 else up, alpha)
            continue
        down = torch.cat([d for (d, _, _), _ in parts], 0)
        up = torch.cat([u * (w * a / d.shape[0]) for (d, u, a), w in parts], 1)
        out[name] = (down, up, float(down.shape[0]))
    return out


def apply_lora(model, state: dict[str, tuple], multiplier: float = 1.0) -> list[str]:
    """Load a LoRA {module: (down, up, alpha)} into `model`, wrapping plain Linears as needed. A module that
    already carries a LoRA gets the new one concatenated (exact sum of both updates, see concat_loras)."""
    modules = dict(model.named_modules())
    for name, (down, up, _) in state.items():  # check everything before changing anything
        m = modules.get(name)
        if not isinstance(m, nn.Linear):
            raise ValueError(f"LoRA has weights for '{name}', which is not a Linear layer of "
                             f"{type(model).__name__}: LoRA for another model or component?")
        if down.dim() != 2 or down.shape[1] != m.in_features or up.shape != (m.out_features, down.shape[0]):
            raise ValueError(f"LoRA layer '{name}': down {tuple(down.shape)} / up {tuple(up.shape)} do not fit "
                             f"the base weight {tuple(m.weight.shape)}: LoRA trained for another base?")
        if isinstance(m, LoRALinear) and m.merged is not None:
            raise ValueError(f"'{name}' has a merged LoRA; unmerge() it before applying another")
    for name, (down, up, alpha) in state.items():
        m, old = modules[name], {}
        if isinstance(m, LoRALinear):
            old = {name: (m.lora_down.weight.float(), m.lora_up.weight.float(), m.alpha)}
        else:
            m = LoRALinear(m, down.shape[0])
            _replace(model, name, m)
        new = {name: (down.to(m.weight.device, torch.float32), up.to(m.weight.device, torch.float32), alpha)}
        m.set_lora(*concat_loras([old, new], [1.0, multiplier])[name])
    return list(state)


# ---------------------------------------------------------------------------------------------------------
# Files

def _check_metadata(metadata):
    if any(not isinstance(k, str) or not isinstance(v, str) for k, v in (metadata or {}).items()):
        raise ValueError("LoRA metadata must be a dict of str -> str (safetensors header)")
    return dict(metadata or {})


def _save(path, tensors, metadata):
    if not tensors:
        raise ValueError(f"nothing to save to {path}: no LoRA layers given (did you inject_lora?)")
    return save_tensors(path, tensors, {"format": "pt", **metadata})  # atomic: never half a LoRA


def _file_path(path, default_name):
    if str(path).endswith(".safetensors"):
        return str(path)
    os.makedirs(path, exist_ok=True)
    return os.path.join(path, default_name)


def _peft_config(layers, strip):
    """The peft LoraConfig fields diffusers rebuilds the adapter from. diffusers 0.42 reads the metadata key
    'lora_adapter_metadata' (JSON, keys '<component>.<field>') and calls LoraConfig(**fields) as they are;
    without it, it assumes alpha = rank. Pattern keys are regexes matched as '(.*\\.)?(key)$', hence escaping."""
    short = {n.removeprefix(strip): (d.shape[0], a) for n, (d, _, a) in layers.items()}
    r = Counter(rk for rk, _ in short.values()).most_common(1)[0][0]
    alpha = Counter(a for _, a in short.values()).most_common(1)[0][0]
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(short),
            "rank_pattern": {re.escape(n): rk for n, (rk, _) in short.items() if rk != r},
            "alpha_pattern": {re.escape(n): a for n, (_, a) in short.items() if a != alpha}}


def save_lora_peft(path, components: dict, metadata=None):
    """diffusers/PEFT layout: '<component>.<module>.lora_A.weight' (down) / '.lora_B.weight' (up).
    components: {'unet' | 'text_encoder' | 'text_encoder_2': model or {module: (down, up, alpha)}};
    path: a folder (-> pytorch_lora_weights.safetensors) or a .safetensors file."""
    metadata, tensors, config = _check_metadata(metadata), {}, {}
    for comp, layers in components.items():
        layers = lora_layers(layers) if isinstance(layers, nn.Module) else layers
        for name, (down, up, _) in layers.items():
            tensors[f"{comp}.{name}.lora_A.weight"] = down
            tensors[f"{comp}.{name}.lora_B.weight"] = up
        if layers:
            strip = "" if comp == "unet" else "text_model."  # transformers 5 CLIPTextModel has no text_model.
            config.update({f"{comp}.{k}": v for k, v in _peft_config(layers, strip).items()})
    meta = {**metadata, "lora_adapter_metadata": json.dumps(config, sort_keys=True)}
    return _save(_file_path(path, PEFT_FILE), tensors, meta)


def kohya_name(component, module, unet_config=None, sgm=True):
    """'lora_unet_' + SGM module path with '.' -> '_' (UNet), 'lora_te1_'/'lora_te2_' + HF CLIP path."""
    if component == "unet" and sgm:
        module = sgm_unet_name(module, unet_config)
    return KOHYA_PREFIX[component] + module.replace(".", "_")


def save_lora_kohya(path, components: dict, unet_config=None, metadata=None, embeddings=None):
    """kohya/A1111/ComfyUI layout: '<kohya name>.lora_down.weight', '.lora_up.weight', '.alpha' (0-d);
    components as in save_lora_peft; the UNet's SGM names need its config (folder -> lora_kohya.safetensors).
    embeddings: {token: {"clip_l": [1, 768], "clip_g": [1, 1280]}} bundled as A1111 reads them,
    'bundle_emb.<token>.clip_l' / '.clip_g': one file carries the LoRA and its learned tokens."""
    metadata, tensors = _check_metadata(metadata), {}
    for token, rows in (embeddings or {}).items():
        tensors.update({f"{BUNDLE}{token}.{key}": rows[key] for key in ("clip_l", "clip_g")})
    for comp, layers in components.items():
        layers = lora_layers(layers) if isinstance(layers, nn.Module) else layers
        for name, (down, up, alpha) in layers.items():
            k = kohya_name(comp, name, unet_config)
            tensors.update({f"{k}.lora_down.weight": down, f"{k}.lora_up.weight": up,
                            f"{k}.alpha": torch.tensor(float(alpha))})
    return _save(_file_path(path, KOHYA_FILE), tensors, metadata)


_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
          (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
          (".lora_down.weight", ".lora_up.weight"))


def _names(m):
    if not isinstance(m, nn.Module):
        return m
    return [n for n, x in m.named_modules() if isinstance(x, nn.Linear) and not n.endswith((".lora_down", ".lora_up"))]


def _peft_alpha(config, comp, module, rank):
    """alpha from 'lora_adapter_metadata' (alpha_pattern first, then lora_alpha), else rank."""
    pattern = config.get(f"{comp}.alpha_pattern") or {}
    for key, a in pattern.items():
        if any(re.match(rf"(.*\.)?({key})$", m) for m in (module, module.removeprefix("text_model."))):
            return float(a)
    return float(config.get(f"{comp}.lora_alpha", rank))


def load_lora_file(path, modules: dict | None = None, unet_config=None):
    """Read a LoRA file in any supported layout -> ({component: {module: (down, up, alpha)}}, metadata).
    kohya names ('lora_unet_input_blocks_4_1_...') cannot be split back at '_', so for those pass `modules`
    ({'unet': model or list of module paths, 'text_encoder': ..., ...}) and `unet_config`: the lookup is built
    forward from the model's names, in both SGM and diffusers block spelling."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file not found: {path}")
    with open_safetensors(path) as f:  # a truncated file or a pickle: a ValueError naming it
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata() or {})
    metadata.pop("format", None)
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError:
        raise ValueError(f"{path}: its 'lora_adapter_metadata' is not JSON; export the LoRA again") from None
    lookup = {}
    for comp, ms in (modules or {}).items():
        for n in _names(ms):
            lookup[kohya_name(comp, n, sgm=False)] = (comp, n)
            if comp == "unet" and unet_config is not None:
                lookup[kohya_name(comp, n, unet_config)] = (comp, n)
    state, used = {}, set()
    for key in tensors:
        pair = next((p for p in _PAIRS if key.endswith(p[0])), None)
        if pair is None:
            continue
        stem = key[: -len(pair[0])]
        if stem.startswith(("lora_unet_", "lora_te")):
            name = stem.replace("lora_te_", "lora_te1_", 1)  # lora_te_: the SD1.x single-encoder spelling
            if name not in lookup:
                raise ValueError(f"{path}: kohya LoRA key '{stem}' matches no module of the model: pass "
                                 "modules={'unet': unet, ...} and unet_config, or it is a LoRA for another base")
            comp, module = lookup[name]
        else:
            comp, _, module = stem.partition(".")
            if comp not in KOHYA_PREFIX:
                raise ValueError(f"{path}: key '{key}' has no 'unet.'/'text_encoder.'/'text_encoder_2.' prefix")
            if comp != "unet" and not module.startswith("text_model."):
                module = "text_model." + module
        down, up = tensors[key], tensors.get(stem + pair[1])
        if up is None:
            raise ValueError(f"{path}: '{key}' has no matching '{stem + pair[1]}'")
        if down.dim() != 2:
            raise ValueError(f"{path}: '{key}' is a conv LoRA (LoCon); only Linear LoRA is supported")
        alpha = float(tensors[stem + ".alpha"]) if stem + ".alpha" in tensors else \
            _peft_alpha(config, comp, module, down.shape[0])
        state.setdefault(comp, {})[module] = (down, up, alpha or float(down.shape[0]))  # kohya: alpha 0 = rank
        used |= {key, stem + pair[1], stem + ".alpha"}
    left = sorted(k for k in set(tensors) - used if not k.startswith(BUNDLE))  # bundled tokens: sample.py reads them
    if left or not state:
        raise ValueError(f"{path}: unsupported LoRA key '{left[0] if left else 'none found'}' "
                         "(plain Linear LoRA in PEFT, diffusers or kohya layout is supported)")
    return state, metadata
