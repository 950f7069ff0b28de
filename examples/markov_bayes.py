"""Score a predictor against the exact Bayes NLL of the Markov-k benchmark: here, Bayes that has
lost one symbol of context (order k-1), which costs about +14.5% (DESIGN.md §8)."""

import torch

from eqprop import markov

k = 3
tokens = markov.sample(2000, k, seed=0)  # [2000, 800]: each sequence has its own transition table
bayes = markov.bayes_nll(tokens, k, dtype=torch.float64)  # [B, L] exact -ln P_Bayes(x_t | x_<t)
shorter = markov.bayes_nll(tokens, k - 1, dtype=torch.float64)  # a model that sees only k-1 tokens

gap, se = markov.gap_pct(shorter, bayes, k)
print(f"order-{k - 1} predictor on order-{k} data: gap to Bayes {gap:+.2f}% +- {se:.2f}")
_, coverage = markov.context_coverage(tokens, k)
print("context visits per sequence:", {name: round(v, 3) for name, v in coverage.items()})
