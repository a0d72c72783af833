"""What the encode left out of the training data is reported by the training run itself.

``data_prep.encode`` counts the images that failed and the files it skipped in the dataset's
manifest. A training run on that data names those counts in its log (a warning when any is non-zero)
and in its MLflow params (``dataset.*``), so whoever reads a run sees what it was trained without."""
import mlflow
from PIL import Image

from data_prep.encode import encode_dataset
from mpdit_dist.data import read_manifest
from tests.helpers.runs import train


def test_failed_and_skipped_inputs_reach_the_log_and_mlflow(tmp_path):
    root = tmp_path / "imgs"
    for cname in ("a", "b"):
        (root / cname).mkdir(parents=True)
        for j in range(4):
            Image.new("RGB", (16, 16), (40 * j, 90 if cname == "a" else 200, 10)).save(root / cname / f"{j}.png")
    (root / "a" / "zz_dangling.png").symlink_to(root / "a" / "gone.png")  # fails at encode time
    (root / "README.txt").write_text("a stray file at the root\n")  # skipped
    (root / "b" / ".DS_Store").write_bytes(b"x")  # skipped
    data = tmp_path / "latents"
    encode_dataset(root, data, 16, "identity", "wds", 4, progress=False)
    m = read_manifest(data)
    assert (m["num_samples"], m["num_failed"], m["num_skipped_files"]) == (8, 1, 2)

    results = tmp_path / "results"
    proc = train(tmp_path / "run", data, ["data.format=wds", "data.global_batch_size=4", "train.steps=1",
                                          "train.ckpt_every=1", "tracking.enabled=true", f"results_dir={results}"])
    assert "WARNING" in proc.stderr and "8 samples; at encode time 1 image(s) failed and 2 file(s) were skipped" \
        in proc.stderr, proc.stderr[-3000:]
    run_id = (tmp_path / "run" / "mlflow_run_id").read_text().strip()
    params = mlflow.MlflowClient(tracking_uri=f"sqlite:///{results}/mlflow.db").get_run(run_id).data.params
    assert params["dataset.num_samples"] == "8"
    assert params["dataset.num_failed"] == "1" and params["dataset.num_skipped_files"] == "2"
    assert len(params["dataset.id"]) > 8 and params["data.path"] == str(data)
