"""Frozen weights in float8 (`--precision fp8`): SDXL's UNet and text encoders in a quarter of fp32's memory.

DCO trains only the LoRA (and the token rows); every frozen matrix is read, never written. So each nn.Linear and
nn.Conv2d weight is stored as float8_e4m3fn with one fp32 scale per output channel, and turned back into the
compute dtype (bf16 under autocast, else the input's dtype) inside that layer's forward, one layer at a time:
    W ~= q * s,  q = round_e4m3(W / s),  s_o = max_i |W_oi| / 448   (448: e4m3's largest finite value)
Why a scale per output channel: e4m3 has 3 mantissa bits and normal numbers only above 2^-6; SDXL's weights are
mostly ~1e-2..1e-3, so without a scale most of them would fall into the subnormals (or to zero) and lose their
precision. With s_o every row uses the full range, and a row's error is relative to its own largest entry. (A scale
per tensor, as OneTrainer's, lets one large row set the range of all the others; per channel costs 4 bytes per
row: 0.6 MB for the UNet.)
The backward recomputes the dequantised weight instead of keeping it: autograd would otherwise save each layer's
bf16 copy for the gradient of its input (the token's gradient flows back through every frozen layer), and a
forward through the UNet would then hold a full bf16 copy again. Norms, biases and embeddings stay in the compute
dtype (1% of the numbers); the LoRA and the token rows stay fp32 (train.add_lora, train.NewTokens). phi is the same
fp8 weights with the LoRA off, so DCO's reward compares like with like.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(FP8).max  # 448


def compute_dtype_of(device):
    """What fp8 weights dequantise to, and what the rest of an fp8 model is stored in: bf16 where the device has bf16
    kernels (CUDA; CPUs with AVX-512 BF16 or AMX), else fp32 (an AVX2-only CPU runs bf16 matmuls ~100x slower)."""
    device = torch.device(device)
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()  # Ampere and later; a T4 or V100 computes fp8 weights in fp32
    else:
        bf16 = device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.bfloat16 if bf16 else torch.float32


def is_fp8(t):
    return t is not None and t.dtype == FP8


def quantize(w):
    """W [out, ...] -> (q float8 [out, ...], s fp32 [out]) with W ~= q * s per output channel."""
    amax = w.detach().flatten(1).abs().amax(1).float()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))  # an all-zero row keeps scale 1
    q = (w.detach().float() / scale.view(-1, *[1] * (w.ndim - 1))).to(FP8)
    return q, scale


def dequantize(q, scale, dtype):
    return q.to(dtype) * scale.to(dtype).view(-1, *[1] * (q.ndim - 1))


def compute_dtype(x):
    """The dtype a frozen layer computes in: autocast's where it is on (bf16 for bf16/fp8 runs), else the input's."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class _Linear(torch.autograd.Function):
    """y = x W^T + b with W dequantised here and again in the backward (only q and s are saved)."""

    @staticmethod
    def forward(ctx, x, q, scale, bias):
        dtype = compute_dtype(x)
        ctx.save_for_backward(q, scale)
        return F.linear(x.to(dtype), dequantize(q, scale, dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        q, scale = ctx.saved_tensors
        return grad @ dequantize(q, scale, grad.dtype), None, None, None  # frozen: no gradient for q, s or b


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q, scale, bias, stride, padding, dilation, groups):
        dtype = compute_dtype(x)
        ctx.save_for_backward(q, scale)
        ctx.shape, ctx.args = x.shape, (stride, padding, dilation, groups)
        return F.conv2d(x.to(dtype), dequantize(q, scale, dtype), None if bias is None else bias.to(dtype),
                        stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        q, scale = ctx.saved_tensors
        w = dequantize(q, scale, grad.dtype)
        return (torch.nn.grad.conv2d_input(ctx.shape, w, grad, *ctx.args),) + (None,) * 7


def linear(x, weight, bias, scale=None):
    """F.linear for a plain or an fp8 weight (scale not None): LoRALinear's frozen path (lora.py)."""
    return F.linear(x, weight, bias) if scale is None else _Linear.apply(x, weight, scale, bias)


class Float8Linear(nn.Linear):
    """An nn.Linear whose weight is float8 + `weight_scale`; the same names, so the checkpoint keys stay."""

    def forward(self, x):
        return _Linear.apply(x, self.weight, self.weight_scale, self.bias)


class Float8Conv2d(nn.Conv2d):
    def forward(self, x):
        if self.padding_mode != "zeros":
            raise NotImplementedError("fp8 Conv2d supports padding_mode 'zeros' (SDXL's) only")
        return _Conv2d.apply(x, self.weight, self.weight_scale, self.bias, self.stride, self.padding,
                             self.dilation, self.groups)


def quantize_module_(module, dtype=None):
    """An nn.Linear / nn.Conv2d in place -> its float8 class, weight -> (q, weight_scale). Its other tensors stay.
    `compute_dtype` (default: the weight's dtype now) is what a LoRA on it is made in for inference (lora.py)."""
    module.compute_dtype = dtype or module.weight.dtype
    q, scale = quantize(module.weight)
    module.weight = nn.Parameter(q, requires_grad=False)
    module.register_buffer("weight_scale", scale)
    module.__class__ = Float8Linear if isinstance(module, nn.Linear) else Float8Conv2d
    return module


def quantizable(module):
    return type(module) in (nn.Linear, nn.Conv2d)  # exactly these: a LoRALinear is quantized before injection


def materialize_(model, device, dtype, fp8=False):
    """Move and cast a model tensor by tensor (the old tensor is freed before the next is made, when nothing else
    holds it), quantizing each nn.Linear / nn.Conv2d weight when fp8: the peak never holds a second full copy."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if fp8 and name == "weight" and quantizable(module):
                module.weight = nn.Parameter(p.detach().to(device), requires_grad=False)  # on device, source dtype
                quantize_module_(module, dtype)
            else:
                setattr(module, name, nn.Parameter(p.detach().to(device=device, dtype=dtype), requires_grad=False))
        for name, b in list(module.named_buffers(recurse=False)):
            if name != "weight_scale":  # fp32, as quantize made it
                module._buffers[name] = b.to(device=device, dtype=dtype if b.is_floating_point() else None)
    return model


def frozen_bytes(model):
    """Bytes of a model's parameters and buffers (fp8 weights, their scales, the rest)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
