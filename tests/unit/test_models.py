import logging

import pytest
import torch

from mpdit_dist.flops import count_flops, dense_counterpart
from mpdit_dist.models import MODEL_CONFIGS, MPDiT, count_parameters, create_model, model_args
from mpdit_dist.models.layers import sincos_pos_embed_2d
from mpdit_dist.models.official import OfficialCheckpointError, infer_args, load_official

# trainable parameter counts of the official implementation (latent 32x32x4, 1000 classes, 16 tokens, FNO)
OFFICIAL_COUNTS = {
    "MPDiT-XL/4x": 480_839_216,
    "MPDiT-L/4x": 331_442_352,
    "MPDiT-B/4x": 104_607_152,
    "MPDiTv2-XL": 489_104_816,
    "MPDiTv2-L": 338_003_120,
    "MPDiTv2-B": 108_348_080,
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_COUNTS))
def test_parameter_counts_match_official(name):
    with torch.device("meta"):
        model = create_model(name)
    assert count_parameters(model) == OFFICIAL_COUNTS[name]
    # the analytic count that flops.py uses agrees with the module
    assert count_flops(model.args).params == OFFICIAL_COUNTS[name]


@pytest.mark.parametrize("name,approx", [("DiT-XL/2", 473.1e6), ("DiT-B/2", 101.2e6)])
def test_dense_baselines_near_paper(name, approx):
    with torch.device("meta"):
        n = count_parameters(create_model(name))
    assert abs(n - approx) / approx < 0.005


def test_forward_shapes_and_zero_init(tiny_args):
    model = MPDiT(tiny_args)
    x = torch.randn(3, 3, 16, 16)
    out = model(x, torch.rand(3), torch.tensor([0, 5, 10]))
    assert out.shape == x.shape
    # the zeroed final layer makes a fresh model predict exactly zero velocity
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("stages", [((2, 2),), ((8, 1), (4, 1), (2, 1), (1, 1)), ((4, 1), (1, 2))])
def test_custom_schedules(stages):
    model = create_model("custom", stages=stages, hidden_size=32, num_heads=2, input_size=8, in_channels=2,
                         num_classes=3, num_condition_tokens=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = model(torch.randn(2, 2, 8, 8), torch.rand(2), torch.tensor([0, 3]))
    assert out.shape == (2, 2, 8, 8) and torch.isfinite(out).all()
    assert len(model.blocks()) == sum(d for _, d in stages)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="input_size=30 is not divisible"):
        model_args("MPDiT-B/4x", input_size=30)
    with pytest.raises(ValueError, match="unknown model name 'MPDiT-Q'.*MPDiT-XL/4x"):
        model_args("MPDiT-Q")
    with pytest.raises(ValueError, match="num_heads=5 does not divide hidden_size=768"):
        model_args("MPDiT-B/4x", num_heads=5)
    with pytest.raises(ValueError, match="must shrink"):
        model_args("custom", stages=((2, 1), (4, 1)))
    with pytest.raises(ValueError, match="unknown model option"):
        model_args("MPDiT-B/4x", hiden_size=3)


