"""Synthetic data: the paper's breakdown case of class-conditional Gaussians, and noise test images."""

import numpy as np

GAUSSIAN_SHAPE = (1, 8, 8)
GAUSSIAN_CLASSES, GAUSSIAN_TRAIN, GAUSSIAN_TEST = 10, 1000, 500


def gaussian(separation: float) -> dict:
    """Class c's images are separation * mu_c + N(0, I), mu_c ~ N(0, I) fixed (seed 0): separation 0 gives
    pure noise, large separation easy classes. Float32 [N, 1, 8, 8], balanced classes."""
    rng = np.random.default_rng(0)
    means = rng.standard_normal((GAUSSIAN_CLASSES, *GAUSSIAN_SHAPE))
    out = {}
    for split, n, seed in (("train", GAUSSIAN_TRAIN, 1), ("test", GAUSSIAN_TEST, 2)):
        r = np.random.default_rng(seed)
        y = np.arange(n) % GAUSSIAN_CLASSES
        x = separation * means[y] + r.standard_normal((n, *GAUSSIAN_SHAPE))
        out[split] = (x.astype(np.float32), y.astype(np.int64), None)
    return out


def noise(like: np.ndarray, n: int) -> np.ndarray:
    """n artificial test images shaped like `like`: uniform over its value range, in its dtype (seed 3)."""
    rng = np.random.default_rng(3)
    lo, hi = float(like.min()), float(like.max())
    x = rng.uniform(lo, hi, (n, *like.shape[1:]))
    return np.rint(x).astype(np.uint8) if like.dtype == np.uint8 else x.astype(like.dtype)
