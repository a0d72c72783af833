"""Awkward input to the config system and the command lines: one clear line naming the file, key,
flag or value; no traceback for a user's mistake, nothing silently ignored, and output paths that
cannot be written refused before any work (not at its end)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mpdit_dist import config as C

# ----- config: files and overrides -----


@pytest.mark.parametrize("override, words", [
    # OmegaConf's message came with three more lines of its own (full_key, reference_type, object_type)
    ("train.stepz=5", "train.stepz: Key 'stepz' not in 'TrainConfig'. Did you mean: 'steps'?"),
    ("trian.steps=5", "Did you mean one of: 'train', 'tracking'?"),
    ("train.steps=abc", "train.steps: Value 'abc' of type 'str' could not be converted to Integer"),
    ("data.global_batch_size=1.5", "data.global_batch_size: Value '1.5'"),
    ("optim.betas=[0.9,abc]", "optim.betas[1]: Value 'abc'"),
    # was a bare yaml ParserError (from_dotlist parses the value as YAML)
    ("model.stages=[[4,2],[2,1]", "command-line override 'model.stages=[[4,2],[2,1]': not valid YAML"),
    # was a bare InterpolationKeyError, raised when the tree was turned into dataclasses
    ("train.steps=${oops}", "train.steps: Interpolation key 'oops' not found"),
])
def test_override_errors_are_one_line_naming_the_key(override, words):
    with pytest.raises(C.ConfigError) as info:
        C.load_config(None, [override])
    assert words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("override", ["=5", ".steps=5", "train.=5"])
def test_override_with_an_empty_key_is_refused_as_malformed(override):
    """Was "Key '' not in 'Config'", naming nothing the user typed."""
    with pytest.raises(C.ConfigError, match="overrides must look like key.sub=value"):
        C.load_config(None, [override])


@pytest.mark.parametrize("text, words", [
    ("train:\n  steps: [1\n", "not valid YAML: line 3: did not find expected ',' or ']'"),  # was ParserError
    ("train:\n  steps: 5\n  steps: 7\n", "not valid YAML: line 3: found duplicate key steps"),  # ConstructorError
    ("train:\n  stepz: 5\n", "train.stepz: Key 'stepz' not in 'TrainConfig'. Did you mean: 'steps'?"),
    ("train: 5\n", "train: must be a mapping of its settings"),  # named no key ("int is not a subclass of ...")
    ("train:\n", "train: must be a mapping of its settings"),  # "field 'train' is not Optional"
    ("", "holds no settings (empty)"),  # an empty (truncated) file trained the defaults: 400k steps of XL
    ("# model: ...\n", "holds no settings (empty)"),
])
def test_bad_config_files_name_the_file_and_what_is_wrong(tmp_path, text, words):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(C.ConfigError) as info:
        C.load_config(path, [])
    assert str(info.value).startswith(f"config file {path}") and words in str(info.value)
    assert "\n" not in str(info.value)


def test_undecodable_or_directory_config_file(tmp_path):
    binary = tmp_path / "run.yaml"
    binary.write_bytes(b"\xff\xfe model")  # was a bare UnicodeDecodeError
    with pytest.raises(C.ConfigError, match=f"config file {binary}: not a text"):
        C.load_config(binary, [])
    folder = tmp_path / "configs.yaml"
    folder.mkdir()  # was "config file not found", for a path that is there
    with pytest.raises(C.ConfigError, match=f"config file {folder} is a directory"):
        C.load_config(folder, [])


@pytest.mark.parametrize("override, words", [
    # retention kept the newest checkpoint anyway (max(1, keep_last)): 0 and below meant 1, silently
    ("checkpoint.keep_last=0", "checkpoint.keep_last=0 must be >= 1"),
    ("checkpoint.keep_last=-1", "checkpoint.keep_last=-1 must be >= 1"),
    # negative periods were taken as 0 (off), silently
    ("train.ckpt_every=-1", "train.ckpt_every=-1 must be >= 0"),
    ("train.sample_every=-1", "train.sample_every=-1 must be >= 0"),
    ("train.eval_every=-1", "train.eval_every=-1 must be >= 0"),
    ("checkpoint.keep_every=-5", "checkpoint.keep_every=-5 must be >= 0"),
    ("ema.start_step=-1", "ema.start_step=-1 must be >= 0"),
])
def test_values_that_were_silently_changed_are_refused(override, words):
    with pytest.raises(C.ConfigError, match=words):
        C.load_config(None, [override])


def test_zero_periods_still_mean_off():
    cfg = C.load_config(None, ["train.ckpt_every=0", "train.sample_every=0", "checkpoint.keep_every=0"])
    assert (cfg.train.ckpt_every, cfg.train.sample_every, cfg.checkpoint.keep_every) == (0, 0, 0)



def test_train_py_config_mistake_is_one_error_line_exit_2():
    """Was ConfigError's traceback, exit 1 (slurm/submit.py already printed one line, exit 2)."""
    import subprocess
    import sys

    from tests.helpers.runs import REPO, env

    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/demo.yaml"),
                           "train.stepz=5"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "error: command-line override 'train.stepz=5': train.stepz: Key 'stepz' not in" in proc.stderr