def test_attention_backends_agree(tiny_args):
    from dataclasses import replace

    torch.manual_seed(0)
    ref = MPDiT(replace(tiny_args, attention="math"))
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other = MPDiT(replace(tiny_args, attention="sdpa"))
    other.load_state_dict(ref.state_dict())
    auto = MPDiT(replace(tiny_args, attention="auto"))
    auto.load_state_dict(ref.state_dict())
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([1, 2])
    a = ref(x, t, y)
    # fp32 kernels differ in summation order: compare relative to the output's scale
    scale = a.abs().max().item()
    torch.testing.assert_close(other(x, t, y), a, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(auto(x, t, y), a, rtol=0, atol=1e-5 * scale)


def test_sincos_table_matches_reference_formula():
    # independent reference: MAE/DiT formula written with explicit loops
    import math

    dim, g = 16, 3
    table = sincos_pos_embed_2d(dim, g)
    quarter = dim // 4
    for i in range(g):
        for j in range(g):
            row = table[i * g + j]
            for k in range(quarter):
                w = 1.0 / 10000 ** (k / quarter)
                assert math.isclose(row[k], math.sin(j * w), abs_tol=1e-6)
                assert math.isclose(row[quarter + k], math.cos(j * w), abs_tol=1e-6)
                assert math.isclose(row[2 * quarter + k], math.sin(i * w), abs_tol=1e-6)
                assert math.isclose(row[3 * quarter + k], math.cos(i * w), abs_tol=1e-6)


def _to_official(model: MPDiT) -> dict:
    """Write our weights under the official code's names (inverse of the loader's mapping)."""
    from mpdit_dist.models.official import _V1_MAP, _V2_MAP

    mapping = _V2_MAP if len(model.stages) == 3 else _V1_MAP
    sd = {}
    for key, value in model.state_dict().items():
        for src, dst in mapping.items():
            if key.startswith(dst):
                key = src + key[len(dst):]
                break
        sd[key] = value.clone()
    if len(model.stages) == 3:
        sd["pos_embed"] = model.stages[0].pos_embed.clone()
        sd["pos_embed_lvl1"] = model.stages[1].pos_embed.clone()
        sd["pos_embed_lvl2"] = model.stages[2].pos_embed.clone()
    else:
        sd["pos_embed_downsampled"] = model.stages[0].pos_embed.clone()
        sd["pos_embed"] = model.stages[1].pos_embed.clone()
    return sd


@pytest.mark.parametrize("stages,time_embed", [(((4, 2), (2, 1)), "fno"), (((8, 1), (4, 1), (2, 1)), "mlp")])
def test_load_official_roundtrip(stages, time_embed):
    torch.manual_seed(0)
    model = create_model("custom", stages=stages, hidden_size=64, num_heads=4, input_size=16, in_channels=4,
                         num_classes=7, num_condition_tokens=3, time_embed=time_embed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = {"model": {k: torch.zeros_like(v) for k, v in _to_official(model).items()}, "ema": _to_official(model)}
    loaded = load_official(ckpt, num_heads=4)
    assert loaded.args.stages == stages and loaded.args.num_classes == 7
    assert loaded.args.num_condition_tokens == 3 and loaded.args.time_embed == time_embed
    x, t, y = torch.randn(2, 4, 16, 16), torch.rand(2), torch.tensor([0, 7])
    torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=1e-5, atol=1e-6)


def test_load_official_bad_state_dict():
    with pytest.raises(OfficialCheckpointError, match="missing"):
        infer_args({"foo.weight": torch.zeros(1)})
    model = create_model("custom", stages=((4, 1), (2, 1)), hidden_size=32, num_heads=2, input_size=8)
    sd = _to_official(model)
    with pytest.raises(OfficialCheckpointError, match="num_heads"):
        infer_args(sd)
    sd["final_layer.linear.weight"] = torch.zeros(5, 32)
    with pytest.raises(OfficialCheckpointError, match="final_layer"):
        infer_args(sd, num_heads=2)


def test_convert_cli_output_samples_and_warm_starts(tmp_path, caplog):
    """The converted official checkpoint is an export like ours: ``mpdit_dist.sample`` decodes it
    through the VAE named at conversion, and ``train.init_from`` takes it (same architecture only)."""
    import numpy as np

    from data_prep.fixtures import save_tiny_vae
    from mpdit_dist.export import load_exported, load_weights_into
    from mpdit_dist.models.official import OFFICIAL_LATENT_MEAN, main
    from mpdit_dist.sample import main as sample_main

    model = create_model("custom", stages=((4, 1), (2, 1)), hidden_size=32, num_heads=2, input_size=8)
    torch.save({"model": _to_official(model), "ema": _to_official(model)}, tmp_path / "ckpt.pt")
    vae = save_tiny_vae(tmp_path / "vae")
    out = tmp_path / "conv.safetensors"
    main([str(tmp_path / "ckpt.pt"), "--out", str(out), "--num-heads", "2", "--vae", str(vae)])
    loaded, meta = load_exported(out)
    assert loaded.args == model.args and meta["manifest"]["latent_mean"] == OFFICIAL_LATENT_MEAN
    # sampled without flags as the official sample.py samples: CFG 1.5, its 250 Euler points = 249 steps
    assert meta["config"]["train"] == {"sample_cfg_scale": 1.5, "sample_steps": 249}
    assert meta["config"]["data"] == {"normalize": True, "latent_stats": "official"}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    samples = tmp_path / "s.npz"
    sample_main(["--checkpoint", str(out), "--num-samples", "3", "--classes", "1,2", "--steps", "2",
                 "--device", "cpu", "--out", str(samples)])
    with np.load(samples) as z:
        assert z["arr_0"].shape == (3, 16, 16, 3) and z["arr_0"].dtype == np.uint8
    target = create_model("custom", stages=((4, 1), (2, 1)), hidden_size=32, num_heads=2, input_size=16)
    load_weights_into(target, str(out))  # another resolution: positions are tables, not weights
    assert torch.equal(target.final_layer.linear.weight, model.final_layer.linear.weight)
    # a run that standardises with other statistics than the official ones is warned;
    # data.latent_stats=official fits
    measured = {"latent_mean": [0.1, 0.2, 0.3, 0.4], "latent_std": [1.0, 1.0, 1.0, 1.0]}
    with caplog.at_level(logging.WARNING, logger="mpdit_dist"):
        load_weights_into(target, str(out), measured)
        assert "trained on latents standardised with other statistics" in caplog.text
        assert "latent_mean [5.81, 3.25, 0.12, -2.15] there, [0.1, 0.2, 0.3, 0.4] here" in caplog.text
        caplog.clear()
        load_weights_into(target, str(out), meta["manifest"])
        assert "other statistics" not in caplog.text
    other_heads = create_model("custom", stages=((4, 1), (2, 1)), hidden_size=32, num_heads=4, input_size=8)
    with pytest.raises(ValueError, match="num_heads: 2 there, 4 configured"):
        load_weights_into(other_heads, str(out))


def test_convert_checkpoint_without_ema_records_raw_weights(tmp_path, caplog):
    """A checkpoint without 'ema' gives its raw weights, with a warning, and the export says so."""
    import json

    from safetensors import safe_open

    from mpdit_dist.models.official import load_official_with_source, main

    model = create_model("custom", stages=((4, 1), (2, 1)), hidden_size=32, num_heads=2, input_size=8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save({"model": _to_official(model), "epoch": 3}, tmp_path / "raw.pt")
    out = tmp_path / "raw.safetensors"
    main([str(tmp_path / "raw.pt"), "--out", str(out), "--num-heads", "2"])
    assert "has no 'ema' weights" in caplog.text and "raw 'model' weights" in caplog.text
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["ema"]) is False and json.loads(meta["checkpoint_key"]) == "model"
    from mpdit_dist.export import load_exported

    assert torch.equal(load_exported(out)[0].final_layer.linear.weight, model.final_layer.linear.weight)
    # with both, the EMA by default and the raw weights with --no-ema; a bare state dict does not say
    raw = {k: v if k.startswith("pos_embed") else torch.zeros_like(v) for k, v in _to_official(model).items()}
    both = {"model": raw, "ema": _to_official(model)}
    assert load_official_with_source(both, num_heads=2)[1] == "ema"
    assert load_official_with_source(both, num_heads=2, use_ema=False)[1] == "model"
    assert load_official_with_source(_to_official(model), num_heads=2)[1] is None
    with pytest.raises(OfficialCheckpointError, match="no raw 'model' weights"):
        load_official_with_source({"ema": _to_official(model)}, num_heads=2, use_ema=False)


def test_exported_flash_attn_weights_load_where_flash_attn_is_missing(tmp_path, caplog):
    """The attention kernel is the loading machine's choice: weights saved with flash_attn load
    with 'auto' (logged) where flash-attn is not importable; an explicit kernel overrides."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from mpdit_dist.export import load_exported, save_exported
    from mpdit_dist.models import flash_attn_available

    if flash_attn_available():
        pytest.skip("flash-attn is installed here: the fallback is not exercised")
    torch.manual_seed(0)
    model = create_model("custom", stages=((4, 1), (2, 1)), hidden_size=32, num_heads=2, input_size=8,
                         attention="sdpa")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    plain = save_exported(model, tmp_path / "sdpa.safetensors", {"manifest": {}})
    with safe_open(str(plain), framework="pt") as f:
        meta = f.metadata()
    margs = json.loads(meta["model_args"])
    margs["attention"] = "flash_attn"  # as a run trained on GPUs with model.attention=flash_attn writes it
    meta["model_args"] = json.dumps(margs)
    flash = tmp_path / "flash.safetensors"
    save_file(load_file(str(plain)), str(flash), metadata=meta)

    loaded, _ = load_exported(flash)
    assert loaded.args.attention == "auto" and "attention='flash_attn', which is not importable here" in caplog.text
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 3])
    torch.testing.assert_close(loaded(x, t, y), model(x, t, y))
    assert load_exported(flash, attention="math")[0].args.attention == "math"
    with pytest.raises(ValueError, match="flash-attn package is not importable"):
        load_exported(flash, attention="flash_attn")


def test_peak_flops_by_device_name():
    from mpdit_dist.flops import device_peak_flops

    assert device_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert device_peak_flops("NVIDIA H100 PCIe") == 756e12  # not the SXM figure
    assert device_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert device_peak_flops("Some New Card") is None and device_peak_flops(None) is None
    # whole words: "A10" is not a prefix match for AWS's A10G (another chip, another peak) or the A100
    assert device_peak_flops("NVIDIA A10") == 125e12
    assert device_peak_flops("NVIDIA A10G") is None
    assert device_peak_flops("NVIDIA A100 80GB PCIe") == 312e12
    assert device_peak_flops("NVIDIA H100 NVL") == 835e12 and device_peak_flops("NVIDIA GH200 480GB") == 989e12


@pytest.mark.parametrize("argv,message", [
    (["MPDiT-XL/4x", "--num-condition-tokens", "0"], "--num-condition-tokens must be at least 1, got 0"),
    (["MPDiT-XXL/4x"], "unknown model 'MPDiT-XXL/4x'; choose one of MPDiT-B/4x"),
    (["MPDiT-XL/4x", "--vae-factor", "0"], "--vae-factor must be at least 1, got 0"),
    (["MPDiT-XL/4x", "--resolution", "264"], "MPDiT-XL/4x at --resolution 264: model input_size=33 is not divisible"),
])
def test_flops_cli_bad_input(capsys, argv, message):
    from mpdit_dist.flops import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_flops_mpdit_half_of_dense():
    xl = count_flops(model_args("MPDiT-XL/4x"))
    dense = count_flops(dense_counterpart(model_args("MPDiT-XL/4x")))
    assert 0.40 < xl.forward_macs / dense.forward_macs < 0.55
    # the DiT paper's DiT-XL/2 (256 tokens, no class tokens, per-block adaLN) is 118.6 GFLOPs; our
    # block formula reproduces it when applied to that configuration
    d, t = 1152, 256
    per_block = 12 * t * d * d + 2 * t * t * d + 6 * d * d
    assert abs(28 * per_block / 1e9 - 118.6) < 0.3
    assert len(MODEL_CONFIGS) == 10


@pytest.mark.parametrize("buffers", ["fp32", "bf16"])
@pytest.mark.parametrize("time_embed", ["fno", "mlp"])
def test_bf16_weights_without_autocast(time_embed, buffers):
    """DeepSpeed's bf16 mode runs the model with bf16 parameters and autocast switched off; its
    0.19 engine leaves buffers (the fp32 positions) as they are, older ones cast them too."""
    torch.manual_seed(0)
    model = create_model("custom", stages=((4, 1), (2, 1)), hidden_size=32, num_heads=2, input_size=8,
                         in_channels=4, num_classes=3, num_condition_tokens=2, time_embed=time_embed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 3])
    ref = model(x, t, y)
    if buffers == "bf16":
        model.to(torch.bfloat16)
    else:
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
        assert all(b.dtype == torch.float32 for b in model.buffers())
    out = model(x, t, y)
    out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters() if p.requires_grad)
    # bf16 rounding of every weight: close in the aggregate, not element by element
    assert ((out.float() - ref).norm() / ref.norm()).item() < 0.05
