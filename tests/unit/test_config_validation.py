"""Config values that passed load_config and broke the run later (or were ignored), now refused by
load_config with an error that names the key and value."""
from __future__ import annotations

import pytest

from mpdit_dist import config as C


@pytest.mark.parametrize("override, words", [
    # num_heads=0 escaped load_config itself as a bare ZeroDivisionError; the others failed only when
    # the model was built (ZeroDivisionError, "negative dimension", a conv kernel larger than the input)
    ("model.num_heads=0", "model.num_heads=0 must be >= 1"),
    ("model.hidden_size=0", "model.hidden_size=0 must be >= 1"),
    ("model.hidden_size=-4", "model.hidden_size=-4 must be >= 1"),
    ("model.input_size=0", "model.input_size=0 must be >= 1"),
    ("model.in_channels=0", "model.in_channels=0 must be >= 1"),
    ("model.num_classes=0", "model.num_classes=0 must be >= 1"),
    # mlp_ratio=0 built blocks whose MLP has no hidden unit: a model without its MLPs, silently
    ("model.mlp_ratio=0", "model.mlp_ratio=0.0 must be > 0"),
    ("model.mlp_ratio=-1", "model.mlp_ratio=-1.0 must be > 0"),
    # was "not enough values to unpack (expected 2, got 1)"
    ("model.stages=[[4,2],[2]]", "model.stages=[[4, 2], [2]]: each stage is a [patch_size, depth] pair"),
    ("model.stages=[[4,2,1]]", "model.stages=[[4, 2, 1]]: each stage"),
    # trained, then failed at the first in-training evaluation (numpy: "expected non-negative integer")
    ("train.seed=-1", "train.seed=-1 must be >= 0"),
])
def test_model_sizes_are_checked_by_load_config(override, words):
    with pytest.raises(C.ConfigError) as info:
        C.load_config(None, [override])
    assert words in str(info.value)


@pytest.mark.parametrize("backend", ["auto", "none", "ddp", "deepspeed"])
@pytest.mark.parametrize("override", ["parallel.cpu_offload=true", "parallel.hsdp_replicas=2"])
def test_fsdp2_options_need_fsdp2(backend, override):
    """DDP and one process ignored them: a run planned to fit by offloading or by HSDP ran without."""
    key, value = override.split("=")
    with pytest.raises(C.ConfigError) as info:
        C.load_config(None, [override, f"parallel.backend={backend}"])
    assert f"{key}=" in str(info.value) and f"parallel.backend={backend}" in str(info.value)
    C.load_config(None, [override, "parallel.backend=fsdp2"])


def test_config_file_that_is_no_mapping_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("- model\n- data\n")  # was a bare TypeError: "Cannot merge incompatible container types"
    with pytest.raises(C.ConfigError, match=f"config file {path}: must hold a mapping"):
        C.load_config(path)


def test_good_model_overrides_pass():
    C.load_config(None, ["model.name=custom", "model.stages=[[4,2],[2,1]]", "model.hidden_size=32",
                         "model.num_heads=2", "model.mlp_ratio=0.5", "model.num_classes=1"])
