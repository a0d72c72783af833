"""Building blocks of the MPDiT family: pure ``torch.nn``, no process groups, no I/O.

Shapes and parameter names follow the official MPDiT implementation (github quandao10/MPDiT) so
that its checkpoints map onto these modules one tensor to one tensor (see ``official.py``).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # the flash-attn package: optional, CUDA only
    from flash_attn import flash_attn_qkvpacked_func as _flash_qkvpacked
except Exception:  # noqa: BLE001 - ImportError, or a broken CUDA extension
    _flash_qkvpacked = None

ATTENTION_BACKENDS = ("auto", "flash_attn", "sdpa", "math")


def flash_attn_available() -> bool:
    return _flash_qkvpacked is not None


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation; ``shift``/``scale`` are (N, D) and broadcast over tokens."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


# --------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------

def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table, (grid_size**2, dim), row-major tokens.

    Matches the MAE/DiT table the official code uses: the first half of the channels encodes the
    column (w) coordinate, the second half the row (h) coordinate, each as [sin, cos] over
    frequencies 1 / 10000**(k / (dim/4)). Computed in float64 and rounded to float32, as there.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


# --------------------------------------------------------------------------------------------
# Embedders
# --------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens: (N, C, H, W) -> (N, H*W/p^2, D), row-major."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)

    def reset_parameters(self) -> None:
        w = self.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.proj.bias)


class LabelEmbedder(nn.Module):
    """Multi-token class embedding: one row of K x D per class, plus the null class for CFG.

    The null (unconditional) class is index ``num_classes``. Class dropout is the training
    objective's business (``mpdit_dist.flow``), not the model's.
    """

    def __init__(self, num_classes: int, dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.embedding_table = nn.Embedding(num_classes + 1, dim * num_tokens)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        emb = self.embedding_table(labels)
        return emb.view(emb.shape[0], self.num_tokens, -1)


class SinusoidalTimeEmbedder(nn.Module):
    """DiT's embedder: sinusoidal features of t, then Linear-SiLU-Linear."""

    def __init__(self, dim: int, frequency_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(
            -math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t.float()[:, None] * freqs[None]
        feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.frequency_dim % 2:
            feats = F.pad(feats, (0, 1))
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class SpectralConv1d(nn.Module):
    """Fourier layer of an FNO: keep the lowest ``modes`` frequencies, mix channels per mode.

    The FFT and the complex products always run in fp32, also under autocast.
    """

    def __init__(self, in_channels: int, out_channels: int, modes: int):
        super().__init__()
        self.out_channels = out_channels
        self.modes = modes
        self.weights_real = nn.Parameter(torch.randn(in_channels, out_channels, modes))
        self.weights_imag = nn.Parameter(torch.randn(in_channels, out_channels, modes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        if self.modes > n // 2 + 1:
            raise ValueError(f"SpectralConv1d: {self.modes} modes exceed the {n // 2 + 1} of a {n}-point grid")
        with torch.autocast(device_type=x.device.type, enabled=False):
            spec = torch.fft.rfft(x.float(), dim=-1)[..., : self.modes]
            weight = torch.complex(self.weights_real.float(), self.weights_imag.float())
            mixed = torch.einsum("bim,iom->bom", spec, weight)
            # the frequencies above `modes` are zero: irfft pads the spectrum for us
            out = torch.fft.irfft(mixed, n=n, dim=-1)
        return out.to(x.dtype)


class FNOTimeEmbedder(nn.Module):
    """The paper's Fourier-neural-operator time embedder.

    t is lifted on a ``grid_size``-point grid spanning [t - 1, t + 1]; three Fourier layers (with
    1x1 convolutions beside them, GELU between), a mean over the grid and a projection to D.
    """

    def __init__(self, dim: int, modes: int = 16, width: int = 32, grid_size: int = 32):
        super().__init__()
        self.grid_size = grid_size
        self.fc0 = nn.Linear(1, width)
        self.conv0 = SpectralConv1d(width, width, modes)
        self.conv1 = SpectralConv1d(width, width, modes)
        self.conv2 = SpectralConv1d(width, width, modes)
        self.w0 = nn.Conv1d(width, width, 1)
        self.w1 = nn.Conv1d(width, width, 1)
        self.w2 = nn.Conv1d(width, width, 1)
        self.fc1 = nn.Linear(width, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        offsets = torch.linspace(-1.0, 1.0, self.grid_size, device=t.device, dtype=torch.float32)
        grid = t.float()[:, None] + offsets[None, :]  # (N, G)
        h = self.fc0(grid.unsqueeze(-1).to(self.fc0.weight.dtype)).transpose(1, 2)  # (N, width, G)
        h = F.gelu(self.conv0(h) + self.w0(h))
        h = F.gelu(self.conv1(h) + self.w1(h))
        h = self.conv2(h) + self.w2(h)
        return self.fc1(h.mean(dim=-1))


# --------------------------------------------------------------------------------------------
# Transformer block
# --------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention with a fused QKV projection and a choice of kernels.

    ``backend``: ``flash_attn`` (the flash-attn package), ``sdpa`` (torch SDPA, which itself
    dispatches to flash / cuDNN / memory-efficient kernels on GPUs), ``math`` (explicit softmax),
    or ``auto``: flash-attn where importable on CUDA in fp16/bf16, else SDPA. The choice depends
    only on device and dtype, never on data, so it is stable under torch.compile.
    """

    def __init__(self, dim: int, num_heads: int, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} does not divide the width {dim}")
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
        if backend == "flash_attn" and _flash_qkvpacked is None:
            raise ValueError("attention='flash_attn' but the flash-attn package is not importable")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def _use_flash(self, x: torch.Tensor) -> bool:
        if self.backend == "flash_attn":
            return True
        return (
            self.backend == "auto"
            and _flash_qkvpacked is not None
            and x.is_cuda
            and x.dtype in (torch.float16, torch.bfloat16)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim)
        if self._use_flash(qkv):
            out = _flash_qkvpacked(qkv)  # (B, N, H, Dh): no transposes needed
            return self.proj(out.reshape(b, n, d))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, Dh)
        if self.backend == "math":
            attn = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
            out = attn.float().softmax(dim=-1).to(v.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=True)
        self.fc2 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose modulation comes from outside (shared adaLN).

    ``mod`` is (N, 6, D): shift/scale/gate for attention, then shift/scale/gate for the MLP.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attention: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, backend=attention)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.unbind(1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        x = x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x


# --------------------------------------------------------------------------------------------
# Between stages and at the end
# --------------------------------------------------------------------------------------------

class TokenUpsampler(nn.Module):
    """Coarse tokens -> f x f finer tokens: Linear to D*f^2, pixel shuffle, tanh-GELU; then all
    tokens (class tokens too) go through LayerNorm and a Linear refinement."""

    def __init__(self, dim: int, factor: int):
        super().__init__()
        self.factor = factor
        self.proj = nn.Linear(dim, dim * factor * factor, bias=True)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.refine = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, num_cond_tokens: int, grid: int) -> torch.Tensor:
        """x: (N, K + grid^2, D) -> (N, K + (grid*f)^2, D)."""
        b, _, d = x.shape
        f = self.factor
        cond, spatial = x[:, :num_cond_tokens], x[:, num_cond_tokens:]
        # channel index of proj's output is (d, row offset, col offset), as the official code
        up = self.proj(spatial).view(b, grid, grid, d, f, f)
        up = up.permute(0, 1, 4, 2, 5, 3).reshape(b, grid * f * grid * f, d)
        up = F.gelu(up, approximate="tanh")
        return self.refine(self.norm(torch.cat([cond, up], dim=1)))


class FinalLayer(nn.Module):
    """LayerNorm modulated by the shared MLP shift/scale, then Linear to p*p*C per token."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels, bias=True)

    def forward(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        return self.linear(modulate(self.norm_final(x), mod[:, 3], mod[:, 4]))