def test_train_py_overrides_may_follow_an_option(tmp_path, capsys):
    """``train.py --config X a=1 --run-dir D b=2`` failed with "unrecognized arguments: b=2"; now both
    overrides are read (here the second is a mistake, named as such)."""
    from mpdit_dist.trainer import main

    with pytest.raises(SystemExit) as exit_:
        main(["--config", "configs/demo.yaml", "train.steps=3", "--run-dir", str(tmp_path / "r"), "train.stepz=5"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" not in err and "train.stepz: Key 'stepz' not in" in err
    assert not (tmp_path / "r").exists()  # refused before the run directory is made


def test_a_list_for_a_mapping_is_named_not_a_type_error(tmp_path):
    """OmegaConf's merge raised a bare TypeError ("Cannot merge incompatible container types"): a
    traceback from train.py, naming neither the file nor the key."""
    with pytest.raises(C.ConfigError, match=r"command-line override 'launch.tags=\[a\]': Cannot merge incompatible"):
        C.load_config(None, ["launch.tags=[a]"])
    for text, key in (("launch:\n  tags: [a, b]\n", "launch.tags"), ("model:\n  stages: {a: 1}\n", "model.stages")):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(C.ConfigError, match=rf"config file {path}: {key}: Cannot merge incompatible container "
                                                r"types \(a list where a mapping is expected"):
            C.load_config(path)


def test_sample_classes_a_user_names_must_exist():
    """They were wrapped silently (``c % num_classes``): 99 and -1 both drew class 9 of 10. The
    default ImageNet classes are still wrapped for a model of fewer classes (the demo's)."""
    with pytest.raises(C.ConfigError, match=r"train.sample_classes=\[99, -1\]: classes are 0..9 "
                                            r"\(model.num_classes=10\)"):
        C.load_config(None, ["model.num_classes=10", "train.sample_classes=[99,-1]"])
    assert C.load_config(None, ["model.num_classes=10", "train.sample_classes=[0,9]"]).train.sample_classes == [0, 9]
    C.load_config(None, ["model.num_classes=10"])  # the defaults: wrapped, as before


def test_in_training_evaluation_needs_4_samples():
    """Precision/recall take 3 nearest neighbours: eval_num_samples=3 passed, to fail at the first evaluation."""
    with pytest.raises(C.ConfigError, match="train.eval_num_samples=3 must be >= 4"):
        C.load_config(None, ["train.eval_every=5", "train.eval_num_samples=3"])


# ----- mpdit_dist.sample -----


def _sample_usage_error(capsys, argv):
    from mpdit_dist.sample import _parse_args

    with pytest.raises(SystemExit) as exc:
        _parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_sample_refuses_a_cfg_scale_that_is_no_number(tmp_path, capsys, value):
    """nan wrote all-black images (and "cfg_scale": NaN into the settings file), exit 0."""
    err = _sample_usage_error(capsys, ["--run-dir", str(tmp_path), f"--cfg-scale={value}"])
    assert "--cfg-scale must be a finite number" in err


def test_sample_refuses_bad_output_paths_before_sampling(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    run = ["--run-dir", str(tmp_path)]
    # a grid PIL cannot write: a ValueError traceback once every sample was drawn, the npz already
    # written, so that a rerun found it complete and never wrote the grid
    assert "--grid" in _sample_usage_error(capsys, [*run, "--grid", str(tmp_path / "g.txt")])
    # an existing directory: "could not write" once every sample was drawn
    assert "is a directory" in _sample_usage_error(capsys, [*run, "--out", str(tmp_path)])
    # under a file: a NotADirectoryError traceback
    assert "is a file, not a directory" in _sample_usage_error(capsys, [*run, "--out", str(tmp_path / "file/s.npz")])
    # .png: the grid (out.with_suffix('.png')) was written over the samples; .json: the settings were
    assert "give a .npz file" in _sample_usage_error(capsys, [*run, "--out", str(tmp_path / "s.png")])
    assert "give a .npz file" in _sample_usage_error(capsys, [*run, "--out", str(tmp_path / "s.json")])


def test_sample_device_is_one_it_honours(tmp_path, capsys):
    """--device cuda:1 (or any other string) sampled on the CPU, silently."""
    assert "invalid choice: 'cuda:1'" in _sample_usage_error(capsys, ["--run-dir", str(tmp_path), "--device", "cuda:1"])
    if not torch.cuda.is_available():  # was a RuntimeError naming train.device
        assert "no CUDA device" in _sample_usage_error(capsys, ["--run-dir", str(tmp_path), "--device", "cuda"])


@pytest.mark.parametrize("name, content, words", [
    ("latents.npz", b"PK\x03\x04", "is a file, not a checkpoint directory"),  # was a ValueError traceback
    ("w.safetensors", b"x" * 20, "not a readable safetensors file"),  # was a SafetensorError traceback
    ("missing.safetensors", None, "No such file"),  # was a FileNotFoundError traceback
])
def test_sample_from_a_source_it_cannot_read_says_why(tmp_path, name, content, words):
    from mpdit_dist.sample import main

    source = tmp_path / name
    if content is not None:
        source.write_bytes(content)
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", str(source), "--device", "cpu", "--out", str(tmp_path / "s.npz")])
    assert isinstance(exc.value.code, str) and exc.value.code.startswith("mpdit_dist.sample: ")
    assert words in exc.value.code


# ----- mpdit_dist.export -----


@pytest.mark.parametrize("out, words", [
    ("", "is a directory"),  # an IsADirectoryError traceback once the checkpoint was read
    ("w.pt", "give a .safetensors file"),  # written, then unreadable by sample --checkpoint and init_from
    ("file/w.safetensors", "is a file, not a directory"),  # a FileExistsError traceback
])
def test_export_refuses_an_output_it_cannot_write(tmp_path, capsys, out, words):
    from mpdit_dist.export import main

    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "run"), "--out", str(tmp_path / out)])
    assert exc.value.code == 2 and words in capsys.readouterr().err


