"""The interface every language model in eqprop shares, so one trainer can train any of them.

A model for ``eqprop.train`` (``eqprop.models.Transformer``, ``eqprop.EquilibriumLM``) is an
``nn.Module`` with

- constructor names ``vocab_size``, ``d_model``, ``n_head``, ``max_len``, ``pos_enc``;
- ``forward(tokens [B, L] int64) -> logits [B, L, V]``, where ``logits[:, t]`` predicts ``x_{t+1}``
  from ``x_<=t`` (causal);
- ``token_nll(tokens) -> [B, L]``: the NLL (nats) of every token given its prefix,
  ``nll[:, t] = -ln p(x_t | x_<t)``, with ``nll[:, 0] = ln V`` (nothing predicts position 0; the uniform
  predictive is the Bayes one there). This is the layout ``eqprop.markov.gap_pct`` scores.

Trainers compute losses as ``next_token_nll(model(tokens), tokens)``: through ``forward``, so the
DistributedDataParallel wrapper sees the call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def next_token_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token NLL ``[B, L]`` from next-token logits ``[B, L, V]``: ``nll[:, t]`` is the NLL of ``x_t`` under
    ``logits[:, t - 1]``; ``nll[:, 0] = ln V``. Computed in at least float32 (bf16 logits are promoted).

    Example: ``next_token_nll(torch.zeros(1, 5, 2), x)  # all ln 2``
    """
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be [B, L, V] and tokens [B, L] of the same B, L; got {tuple(logits.shape)} "
            f"and {tuple(tokens.shape)}"
        )
    B, L, V = logits.shape
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1), reduction="none")
    first = nll.new_full((B, 1), math.log(V))
    return torch.cat([first, nll.view(B, L - 1)], dim=1)  # [B, L], targets x_1..x_{L-1} after column 0
