"""MFU peaks (the H200 NVL card has its own bf16 peak, not the SXM H200's), and the FLOP count
against torch's FLOP counter."""
from mpdit_dist.flops import device_peak_flops


def test_h200_nvl_peak_is_not_the_sxm_peak():
    assert device_peak_flops("NVIDIA H200") == 989e12
    assert device_peak_flops("NVIDIA H200 NVL") == 835e12
    assert device_peak_flops("NVIDIA GH200 480GB") == 989e12


# ------------------------------------------------------------------------------------------------
# The analytic count against torch's own FLOP counter
# ------------------------------------------------------------------------------------------------

import pytest  # noqa: E402
import torch  # noqa: E402

from mpdit_dist.flops import count_flops  # noqa: E402
from mpdit_dist.models import MODEL_CONFIGS, MPDiT, model_args  # noqa: E402


def _counted_macs_per_image(args, device: str = "meta") -> float:
    """Multiply-adds of one forward per image, as ``torch.utils.flop_counter`` counts them (2 FLOPs
    each); on the meta device only the shapes are computed. Attention through SDPA's math kernel,
    which the counter sees as two batched products."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    n = 2
    with torch.device(device):
        model = MPDiT(args).eval()
        x, t, y = torch.randn(n, args.in_channels, args.input_size, args.input_size), torch.rand(n), torch.arange(n)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    return counter.get_total_flops() / 2 / n


# every named model at 256 and 512 px
SIZES = [(n, size) for size in (32, 64) for n in sorted(MODEL_CONFIGS)]


@pytest.mark.parametrize("name, input_size", SIZES)
def test_forward_macs_are_what_torch_counts(name, input_size):
    """``mpdit_dist.flops`` (the paper's GFLOPs and every MFU figure) counts exactly the matrix
    products of the real forward, at every named depth and stage schedule (the width shrunk: the
    count is checked, not the cost). With the MLP time embedding: the FNO one is below."""
    args = model_args(name, hidden_size=32, num_heads=2, input_size=input_size, time_embed="mlp")
    ours, counted = count_flops(args).forward_macs, _counted_macs_per_image(args)
    assert counted == ours, f"{name} at {input_size}: torch counts {counted:.0f}, we {ours}"


def test_fno_time_embedding_adds_only_its_small_spectral_product():
    """With the FNO time embedder (the paper's) torch's counter also sees its spectral product,
    which the analytic count leaves out with the other work outside linear layers: 49,152
    multiply-adds per image (its 32-point grid, independent of the width), 0.06% at this width, a
    millionth of MPDiT-XL/4x at full width. (On the CPU: the embedder's autocast does not run on the
    meta device.)"""
    args = model_args("MPDiT-XL/4x", hidden_size=32, num_heads=2, time_embed="fno")
    ours, counted = count_flops(args).forward_macs, _counted_macs_per_image(args, device="cpu")
    assert counted - ours == 49_152, f"torch counts {counted:.0f}, we {ours}"
