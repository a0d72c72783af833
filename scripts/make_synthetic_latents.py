"""Write a synthetic latent set (N x 4 x 32 x 32, 1000 classes) as a data.format=memory .npz,
for throughput and backend checks that need no dataset."""
import sys

import numpy as np

out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/latents.npz"
n = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
rng = np.random.default_rng(0)
np.savez(out, x=rng.standard_normal((n, 4, 32, 32), dtype=np.float32), y=rng.integers(0, 1000, n),
         num_classes=np.int64(1000))
print(f"wrote {out}: {n} latents 4x32x32")
