"""The FID-Inception feature network: layout, pre-processing, loading, checksums.

Random weights throughout (nothing is downloaded). The real weights file is not available here,
so agreement with pytorch-fid is checked on the architecture with shared random weights.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mpdit_dist.inception import (
    FID_WEIGHTS_FILE,
    FeatureNetError,
    InceptionFeatures,
    load_feature_net,
    random_feature_net,
    resize_bilinear_tf1,
)


@pytest.fixture(scope="module")
def images():
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 20, 24, 3), dtype=np.uint8))


def test_outputs_and_shapes(net, images):
    with torch.inference_mode():
        out = net(images)
    assert out.pool.shape == (3, 2048)
    assert out.spatial.shape == (3, 7 * 3 * 3)  # 75x75 input -> 3x3 grid at mixed_6
    assert out.logits.shape == (3, 1008)
    assert all(torch.isfinite(t).all() for t in out)
    assert out.pool.std() > 1e-3  # random init keeps activations alive through the depth
    # ADM's logits are pool @ W without the bias
    torch.testing.assert_close(out.logits, out.pool @ net.fc.weight.T)
    assert InceptionFeatures().spatial_dim() == 2023  # ADM's sFID size at 299x299


def test_spatial_features_are_first_seven_channels_nhwc(net, images):
    captured = {}
    hook = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.setdefault("map", o))
    try:
        with torch.inference_mode():
            out = net(images)
    finally:
        hook.remove()
    fmap = captured["map"]  # (N, 192, 3, 3)
    # TF's reshape of an NHWC tensor: channel index runs fastest
    assert out.spatial[0, 1].item() == fmap[0, 1, 0, 0].item()
    assert out.spatial[0, 7].item() == fmap[0, 0, 0, 1].item()
    torch.testing.assert_close(out.spatial, fmap[:, :7].permute(0, 2, 3, 1).reshape(3, -1))


def test_uint8_nhwc_and_float_nchw_inputs_agree(net, images):
    with torch.inference_mode():
        a = net(images)
        b = net(images.permute(0, 3, 1, 2).float())
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_preprocess_is_tf_graph_normalisation():
    net = InceptionFeatures(input_size=None)
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).expand(1, 80, 80, 3).contiguous()
    y = net.preprocess(x)
    assert y.shape == (1, 3, 80, 80)
    assert y[0, :, 0, 0].tolist() == [-1.0, 0.0, 127 / 128]
    with pytest.raises(ValueError, match="minimum"):
        net.preprocess(torch.zeros(1, 16, 16, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        net.preprocess(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


def test_resize_is_tf1_legacy_bilinear():
    # TF1 resize_bilinear (align_corners=False) samples source i * in/out, clamping at the edge:
    # 3 -> 6 gives sources 0, .5, 1, 1.5, 2, 2.5
    row = torch.tensor([0.0, 10.0, 20.0]).view(1, 1, 1, 3)
    out = resize_bilinear_tf1(row.expand(1, 1, 3, 3), (3, 6))
    assert out[0, 0, 0].tolist() == [0.0, 5.0, 10.0, 15.0, 20.0, 20.0]
    # torch's half-pixel bilinear is a different resampling (why we do not use it)
    torch_out = F.interpolate(row.expand(1, 1, 3, 3), size=(3, 6), mode="bilinear", align_corners=False)
    assert torch_out[0, 0, 0].tolist() != out[0, 0, 0].tolist()
    # downsampling 4 -> 2 picks sources 0 and 2 exactly
    col = torch.arange(4.0).view(1, 1, 4, 1).expand(1, 1, 4, 4)
    assert resize_bilinear_tf1(col, (2, 4))[0, 0, :, 0].tolist() == [0.0, 2.0]
    same = torch.rand(1, 3, 5, 5)
    assert resize_bilinear_tf1(same, (5, 5)) is same


def test_state_dict_names_match_pytorch_fid_and_outputs_agree(net, images):
    """Load the very same random weights into pytorch-fid's FID-Inception and compare outputs."""
    pfid = pytest.importorskip("pytorch_fid.inception")
    state = net.state_dict()
    original = pfid.load_state_dict_from_url
    # pytorch-fid builds its network then loads weights from a URL: hand it ours instead
    pfid.load_state_dict_from_url = lambda *args, **kwargs: state
    try:
        theirs = pfid.fid_inception_v3().eval()
    finally:
        pfid.load_state_dict_from_url = original
    assert {k: tuple(v.shape) for k, v in theirs.state_dict().items()} == {
        k: tuple(v.shape) for k, v in state.items()
    }
    captured = {}
    theirs.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.setdefault("spatial", o))
    theirs.avgpool.register_forward_hook(lambda m, i, o: captured.setdefault("pool", o))
    with torch.inference_mode():
        x = net.preprocess(images)
        logits = theirs(x)
        ours = net(images)
    torch.testing.assert_close(ours.pool, captured["pool"].flatten(1))
    torch.testing.assert_close(ours.spatial, captured["spatial"][:, :7].permute(0, 2, 3, 1).flatten(1))
    torch.testing.assert_close(ours.logits, logits - theirs.fc.bias)


def test_load_feature_net_requires_a_local_file(tmp_path):
    with pytest.raises(FeatureNetError, match=FID_WEIGHTS_FILE):
        load_feature_net(None)
    missing = tmp_path / "nope.pth"
    with pytest.raises(FeatureNetError, match="nope.pth does not exist"):
        load_feature_net(missing)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(FeatureNetError, match="junk.pth"):
        load_feature_net(junk)


def test_load_feature_net_rejects_other_layouts(tmp_path, net):
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("Mixed_7c.")}
    state["AuxLogits.fc.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(FeatureNetError, match=r"missing .*Mixed_7c.*unexpected .*AuxLogits"):
        load_feature_net(path)
    state = dict(net.state_dict())
    state["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's ImageNet head, not the TF graph's
    torch.save(state, path)
    with pytest.raises(FeatureNetError, match=r"wrong shape.*fc.weight"):
        load_feature_net(path)


def test_load_round_trip_state_dict(tmp_path, net, images):
    # the TF conversion has no num_batches_tracked; loading must not need them
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / FID_WEIGHTS_FILE
    torch.save(state, path)
    loaded = load_feature_net(path, "cpu", input_size=75)
    assert loaded.checksum() == net.checksum()
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with torch.inference_mode():
        torch.testing.assert_close(loaded(images).pool, net(images).pool, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning", "ignore:To copy construct:UserWarning")
def test_load_torchscript(tmp_path, net, images):
    with torch.inference_mode():
        traced = torch.jit.trace(net, images[:1], check_trace=False)
    script_path = tmp_path / "inception.pt"
    traced.save(str(script_path))
    assert load_feature_net(script_path, "cpu", input_size=75).checksum() == net.checksum()


def test_checksum_tracks_weights_and_settings(net):
    assert random_feature_net(seed=0, input_size=75).checksum() == net.checksum()
    assert random_feature_net(seed=1, input_size=75).checksum() != net.checksum()
    other_size = InceptionFeatures(input_size=80)
    other_size.load_state_dict(net.state_dict())
    assert other_size.checksum() != net.checksum()
