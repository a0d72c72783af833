"""Write a synthetic latent set (N x 4 x 32 x 32, 1000 classes) as a data.format=memory .npz.

For throughput and backend checks that need no dataset (configs/gpu_smoke.yaml, bench/device_checks.py).

    python scripts/make_synthetic_latents.py [OUT.npz] [N]
"""
import argparse
from pathlib import Path

import numpy as np


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", default="/tmp/latents.npz", help="output .npz (default /tmp/latents.npz)")
    ap.add_argument("n", nargs="?", type=int, default=4096, help="number of latents (default 4096)")
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error(f"n must be at least 1, got {args.n}")
    out = Path(args.out)
    if out.suffix != ".npz":  # np.savez would add it: name the file that is written
        out = out.with_name(out.name + ".npz")
    rng = np.random.default_rng(0)
    np.savez(out, x=rng.standard_normal((args.n, 4, 32, 32), dtype=np.float32), y=rng.integers(0, 1000, args.n),
             num_classes=np.int64(1000))
    print(f"wrote {out}: {args.n} latents 4x32x32")


if __name__ == "__main__":
    main()
