"""Check mdt's `adm` resize against TensorFlow's own ResizeBilinear op (the op inside the Inception
graph that ADM's evaluator runs: align_corners=False, half_pixel_centers=False).

Needs TensorFlow, which mdt does not install: run it from an environment that has it, e.g.
    python -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu numpy
    /tmp/tfenv/bin/python tools/check_adm_resize.py
Prints one JSON line per source size; exits 1 if any output pixel differs by more than --atol.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mdt.eval.resize import resize_tf_bilinear  # noqa: E402  (numpy only: no torch needed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 256, 512])
    parser.add_argument("--images", type=int, default=3, help="random images per size")
    parser.add_argument("--atol", type=float, default=0.0)
    args = parser.parse_args()
    import tensorflow as tf

    rng = np.random.default_rng(0)
    ok = True
    for size in args.sizes:
        worst, off = 0.0, []
        for _ in range(args.images):
            img = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            batch = tf.constant(img[None].astype(np.float32))
            legacy = tf.raw_ops.ResizeBilinear(images=batch, size=[299, 299], align_corners=False,
                                               half_pixel_centers=False)[0].numpy()
            half = tf.raw_ops.ResizeBilinear(images=batch, size=[299, 299], align_corners=False,
                                             half_pixel_centers=True)[0].numpy()
            ours = resize_tf_bilinear(img, 299)
            worst = max(worst, float(np.abs(ours - legacy).max()))
            off.append(float(np.abs(ours - half).mean()))
        ok &= worst <= args.atol
        print(json.dumps({"size": size, "max_abs_diff_vs_tf_legacy": worst,
                          "mean_abs_diff_vs_tf_half_pixel": round(min(off), 3), "tensorflow": tf.__version__}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
