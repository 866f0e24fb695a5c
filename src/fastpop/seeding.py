"""Independent random streams derived from a network's seed.

Each (seed, purpose, index) names its own torch.Generator, so network k's init and batch orders depend on its
own seed alone: never on P, on the other seeds, or on the order in which networks are processed.
"""

import numpy as np
import torch

INIT = 1  # stream ids; never renumber them, or old runs stop being reproducible
ORDER = 2
SUBSET = 3


def generator(seed: int, stream: int, index: int = 0) -> torch.Generator:
    state = np.random.SeedSequence([seed, stream, index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
