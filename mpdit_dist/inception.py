"""The Inception network ADM's evaluator uses, in PyTorch, with its pool, spatial and logit outputs.

ADM (openai/guided-diffusion ``evaluations/evaluator.py``) evaluates with the TensorFlow graph
``classify_image_graph_def.pb`` of 2015-12-05 (the graph of TTUR's official FID). Its PyTorch port
is the "FID Inception" of pytorch-fid / torch-fidelity: an InceptionV3 with 1008 logits whose
35x35, 17x17 and last two 8x8 blocks pool like the TF graph does (average pools ignore the zero
padding; the very last block max-pools). This module is our own implementation of that network;
its state-dict names equal those of pytorch-fid's weights file
``pt_inception-2015-12-05-6726825d.pth``, so that file loads as it is.

What ADM reads from the graph, and what :class:`InceptionFeatures` returns:

- ``pool``: ``pool_3`` (2048 values per image), the input of FID, precision and recall;
- ``spatial``: ``mixed_6/conv`` -- the ReLU output of the 1x1 branch of the 7th mixed block
  (``Mixed_6d.branch1x1``, 17x17x192 at 299x299), first 7 channels, flattened in TF's NHWC order:
  7*17*17 = 2023 values, the input of sFID;
- ``logits``: ``pool @ W`` with the graph's ``softmax/logits/MatMul`` weight and *no bias*, which is
  what ADM's ``_create_softmax_graph`` feeds to its softmax for the Inception Score.

Pre-processing follows the graph: images as floats on the 0..255 scale, resized to 299x299 with
TF1's ``ResizeBilinear`` (``align_corners=False`` without half-pixel centres, which is *not*
``torch.nn.functional.interpolate(mode="bilinear")``), then ``(x - 128) / 128``.

Nothing is downloaded here: :func:`load_feature_net` reads a local file the user names.
"""
from __future__ import annotations

import hashlib
import warnings
import zipfile
from pathlib import Path
from typing import NamedTuple, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILE
)
ADM_INPUT_SIZE = 299
# The smallest square input the architecture accepts (the 8x8 stage shrinks to 1x1).
MIN_INPUT_SIZE = 75
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
NUM_LOGITS = 1008
POOL_DIM = 2048

_WEIGHTS_HELP = (
    "ADM's metrics need the 2015-12-05 TensorFlow Inception graph ported to PyTorch: the "
    f"pytorch-fid weights file '{FID_WEIGHTS_FILE}' ({FID_WEIGHTS_URL}). Download it once and pass "
    "its local path (CLI: --inception PATH; config: train.eval_inception). Nothing is downloaded "
    "at run time."
)


class FeatureNetError(ValueError):
    """The feature network's weights file is missing or does not fit the FID-Inception layout."""


class InceptionOutput(NamedTuple):
    pool: torch.Tensor  # (N, 2048) pool_3
    spatial: torch.Tensor  # (N, 7 * h * w) mixed_6/conv[..., :7], NHWC-flattened
    logits: torch.Tensor  # (N, 1008)


class _ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, as in the TF graph) -> ReLU; names as pytorch-fid."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TF's SAME average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _Mixed35(nn.Module):
    """35x35 mixed block (TF ``mixed``, ``mixed_1``, ``mixed_2``)."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 64, 1)
        self.branch5x5_1 = _ConvBN(cin, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class _Reduce35to17(nn.Module):
    """Grid reduction 35 -> 17 (TF ``mixed_3``)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class _Mixed17(nn.Module):
    """17x17 mixed block with factorised 7x7 convolutions (TF ``mixed_4`` .. ``mixed_7``)."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 192, 1)
        self.branch7x7_1 = _ConvBN(cin, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward_with_1x1(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block output and its 1x1 branch (ADM's spatial features are this branch)."""
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        return torch.cat([b1, b7, bd, self.branch_pool(_tf_avg_pool(x))], 1), b1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_1x1(x)[0]


