"""Where ``python -m mpdit_dist.sample`` writes without ``--out`` (CPU, a tiny exported model).

README: an official checkpoint is converted to a ``.safetensors`` export and sampled with
``--checkpoint``. Its samples used to go two folders above the file (the rule for
``<run>/checkpoints/step_*`` directories), i.e. outside the export's own folder."""
import numpy as np
import torch

from mpdit_dist.export import save_exported
from mpdit_dist.models import MPDiT
from mpdit_dist.models.mpdit import ModelArgs
from mpdit_dist.sample import default_out, main


def _tiny_export(path):
    torch.manual_seed(0)
    args = ModelArgs(stages=((4, 1), (2, 1)), hidden_size=32, num_heads=2, input_size=8, in_channels=3,
                     num_classes=2, num_condition_tokens=4)
    manifest = {"num_classes": 2, "encoder": {"id": "identity"}, "latent_mean": [0.0] * 3, "latent_std": [1.0] * 3}
    return save_exported(MPDiT(args), path, {"manifest": manifest, "step": 1, "config": {"data": {"normalize": True}}})


def test_samples_of_an_exported_file_go_beside_it(tmp_path):
    folder = tmp_path / "exports" / "official"
    folder.mkdir(parents=True)
    weights = _tiny_export(folder / "official.safetensors")
    main(["--checkpoint", str(weights), "--num-per-class", "1", "--steps", "1", "--device", "cpu"])
    out = folder / "samples" / "samples.npz"
    assert out.is_file() and out.with_suffix(".png").is_file()
    assert not (tmp_path / "exports" / "samples").exists()
    with np.load(out) as z:
        assert z["arr_0"].shape == (2, 8, 8, 3)


def test_default_out_of_a_run_dir_and_of_a_step_directory(tmp_path):
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    assert default_out(str(run), None) == run / "samples" / "samples.npz"
    assert default_out(None, str(step)) == run / "samples" / "samples.npz"



def _with_nan(weights, name, row=None):
    """The export ``weights`` with a NaN written into its tensor ``name`` (into ``row`` of it)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(weights))
    (tensors[name] if row is None else tensors[name][row]).view(-1)[0] = float("nan")
    save_file(tensors, str(weights), metadata=meta)
    return weights


def test_non_finite_samples_stop_the_job_instead_of_black_images(tmp_path):
    """Weights holding a NaN give NaN latents; cast to uint8 they were black images, written to the
    npz (and scored) like any other sample."""
    import pytest

    weights = _tiny_export(tmp_path / "w.safetensors")
    _with_nan(weights, "final_layer.linear.bias")
    out = tmp_path / "s.npz"
    with pytest.raises(SystemExit, match=r"2 of 2 samples of part 0 came out non-finite .*samples \[0, 1\]"):
        main(["--checkpoint", str(weights), "--num-per-class", "1", "--steps", "1", "--device", "cpu",
              "--out", str(out)])
    assert not out.exists()


def test_non_finite_samples_on_one_rank_stop_every_rank_with_the_message(tmp_path):
    """Class 1's embedding holds a NaN: only the rank that draws it meets non-finite samples. Every
    rank leaves with the message (before, that rank exited alone and the other died in its barrier
    with gloo's "Connection closed by peer" traceback, named by torchrun as the root cause)."""
    import subprocess

    from tests.helpers.runs import REPO, TORCHRUN, env

    weights = _with_nan(_tiny_export(tmp_path / "w.safetensors"), "y_embedder.embedding_table.weight", row=1)
    out = tmp_path / "s.npz"
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "mpdit_dist.sample", "--checkpoint",
                           str(weights), "--classes", "0,1", "--num-per-class", "1", "--batch-size", "1", "--steps", "1",
                           "--device", "cpu", "--out", str(out)], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and not out.exists()
    assert proc.stderr.count("mpdit_dist.sample: 1 of 1 samples of part") == 2, proc.stderr[-3000:]
    # torchrun prints its own ChildFailedError; no rank dies of anything but the message
    assert "Connection closed" not in proc.stderr and "RuntimeError" not in proc.stderr, proc.stderr[-3000:]
    assert len(list(out.with_name("s.npz.parts").glob("part_*.npz"))) == 1  # the class-0 part is kept
