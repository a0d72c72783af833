"""Parameter and FLOP accounting per stage, and MFU.

How we count (the DiT paper's "GFLOPs" convention, which is fvcore's): one multiply-add = one
FLOP, matrix products only (linear layers, patch embeddings, the two attention products QK^T and
AV). Elementwise work (LayerNorm, GELU, modulation, softmax) and the FNO time embedder's FFTs are
not counted; they are < 0.5% of the total at these sizes. Per image, a block on T tokens (class
tokens included) of width D with MLP ratio r costs ``(4 + 2r) T D^2 + 2 T^2 D`` multiply-adds.
The count equals what ``torch.utils.flop_counter`` counts in the real forward of every named model
with the MLP time embedder; the FNO one adds its spectral product, 49,152 multiply-adds per image
(``tests/unit/test_flops_peaks.py``).

Training FLOPs (for MFU) are hardware FLOPs of the matrix products: 2 per multiply-add, times 3
for forward + backward (the backward pass computes two products per forward product).

``python -m mpdit_dist.flops MPDiT-XL/4x --resolution 256``
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

from .config import refuse_below_one
from .models import MODEL_CONFIGS, ModelArgs, model_args

# Dense bf16 matrix-product peaks (FLOP/s) from the spec sheets, for MFU. A key matches a device
# name when its words appear there as whole words, in order ("A10" matches "NVIDIA A10" but neither
# "NVIDIA A100-SXM4-80GB" nor AWS's "NVIDIA A10G", a different chip with its own, unlisted peak);
# the longest matching key wins, so the variants win over their family. MFU is always against
# this bf16 peak, also for fp32 runs.
PEAK_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM (~790e12 is reached in practice)
    "H200": 989e12,  # SXM
    "H200 NVL": 835e12,  # the PCIe card: 1671 TFLOP/s with sparsity, as the H100 NVL
    "GH200": 989e12,  # the Grace Hopper superchip's GPU (matched by substring before: keep it)
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
    "V100": 125e12,
}


@dataclass
class StageFlops:
    patch_size: int
    depth: int
    tokens: int  # spatial tokens
    tokens_with_cond: int
    block_macs: int  # per block, per image
    entry_macs: int  # patch embedding or upsampler + skip
    params: int

    @property
    def macs(self) -> int:
        return self.depth * self.block_macs + self.entry_macs


@dataclass
class FlopReport:
    args: ModelArgs
    stages: list[StageFlops]
    embed_macs: int  # time embedder MLP/FNO linears + shared modulation
    final_macs: int
    params: int

    @property
    def forward_macs(self) -> int:
        """Forward multiply-adds per image (the paper's "GFLOPs" x 1e9)."""
        return sum(s.macs for s in self.stages) + self.embed_macs + self.final_macs

    @property
    def train_flops(self) -> int:
        """Hardware FLOPs of one training step per image: 2 FLOP/MAC x (forward + 2 x backward)."""
        return 6 * self.forward_macs


def _block_macs(tokens: int, d: int, mlp_ratio: float) -> int:
    hidden = int(d * mlp_ratio)
    linear = tokens * (3 * d * d + d * d + 2 * d * hidden)
    attention = 2 * tokens * tokens * d
    return linear + attention


def _block_params(d: int, mlp_ratio: float) -> int:
    hidden = int(d * mlp_ratio)
    return (3 * d * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d)


def count_flops(args: ModelArgs) -> FlopReport:
    d, k, c = args.hidden_size, args.num_condition_tokens, args.in_channels
    stages: list[StageFlops] = []
    prev_tokens = None
    for i, (p, depth) in enumerate(args.stages):
        tokens = (args.input_size // p) ** 2
        t_all = tokens + k
        patch_in = c * p * p
        if i == 0:
            entry = tokens * patch_in * d
            entry_params = patch_in * d + d
        else:
            f = args.stages[i - 1][0] // p
            entry = prev_tokens * d * d * f * f + t_all * d * d  # proj (spatial) + refine (all)
            entry_params = (d * d * f * f + d * f * f) + (d * d + d)
            if args.skip_connection:
                entry += tokens * patch_in * d + tokens * d * d
                entry_params += (patch_in * d + d) + (d * d + d)
        stages.append(
            StageFlops(
                patch_size=p,
                depth=depth,
                tokens=tokens,
                tokens_with_cond=t_all,
                block_macs=_block_macs(t_all, d, args.mlp_ratio),
                entry_macs=entry,
                params=depth * _block_params(d, args.mlp_ratio) + entry_params,
            )
        )
        prev_tokens = tokens
    last_p = args.stages[-1][0]
    final = stages[-1].tokens * d * last_p * last_p * c
    if args.time_embed == "fno":
        width, grid = 32, 32
        t_macs = grid * width + 3 * grid * width * width + width * d  # lift, 1x1 convs, projection
        t_params = (width + width) + 3 * (2 * width * width * 16) + 3 * (width * width + width) + (width * d + d)
    else:
        t_macs = 256 * d + d * d
        t_params = (256 * d + d) + (d * d + d)
    embed = t_macs + d * 6 * d
    params = (
        sum(s.params for s in stages)
        + t_params
        + (args.num_classes + 1) * k * d  # class-token table
        + (6 * d * d + 6 * d)  # shared modulation
        + (d * last_p * last_p * c + last_p * last_p * c)  # final linear
    )
    return FlopReport(args=args, stages=stages, embed_macs=embed, final_macs=final, params=params)


def dense_counterpart(args: ModelArgs) -> ModelArgs:
    """The single-stage DiT of the same width, depth and conditioning at the finest patch size."""
    from dataclasses import replace

    return replace(args, stages=((args.stages[-1][0], args.depth),))


def train_flops_per_image(args: ModelArgs) -> int:
    return count_flops(args).train_flops


def mfu(img_per_s: float, args: ModelArgs, peak_flops_per_device: float, num_devices: int = 1) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the devices' peak."""
    return img_per_s * train_flops_per_image(args) / (peak_flops_per_device * num_devices)


def device_peak_flops(device_name: str | None) -> float | None:
    """Peak dense bf16 FLOP/s for a CUDA device name (e.g. 'NVIDIA H100 80GB HBM3'), if known."""
    if not device_name:
        return None
    words = _words(device_name)
    best: tuple[int, float] | None = None
    for key, value in PEAK_FLOPS.items():
        k = _words(key)
        if any(words[i:i + len(k)] == k for i in range(len(words) - len(k) + 1)):
            if best is None or len(k) > best[0]:
                best = (len(k), value)
    return None if best is None else best[1]


def _words(name: str) -> list[str]:
    """'NVIDIA A100-SXM4-80GB' -> ['nvidia', 'a100', 'sxm4', '80gb']."""
    return [w for w in re.split(r"[\s\-_/]+", name.lower()) if w]


def format_report(name: str, rep: FlopReport) -> str:
    a = rep.args
    lines = [
        f"model {name}: width {a.hidden_size}, heads {a.num_heads}, latent {a.input_size}x{a.input_size}x{a.in_channels}, "
        f"{a.num_condition_tokens} class tokens",
        f"parameters (trainable): {rep.params:,}",
        "",
        f"{'stage':>5} {'patch':>5} {'depth':>5} {'tokens':>7} {'+cls':>5} {'GMACs/block':>12} {'GMACs/stage':>12}",
    ]
    for i, s in enumerate(rep.stages):
        lines.append(
            f"{i:>5} {s.patch_size:>5} {s.depth:>5} {s.tokens:>7} {s.tokens_with_cond:>5} "
            f"{s.block_macs / 1e9:>12.3f} {s.macs / 1e9:>12.2f}"
        )
    lines.append(f"{'embed':>5} {'':>5} {'':>5} {'':>7} {'':>5} {'':>12} {rep.embed_macs / 1e9:>12.3f}")
    lines.append(f"{'final':>5} {'':>5} {'':>5} {'':>7} {'':>5} {'':>12} {rep.final_macs / 1e9:>12.3f}")
    lines.append("")
    lines.append(f"forward GFLOPs per image (multiply-adds, DiT convention): {rep.forward_macs / 1e9:.2f}")
    lines.append(f"training FLOPs per image (2 x 3 x MACs): {rep.train_flops / 1e9:.1f} G")
    if len(a.stages) > 1:
        dense = count_flops(dense_counterpart(a))
        lines.append(
            f"dense DiT of the same width/depth at patch {a.stages[-1][0]}: {dense.forward_macs / 1e9:.2f} GFLOPs; "
            f"ratio {rep.forward_macs / dense.forward_macs:.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help=f"one of {', '.join(MODEL_CONFIGS)}")
    ap.add_argument("--resolution", type=int, default=256, help="image resolution in pixels")
    ap.add_argument("--vae-factor", type=int, default=8, help="pixels per latent cell")
    ap.add_argument("--in-channels", type=int, default=4)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--num-condition-tokens", type=int, default=16)
    args = ap.parse_args(argv)
    if args.model not in MODEL_CONFIGS:
        ap.error(f"unknown model {args.model!r}; choose one of {', '.join(MODEL_CONFIGS)}")
    refuse_below_one(ap, (("--resolution", args.resolution), ("--vae-factor", args.vae_factor),
                          ("--in-channels", args.in_channels), ("--num-classes", args.num_classes),
                          ("--num-condition-tokens", args.num_condition_tokens)))
    if args.resolution % args.vae_factor:
        ap.error(f"--resolution {args.resolution} is not divisible by --vae-factor {args.vae_factor}")
    try:
        margs = model_args(
            args.model,
            input_size=args.resolution // args.vae_factor,
            in_channels=args.in_channels,
            num_classes=args.num_classes,
            num_condition_tokens=args.num_condition_tokens,
        )
    except ValueError as err:  # e.g. a latent size the model's patch sizes do not divide
        ap.error(f"{args.model} at --resolution {args.resolution}: {err}")
    print(format_report(args.model, count_flops(margs)))


if __name__ == "__main__":
    main()