# ----- mpdit_dist.models.official -----


@pytest.mark.parametrize("heads", ["0", "-2"])
def test_official_refuses_num_heads_below_one(tmp_path, capsys, heads):
    """0 was a ZeroDivisionError traceback; -2 was converted, into a model no one can sample."""
    from mpdit_dist.models.official import main

    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "o.safetensors"), "--num-heads", heads])
    assert exc.value.code == 2 and f"--num-heads must be at least 1, got {heads}" in capsys.readouterr().err


def test_official_refuses_an_output_under_a_file(tmp_path, capsys):
    from mpdit_dist.models.official import main

    (tmp_path / "file.npz").write_text("x")  # a FileExistsError traceback once the checkpoint was read
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "file.npz"), "--num-heads", "2"])
    assert exc.value.code == 2 and "file.npz is a file, not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("make, words", [
    (lambda p: np.savez(p / "x.npz", x=np.zeros(2)) or p / "x.npz", "cannot be read as a PyTorch checkpoint"),
    (lambda p: torch.save({"foo": 1}, p / "j.pt") or p / "j.pt", "j.pt is not an official MPDiT checkpoint"),
    (lambda p: p, "is a directory, not an official checkpoint file"),  # was "not found"
    (lambda p: p / "missing.pt", "official checkpoint not found"),
])
def test_official_checkpoint_it_cannot_read_is_named_without_traceback(tmp_path, make, words):
    from mpdit_dist.models.official import main

    source = make(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main([str(source), "--out", str(tmp_path / "o.safetensors"), "--num-heads", "2"])
    assert isinstance(exc.value.code, str) and exc.value.code.startswith("mpdit_dist.models.official: ")
    assert words in exc.value.code


# ----- mpdit_dist.evaluate -----


@pytest.mark.parametrize("extra, words", [
    (["--device", "foo"], "--device 'foo': give cpu, cuda or cuda:N"),  # was a RuntimeError traceback
    (["--out", "."], "is a directory"),  # an IsADirectoryError once every feature was computed
])
def test_evaluate_refuses_bad_device_and_output_up_front(tmp_path, capsys, monkeypatch, extra, words):
    from mpdit_dist.evaluate import _parse_args

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        _parse_args(["s.npz", "r.npz", *extra])
    assert exc.value.code == 2 and words in capsys.readouterr().err


# ----- data_prep.encode -----


def test_encode_resolution_zero_is_named(tmp_path, capsys):
    """Was "--images and --resolution are required", for a --resolution that was given."""
    from data_prep.encode import main

    assert main(["--images", str(tmp_path), "--out", str(tmp_path / "o"), "--resolution", "0"]) == 2
    assert "--resolution 0" in capsys.readouterr().err


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_encode_workers_below_one_are_refused(tmp_path, capsys, workers):
    """0 was taken as the default (min(8, cpus)), silently; -1 said "max_workers must be greater than 0"."""
    from data_prep.encode import main

    assert main(["--images", str(tmp_path), "--out", str(tmp_path / "o"), "--resolution", "8",
                 "--workers", workers]) == 2
    assert f"--workers {workers} must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [[], ["--verify"], ["--finalize"]])
def test_encode_out_that_is_a_file(tmp_path, capsys, flag):
    """Was "[Errno 17] File exists", or for --verify "'utf-8' codec can't decode byte ..." naming no file."""
    from data_prep.encode import main

    np.savez(tmp_path / "x.npz", x=np.zeros(2))
    with pytest.raises(SystemExit) as exc:
        main(["--images", str(tmp_path), "--resolution", "8", "--out", str(tmp_path / "x.npz"), *flag])
    assert exc.value.code == 2 and "is a file, not a dataset directory" in capsys.readouterr().err


def test_encode_finalize_of_nothing_encoded(tmp_path, capsys):
    from data_prep.encode import main

    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "none"), "--finalize"])
    assert exc.value.code == 2 and "nothing was encoded there" in capsys.readouterr().err

