"""``python -m mpdit_dist.export`` given a source it cannot read: a usage error that says why."""
from __future__ import annotations

import pytest

from mpdit_dist.export import main as export_main


@pytest.mark.parametrize("make, words", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "w.safetensors").write_bytes(b"x") and p / "w.safetensors", "is a file, not a run directory"),
])
def test_export_of_a_source_that_is_no_run_or_checkpoint(tmp_path, capsys, make, words):
    src = make(tmp_path)
    with pytest.raises(SystemExit) as exc:
        export_main([str(src), "--out", str(tmp_path / "out.safetensors")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert str(src) in err and words in err and "checkpoints" not in err.split(words)[0]
    assert not (tmp_path / "out.safetensors").exists()


def test_an_export_replaces_the_file_whole(tmp_path):
    """An export is written beside its name and renamed into place: a job killed mid-write (or a full
    disk) leaves the earlier export readable, never a truncated file under its name."""
    import torch

    from mpdit_dist.export import load_exported, save_exported
    from mpdit_dist.models import MPDiT, model_args

    args = model_args("custom", stages=[[4, 1], [2, 1]], hidden_size=32, num_heads=2, input_size=8,
                      num_classes=4, num_condition_tokens=2)
    out = tmp_path / "ema.safetensors"
    save_exported(MPDiT(args), out, {"step": 1})
    first = out.stat().st_ino
    torch.manual_seed(1)
    model = MPDiT(args)
    save_exported(model, out, {"step": 2})
    assert out.stat().st_ino != first  # a new file renamed over the name, not the old one rewritten
    assert [p.name for p in tmp_path.iterdir()] == ["ema.safetensors"]  # no temp file left
    loaded, meta = load_exported(out)
    assert meta["step"] == 2
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
