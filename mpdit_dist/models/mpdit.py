"""The MPDiT model family: one multi-patch transformer defined by a stage schedule.

A schedule lists (patch size, depth) from coarse to fine, e.g. ``((4, 22), (2, 6))`` for
MPDiT-XL/4x: 22 blocks on 4x4 patches (64 tokens at 256 px), then a token upsampler and 6 blocks
on 2x2 patches (256 tokens). A single stage ``((2, 28),)`` is a dense DiT with the same
conditioning (the paper's DiT-dagger rows).

Pure ``torch.nn``: no process groups, no files, no config parsing. Each block and each stage is
its own module, so activation checkpointing, compile and FSDP can wrap them from outside.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from .layers import (
    ATTENTION_BACKENDS,
    DiTBlock,
    FinalLayer,
    FNOTimeEmbedder,
    LabelEmbedder,
    PatchEmbed,
    SinusoidalTimeEmbedder,
    TokenUpsampler,
    sincos_pos_embed_2d,
)

TIME_EMBEDDINGS = ("fno", "mlp")


@dataclass(frozen=True)
class ModelArgs:
    """Everything that defines an MPDiT architecture (and nothing else)."""

    stages: tuple[tuple[int, int], ...] = ((4, 22), (2, 6))
    hidden_size: int = 1152
    num_heads: int = 16
    mlp_ratio: float = 4.0
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    num_condition_tokens: int = 16
    time_embed: str = "fno"
    skip_connection: bool = True
    attention: str = "auto"

    def __post_init__(self) -> None:
        stages = tuple((int(p), int(d)) for p, d in self.stages)
        object.__setattr__(self, "stages", stages)
        self.validate()

    def validate(self) -> None:
        if not self.stages:
            raise ValueError("model stages: need at least one (patch_size, depth) stage")
        prev = None
        for i, (p, d) in enumerate(self.stages):
            if p < 1 or d < 0:
                raise ValueError(f"model stages[{i}] = ({p}, {d}): patch size must be >= 1 and depth >= 0")
            if self.input_size % p:
                raise ValueError(
                    f"model input_size={self.input_size} is not divisible by stages[{i}] patch size {p}"
                )
            if prev is not None and (p >= prev or prev % p):
                raise ValueError(
                    f"model stages: patch sizes must shrink by integer factors from coarse to fine, "
                    f"got {prev} then {p} at stages[{i}]"
                )
            prev = p
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model num_heads={self.num_heads} does not divide hidden_size={self.hidden_size}"
            )
        if self.hidden_size % 4:
            raise ValueError(f"model hidden_size={self.hidden_size} must be divisible by 4 (sin-cos positions)")
        if self.time_embed not in TIME_EMBEDDINGS:
            raise ValueError(f"model time_embed={self.time_embed!r}: choose one of {TIME_EMBEDDINGS}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"model attention={self.attention!r}: choose one of {ATTENTION_BACKENDS}")
        if self.num_condition_tokens < 1:
            raise ValueError(f"model num_condition_tokens={self.num_condition_tokens} must be >= 1")

    @property
    def depth(self) -> int:
        return sum(d for _, d in self.stages)

    def tokens_per_stage(self) -> list[int]:
        """Spatial tokens (class tokens excluded) each stage's blocks see."""
        return [(self.input_size // p) ** 2 for p, _ in self.stages]

    def differences(self, other: "ModelArgs", ignore: tuple[str, ...] = ("attention",)) -> dict[str, tuple[Any, Any]]:
        """The fields outside ``ignore`` in which ``other`` differs: name -> (this value, other's).
        By default ``attention`` is ignored: a choice of kernel, not of weights."""
        return {f: (getattr(self, f), getattr(other, f)) for f in self.__dataclass_fields__
                if f not in ignore and getattr(self, f) != getattr(other, f)}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stages"] = [list(s) for s in self.stages]
        return d


class Stage(nn.Module):
    """One resolution level: its entry (patch embedding, or upsampler + skip) and its blocks."""

    def __init__(self, args: ModelArgs, index: int):
        super().__init__()
        patch, depth = args.stages[index]
        d = args.hidden_size
        self.index = index
        self.patch_size = patch
        self.grid = args.input_size // patch
        self.num_cond_tokens = args.num_condition_tokens
        if index == 0:
            self.patch_embed = PatchEmbed(patch, args.in_channels, d)
        else:
            prev_patch = args.stages[index - 1][0]
            self.prev_grid = args.input_size // prev_patch
            self.upsampler = TokenUpsampler(d, prev_patch // patch)
            if args.skip_connection:
                self.skip_embed = PatchEmbed(patch, args.in_channels, d)
                self.skip_proj = nn.Linear(d, d, bias=True)
        self.skip_connection = args.skip_connection
        # fixed positions: a buffer, never trained, rebuilt at construction (not checkpointed)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(d, self.grid)[None], persistent=False)
        self.blocks = nn.ModuleList(
            DiTBlock(d, args.num_heads, args.mlp_ratio, attention=args.attention) for _ in range(depth)
        )

    def enter(self, h: torch.Tensor | None, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Tokens entering this stage's blocks: (N, K + grid^2, D)."""
        k = self.num_cond_tokens
        # the fp32 position buffer follows x, which carries the weights' dtype (MPDiT.forward's
        # cast, FSDP2's input cast): a no-op with fp32 weights; bf16 under DeepSpeed's bf16 mode,
        # whose engine leaves buffers in fp32 and autocast off
        pos = self.pos_embed.to(x.dtype)
        if self.index == 0:
            spatial = self.patch_embed(x) + pos
            return torch.cat([cond, spatial], dim=1)
        h = self.upsampler(h, k, self.prev_grid)
        spatial = h[:, k:]
        if self.skip_connection:
            spatial = spatial + self.skip_proj(self.skip_embed(x))
        return torch.cat([h[:, :k], spatial + pos], dim=1)

    def forward(self, h: torch.Tensor | None, x: torch.Tensor, cond: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        h = self.enter(h, x, cond)
        for block in self.blocks:
            h = block(h, mod)
        return h


class MPDiT(nn.Module):
    """Multi-patch diffusion transformer. ``model(x, t, y) -> velocity``.

    x: (N, C, H, W) latents; t: (N,) float in [0, 1] (t = 1 is noise); y: (N,) long class labels,
    ``num_classes`` being the null class used for classifier-free guidance.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        d = args.hidden_size
        self.in_channels = args.in_channels
        self.out_channels = args.in_channels
        self.num_classes = args.num_classes
        self.num_condition_tokens = args.num_condition_tokens
        if args.time_embed == "fno":
            self.t_embedder = FNOTimeEmbedder(d, modes=16, width=32, grid_size=32)
        else:
            self.t_embedder = SinusoidalTimeEmbedder(d)
        self.y_embedder = LabelEmbedder(args.num_classes, d, args.num_condition_tokens)
        # the paper's shared adaLN: one modulation for every block, computed once per forward
        self.time_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d, bias=True))
        self.stages = nn.ModuleList(Stage(args, i) for i in range(len(args.stages)))
        self.final_patch = args.stages[-1][0]
        self.final_layer = FinalLayer(d, self.final_patch, self.out_channels)
        self.initialize_weights()

    # ----------------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """As the official code: xavier-uniform Linear and patch-embedding weights, zero biases,
        N(0, 0.02) class table (and sinusoidal-MLP weights), zeroed modulation and output layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, PatchEmbed):
                m.reset_parameters()
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        if isinstance(self.t_embedder, SinusoidalTimeEmbedder):
            nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.time_modulation[-1].weight)
        nn.init.zeros_(self.time_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def blocks(self) -> list[DiTBlock]:
        """All transformer blocks, coarse stage first."""
        return [b for s in self.stages for b in s.blocks]

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W); per-token channel order (p_row, p_col, C)."""
        n, p, c = tokens.shape[0], self.final_patch, self.out_channels
        g = self.args.input_size // p
        x = tokens.reshape(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(n, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d = self.args.hidden_size
        # low-precision weights without autocast (DeepSpeed's bf16 mode switches an outer autocast
        # off inside its engine): bring the input to the weights' dtype; a no-op in fp32
        x = x.to(self.final_layer.linear.weight.dtype)
        mod = self.time_modulation(self.t_embedder(t)).view(-1, 6, d)
        cond = self.y_embedder(y)
        h = None
        for stage in self.stages:
            h = stage(h, x, cond, mod)
        out = self.final_layer(h[:, self.num_condition_tokens :], mod)
        return self.unpatchify(out)


# --------------------------------------------------------------------------------------------
# Named configurations
# --------------------------------------------------------------------------------------------

def _cfg(stages, width, heads):
    return {"stages": tuple(stages), "hidden_size": width, "num_heads": heads}


MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    # MPDiT: one upsampling level (patch 4 -> 2)
    "MPDiT-B/4x": _cfg([(4, 6), (2, 6)], 768, 12),
    "MPDiT-L/4x": _cfg([(4, 18), (2, 6)], 1024, 16),
    "MPDiT-XL/4x": _cfg([(4, 22), (2, 6)], 1152, 16),
    # MPDiTv2: two upsampling levels (patch 8 -> 4 -> 2)
    "MPDiTv2-B": _cfg([(8, 6), (4, 4), (2, 2)], 768, 12),
    "MPDiTv2-L": _cfg([(8, 14), (4, 6), (2, 4)], 1024, 16),
    "MPDiTv2-XL": _cfg([(8, 14), (4, 8), (2, 6)], 1152, 16),
    # dense baselines with the same conditioning (class tokens, shared adaLN, FNO)
    "DiT-S/2": _cfg([(2, 12)], 384, 6),
    "DiT-B/2": _cfg([(2, 12)], 768, 12),
    "DiT-L/2": _cfg([(2, 24)], 1024, 16),
    "DiT-XL/2": _cfg([(2, 28)], 1152, 16),
}


def model_args(name: str = "custom", **overrides: Any) -> ModelArgs:
    """Resolve a named config (or ``custom``) plus overrides into ``ModelArgs``."""
    if name == "custom":
        base: dict[str, Any] = {}
    elif name in MODEL_CONFIGS:
        base = dict(MODEL_CONFIGS[name])
    else:
        known = ", ".join(sorted(MODEL_CONFIGS))
        raise ValueError(f"unknown model name {name!r}; known: {known}, or 'custom' with a stage schedule")
    fields = set(ModelArgs.__dataclass_fields__)
    unknown = sorted(k for k in overrides if k not in fields)
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; known: {sorted(fields)}")
    base.update({k: v for k, v in overrides.items() if v is not None})
    return ModelArgs(**base)


def create_model(name: str = "custom", **overrides: Any) -> MPDiT:
    """Build a model by name (see ``MODEL_CONFIGS``) with optional overrides, e.g.
    ``create_model("MPDiT-XL/4x", input_size=64)`` or
    ``create_model("custom", stages=[(4, 3), (2, 2)], hidden_size=96, num_heads=4)``."""
    return MPDiT(model_args(name, **overrides))


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = ["MPDiT", "ModelArgs", "MODEL_CONFIGS", "Stage", "create_model", "model_args", "count_parameters"]
