"""Agreement and learning-order metrics of a population's correctness record, for any trainer's networks.

Every metric takes a bool array [T, P, N] or [P, N] (network p right on example n at checkpoint t), fastpop's
packed record uint8 [T, P, R] with its N (`pack` makes one), or a Run and a split (default "test"), and returns a
small dataclass that echoes the split. Small records (T * P * N up to NUMPY_MAX_CELLS) are computed with numpy;
larger ones with cached numba kernels on packed uint64 words, imported only then. Nothing here imports torch.

    import numpy as np, fastpop.metrics as M
    correct = np.random.default_rng(0).random((3, 100, 359)) < 0.9   # any trainer's [T, P, N]
    M.tpa_counts(correct).tpa            # float [T, N]
    M.agreement(correct).summary["rho"]  # over-dispersion at the last checkpoint
"""

from .agree import (TPA, Accuracy, Agreement, ErrorConsistency, accuracy, agreement, agreement_summary,
                        error_consistency, kappa_summary, tpa_counts)
from .bootstrap import (DRAWS, LEVEL, SEED, agreement_intervals, containment_expected, containment_intervals,
                        example_weights,
                        permutation_null, spearman_intervals)
from .classes import class_accuracy, class_conditional, class_conditional_summary, class_index
from .consensus import Consensus, chance_agreement, chance_agreement_own, consensus_agreement
from .margins import AUM, EL2N, Cartography, MarginForgetting, aum, cartography, el2n, margin_forgetting
from .order import (Accessibility, CScore, Forgetting, LearnedAt, Speed, accessibility, containment, cscore,
                    forgetting, learned_at, pairwise_spearman, speed_counts, split_half)
from .record import DEFAULT_SPLIT, NUMPY_MAX_CELLS, Record, as_record, pack, unpack
from .stats import (binomial_pmf, fleiss_kappa, percentile_interval, poisson_binomial_pmf, poisson_binomial_pmfs, rank,
                    spearman)

__all__ = ["AUM", "Accessibility", "Accuracy", "Agreement", "CScore", "Cartography", "Consensus", "DEFAULT_SPLIT",
           "DRAWS", "LEVEL", "SEED", "agreement_intervals", "chance_agreement_own", "class_accuracy",
           "class_conditional", "class_conditional_summary", "class_index", "containment_expected",
           "containment_intervals", "percentile_interval", "permutation_null", "poisson_binomial_pmfs",
           "spearman_intervals", "example_weights",
           "EL2N", "ErrorConsistency", "Forgetting", "LearnedAt", "MarginForgetting", "NUMPY_MAX_CELLS", "Record",
           "Speed", "TPA", "accessibility", "accuracy", "agreement", "agreement_summary", "as_record", "aum",
           "binomial_pmf", "cartography", "chance_agreement", "consensus_agreement", "containment", "cscore", "el2n",
           "error_consistency", "fleiss_kappa", "forgetting", "kappa_summary", "learned_at", "margin_forgetting",
           "pack", "pairwise_spearman", "poisson_binomial_pmf", "rank", "spearman", "speed_counts", "split_half",
           "tpa_counts", "unpack"]
