"""Agreement and learning-order metrics computed from a run's packed correctness bits (numba on uint64 words).

Every public function takes a Run (and a split) or a packed uint8 array [T, P, R] with its N, validates it, and
returns numpy arrays or plain dicts. Nothing here imports torch.
"""

from .agreement import (accuracy, agreement_summary, binomial_pmf, error_consistency, fleiss_kappa,
                        kappa_summary, poisson_binomial_pmf, tpa_counts)
from .consensus import consensus_agreement
from .order import (accessibility, containment, cscore, forgetting, learned_at, pairwise_spearman, spearman,
                    speed_counts, split_half)

__all__ = ["accessibility", "accuracy", "agreement_summary", "binomial_pmf", "consensus_agreement", "containment",
           "cscore", "error_consistency", "fleiss_kappa", "forgetting", "kappa_summary", "learned_at",
           "pairwise_spearman", "poisson_binomial_pmf", "spearman", "speed_counts", "split_half", "tpa_counts"]
