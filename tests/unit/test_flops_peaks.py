"""MFU peaks: the H200 NVL (PCIe) card has its own bf16 peak, not the SXM H200's."""
from mpdit_dist.flops import device_peak_flops


def test_h200_nvl_peak_is_not_the_sxm_peak():
    assert device_peak_flops("NVIDIA H200") == 989e12
    assert device_peak_flops("NVIDIA H200 NVL") == 835e12
    assert device_peak_flops("NVIDIA GH200 480GB") == 989e12