class _Reduce17to8(nn.Module):
    """Grid reduction 17 -> 8 (TF ``mixed_8``)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = _ConvBN(cin, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class _Mixed8(nn.Module):
    """8x8 mixed block (TF ``mixed_9``, ``mixed_10``). The TF graph's last block max-pools."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = _ConvBN(cin, 320, 1)
        self.branch3x3_1 = _ConvBN(cin, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


def resize_bilinear_tf1(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize NCHW floats like TF1 ``tf.image.resize_bilinear`` (align_corners=False).

    TF1 maps output pixel ``i`` to source coordinate ``i * in/out`` (no half-pixel offset), so
    the image is anchored at the top-left corner; torch's ``interpolate`` uses half-pixel centres
    and gives different pixels. Written by hand because no library offers this legacy mode.
    """
    out_h, out_w = size
    in_h, in_w = x.shape[-2:]
    if (in_h, in_w) == (out_h, out_w):
        return x

    def axis(in_size: int, out_size: int):
        # float32 arithmetic, as in TF's kernel, so the interpolation weights match bit for bit
        scale = torch.tensor(in_size / out_size, dtype=torch.float32)
        src = torch.arange(out_size, dtype=torch.float32) * scale
        lower = torch.floor(src)
        upper = torch.clamp(torch.ceil(src), max=in_size - 1)
        return lower.long().to(x.device), upper.long().to(x.device), (src - lower).to(x.device, x.dtype)

    y0, y1, wy = axis(in_h, out_h)
    x0, x1, wx = axis(in_w, out_w)
    top, bottom = x.index_select(-2, y0), x.index_select(-2, y1)
    wx = wx.view(1, 1, 1, -1)
    top_left, top_right = top.index_select(-1, x0), top.index_select(-1, x1)
    bottom_left, bottom_right = bottom.index_select(-1, x0), bottom.index_select(-1, x1)
    top = top_left + (top_right - top_left) * wx
    bottom = bottom_left + (bottom_right - bottom_left) * wx
    return top + (bottom - top) * wy.view(1, 1, -1, 1)


class InceptionFeatures(nn.Module):
    """FID-Inception (the 2015-12-05 TF graph) returning ``InceptionOutput(pool, spatial, logits)``.

    Sub-module names equal the pytorch-fid weights file's, so its state dict loads directly; use
    :func:`load_feature_net` to build one from a file, :func:`random_feature_net` for tests.

    Args:
        input_size: images are resized to ``input_size`` squared with TF1 bilinear resizing.
            ADM uses 299; ``None`` feeds images at their own size (at least 75x75). Any other value
            gives features that are *not* comparable with ADM's (tests use small sizes for speed).
        logits_with_bias: add ``fc.bias`` to the logits. ADM's Inception Score uses the graph's
            MatMul without the bias, so the default is False.

    Input of :meth:`forward`: a uint8 tensor ``(N, H, W, 3)`` (ADM's npz layout) or a float tensor
    ``(N, 3, H, W)`` with values on the 0..255 scale (what ADM feeds its graph).
    """

    def __init__(self, input_size: Optional[int] = ADM_INPUT_SIZE, logits_with_bias: bool = False):
        super().__init__()
        if input_size is not None and input_size < MIN_INPUT_SIZE:
            raise ValueError(f"input_size={input_size}: the network needs at least {MIN_INPUT_SIZE}")
        self.input_size = input_size
        self.logits_with_bias = logits_with_bias
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _Mixed35(192, pool_features=32)
        self.Mixed_5c = _Mixed35(256, pool_features=64)
        self.Mixed_5d = _Mixed35(288, pool_features=64)
        self.Mixed_6a = _Reduce35to17(288)
        self.Mixed_6b = _Mixed17(768, c7=128)
        self.Mixed_6c = _Mixed17(768, c7=160)
        self.Mixed_6d = _Mixed17(768, c7=160)
        self.Mixed_6e = _Mixed17(768, c7=192)
        self.Mixed_7a = _Reduce17to8(768)
        self.Mixed_7b = _Mixed8(1280, pool="avg")
        self.Mixed_7c = _Mixed8(2048, pool="max")
        self.fc = nn.Linear(POOL_DIM, NUM_LOGITS)
        self._checksum: Optional[str] = None

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC or float NCHW (0..255) -> resized, normalised float32 NCHW."""
        if images.ndim != 4:
            raise ValueError(f"expected a batch of images (4 dims), got shape {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            if images.shape[-1] != 3:
                raise ValueError(f"uint8 images must be (N, H, W, 3), got {tuple(images.shape)}")
            x = images.permute(0, 3, 1, 2).float()
        elif images.is_floating_point():
            if images.shape[1] != 3:
                raise ValueError(f"float images must be (N, 3, H, W), got {tuple(images.shape)}")
            x = images.float()
        else:
            raise ValueError(f"images must be uint8 or float, got {images.dtype}")
        if self.input_size is not None:
            x = resize_bilinear_tf1(x, (self.input_size, self.input_size))
        elif min(x.shape[-2:]) < MIN_INPUT_SIZE:
            raise ValueError(
                f"images of {tuple(x.shape[-2:])} are below the network's minimum "
                f"{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}; set input_size"
            )
        return (x - 128.0) / 128.0

    def forward(self, images: torch.Tensor) -> InceptionOutput:
        x = self.preprocess(images)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
        x = self.Mixed_6c(self.Mixed_6b(x))
        x, branch = self.Mixed_6d.forward_with_1x1(x)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
        pool = x.mean(dim=(2, 3))  # pool_3: 8x8 average at 299x299
        # TF is NHWC: ADM's reshape of spatial[..., :7] runs channels fastest
        spatial = branch[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        logits = F.linear(pool, self.fc.weight, self.fc.bias if self.logits_with_bias else None)
        return InceptionOutput(pool, spatial, logits)

    def spatial_dim(self, image_size: Optional[tuple[int, int]] = None) -> int:
        """Length of the spatial feature for images of ``image_size`` (2023 at 299x299)."""
        if self.input_size is not None:
            image_size = (self.input_size, self.input_size)
        if image_size is None:
            raise ValueError("image_size is needed when input_size is None")

        def grid(n: int) -> int:
            n = (n - 3) // 2 + 1  # Conv2d_1a (stride 2)
            n = n - 2  # Conv2d_2a
            n = (n - 3) // 2 + 1  # max pool
            n = n - 2  # Conv2d_4a
            n = (n - 3) // 2 + 1  # max pool
            return (n - 3) // 2 + 1  # Mixed_6a

        return SPATIAL_CHANNELS * grid(image_size[0]) * grid(image_size[1])

    def checksum(self) -> str:
        """SHA-256 of the weights and of the settings that change the features.

        Keys the reference-statistics cache. Computed once and remembered: change the weights of
        a network after calling this and the cache key goes stale.
        """
        if self._checksum is None:
            digest = hashlib.sha256()
            digest.update(
                f"fid-inception-2015-12-05;input_size={self.input_size};"
                f"logits_with_bias={self.logits_with_bias};spatial=Mixed_6d.branch1x1[:7]".encode()
            )
            for name, tensor in sorted(self.state_dict().items()):
                if name.endswith("num_batches_tracked"):
                    continue  # a training counter; does not touch the features
                t = tensor.detach().to("cpu").contiguous().reshape(-1)
                digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(t.view(torch.uint8).numpy().tobytes())
            self._checksum = digest.hexdigest()
        return self._checksum


def _is_torchscript(path: Path) -> bool:
    # a TorchScript archive is a zip holding compiled code next to its pickled constants
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in archive.namelist())


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict (pytorch-fid's file) or the state dict of a TorchScript module."""
    try:
        if _is_torchscript(path):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.10 deprecates TorchScript
                obj = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as load_error:
        raise FeatureNetError(
            f"{path}: neither a PyTorch state-dict file nor a TorchScript module "
            f"({type(load_error).__name__}: {load_error}). {_WEIGHTS_HELP}"
        ) from load_error
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FeatureNetError(f"{path}: expected a mapping of tensor names to tensors. {_WEIGHTS_HELP}")
    return dict(obj)


def load_feature_net(
    path: Union[str, Path, None],
    device: Union[str, torch.device] = "cpu",
    input_size: Optional[int] = ADM_INPUT_SIZE,
) -> InceptionFeatures:
    """Build :class:`InceptionFeatures` from a local weights file, in eval mode on ``device``.

    ``path`` is pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (or any file, plain state
    dict or TorchScript, holding the same tensor names and shapes). Raises :class:`FeatureNetError`
    naming the file and saying where to get the right one when it is missing or does not fit.
    """
    if path is None or str(path) == "":
        raise FeatureNetError(f"No Inception weights file given. {_WEIGHTS_HELP}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FeatureNetError(f"Inception weights file {path} does not exist. {_WEIGHTS_HELP}")
    state = _read_state_dict(path)
    net = InceptionFeatures(input_size=input_size)
    expected = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in set(state) - set(expected) if not k.endswith("num_batches_tracked"))
    wrong_shape = sorted(
        f"{k}: file {tuple(state[k].shape)} vs network {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    )
    if missing or unexpected or wrong_shape:
        details = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if items:
                details.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
        raise FeatureNetError(
            f"{path} does not hold the FID-Inception weights: {'; '.join(details)}. {_WEIGHTS_HELP}"
        )
    not_finite = sorted(k for k in expected if state[k].is_floating_point() and not torch.isfinite(state[k]).all())
    if not_finite:
        raise FeatureNetError(
            f"{path}: {len(not_finite)} tensors hold NaN or infinite values (e.g. {', '.join(not_finite[:3])}): "
            f"a damaged file. {_WEIGHTS_HELP}"
        )
    # num_batches_tracked may be absent from the file (the TF conversion has none); keep ours
    net.load_state_dict({k: state[k] for k in expected}, strict=False)
    net.checksum()  # of the weights just read, before anyone can touch them
    return net.eval().requires_grad_(False).to(device)


def random_feature_net(
    seed: int = 0,
    input_size: Optional[int] = MIN_INPUT_SIZE,
    device: Union[str, torch.device] = "cpu",
) -> InceptionFeatures:
    """A randomly initialised :class:`InceptionFeatures` for tests and demos (same every call).

    Variance-preserving (He) initialisation keeps activations of order one through the 90-odd
    layers, so features, covariances and softmaxes are well conditioned. The default input size
    is the smallest the network takes (75), 16x cheaper than 299 on CPU.
    """
    net = InceptionFeatures(input_size=input_size)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()
        net.fc.weight.copy_(torch.randn(net.fc.weight.shape, generator=gen) * (4.0 / POOL_DIM) ** 0.5)
        net.fc.bias.zero_()
    return net.eval().requires_grad_(False).to(device)
