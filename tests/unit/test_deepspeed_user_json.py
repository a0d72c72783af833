"""The user's DeepSpeed JSON may not change the ZeRO stage behind parallel.zero_stage.

The config's checks (compile with ZeRO-3, sharded sampling) and the resume check in
``load_engine`` read ``parallel.zero_stage``; a JSON stage that differs used to be merged in
silently, and every resume of such a run then failed with "written with zero_stage=2, this run
has zero_stage=3" although nothing had changed."""
import json
from pathlib import Path

import pytest

from mpdit_dist import config as C
from mpdit_dist.distributed.deepspeed_backend import deepspeed_config

REPO = Path(__file__).resolve().parents[2]


def test_json_stage_other_than_zero_stage_is_refused(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": 1000}}))
    cfg = C.load_config(str(REPO / "configs/demo.yaml"), ["parallel.zero_stage=2", f"parallel.deepspeed_config={user}"])
    with pytest.raises(C.ConfigError, match=r"zero_optimization.stage=3.*parallel.zero_stage=2"):
        deepspeed_config(cfg, world_size=2, micro=2, accum=1, bf16=False)


def test_json_stage_equal_to_zero_stage_is_merged(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": 1000}}))
    cfg = C.load_config(str(REPO / "configs/demo.yaml"), ["parallel.zero_stage=3", f"parallel.deepspeed_config={user}"])
    ds = deepspeed_config(cfg, world_size=2, micro=2, accum=1, bf16=False)
    assert ds["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1000}
