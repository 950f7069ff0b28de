"""Score a predictor against the exact Bayes NLL of the Markov-k benchmark: here, Bayes that has
lost one symbol of context (order k-1), which costs about +14.5% (docs/design.md §8)."""

import torch

from eqprop import markov

k = 3
tokens = markov.sample(2000, k, seed=0)  # [2000, 800]: each sequence has its own transition table
bayes = markov.bayes_nll(tokens, k, dtype=torch.float64)  # [B, L] exact -ln P_Bayes(x_t | x_<t)
shorter = markov.bayes_nll(tokens, k - 1, dtype=torch.float64)  # a model that sees only k-1 tokens

per_seq = bayes[:, k:].mean(1)
anchor = markov.BAYES_NLL_ANCHORS[k]  # 10^6-sequence Monte-Carlo mean with its SE
print(
    f"Bayes NLL per token: {per_seq.mean():.4f} +- {per_seq.std() / len(per_seq) ** 0.5:.4f} "
    f"(anchor {anchor.nll:.5f} +- {anchor.se:.5f})"
)
gap, se = markov.gap_pct(shorter, bayes, k)
print(f"order-{k - 1} predictor on order-{k} data: gap to Bayes {gap:+.2f}% +- {se:.2f}")
_, coverage = markov.context_coverage(tokens, k)
print("context visits per sequence:", {name: round(v, 3) for name, v in coverage.items()})
