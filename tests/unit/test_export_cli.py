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
