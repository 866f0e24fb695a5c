"""scikit-learn's 8x8 handwritten digits (1,797 images, values 0..16), shipped with the package: no download.

Fixed stratified split: within each class, a permutation drawn from numpy's PCG64 with seed 0 puts the first
round(20%) of the class in the test split. 1,438 train and 359 test images.
"""

import numpy as np

TEST_FRACTION = 0.2


def stratified_split(y: np.ndarray, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        test.append(rng.permutation(members)[: round(test_fraction * len(members))])
    is_test = np.zeros(len(y), bool)
    is_test[np.concatenate(test)] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def load_arrays() -> dict:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.uint8)[:, None]  # [1797, 1, 8, 8]
    y = bunch.target.astype(np.int64)
    train, test = stratified_split(y, TEST_FRACTION)
    return {"train": (x[train], y[train], None, train), "test": (x[test], y[test], None, test)}
