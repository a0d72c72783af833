"""The embedded demo: real images -> latent shards -> training -> samples, on a CPU in minutes.

``python -m mpdit_dist.demo [--out results/demo] [key=value ...]`` (``make demo``; overrides such as
``train.steps=500`` go to ``configs/demo.yaml``):

1. writes the 1,797 handwritten digits that ship with scikit-learn (8x8 grayscale, 10 classes)
   as PNG files into an ImageFolder tree;
2. encodes them with ``data_prep.encode`` (identity encoder: pixel space, 16x16) into MDS and
   WebDataset shards with a manifest, the path a real dataset takes;
3. trains ``configs/demo.yaml`` on the MDS shards, tracked in an embedded MLflow store;
4. samples a grid of every digit from the EMA weights with classifier-free guidance.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/demo", help="where images, shards, the run and the store go")
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides, e.g. train.steps=500")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out).resolve()

    from data_prep.encode import encode_dataset
    from data_prep.fixtures import write_digits_image_folder

    # the digits at their own 8x8; the encoder's ADM resize brings them to 16x16
    write_digits_image_folder(out / "images", size=8)
    print(f"[demo] 1,797 digit images in {out / 'images'}")

    data = out / "data"
    if not (data / "manifest.json").is_file():
        encode_dataset(out / "images", data, resolution=16, vae="identity", formats=("mds", "wds"),
                       samples_per_shard=512, store="sample", progress=True)
    print(f"[demo] latent shards and manifest in {data}")

    from mpdit_dist import config as C
    from mpdit_dist import preemption
    from mpdit_dist.trainer import train

    cfg = C.load_config(args.config, [f"data.path={data}", f"results_dir={out}", *args.overrides])
    run_dir = out / "run"
    preemption.install_signal_handlers()
    result = train(cfg, run_dir)

    from mpdit_dist.sample import main as sample_main

    grid = out / "samples.png"
    sample_main(["--run-dir", str(run_dir), "--num-per-class", "8", "--out", str(out / "samples.npz"),
                 "--grid", str(grid), "--device", "cpu"])
    from mpdit_dist.tracking import default_tracking_uri

    uri = cfg.tracking.uri or default_tracking_uri(cfg.results_dir)  # where the trainer put it (an override too)
    print(
        "\n[demo] done: {status} at step {step}\n"
        "  samples grid (one row per digit 0-9, CFG {cfg}): {grid}\n"
        "  training-time grids: {run}/samples/\n"
        "  metrics: {run}/metrics.jsonl\n"
        "  MLflow store: {uri}\n"
        "  open it: .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000".format(
            status=result["status"], step=result["step"], cfg=cfg.train.sample_cfg_scale, grid=grid,
            run=run_dir, uri=uri)
    )


if __name__ == "__main__":
    main()
