"""Training loops (thin Python, docs/design.md §10).

- ``core``: the one loop every trainer uses (``fit(task, config)``) and the ``Task`` hooks a trainer supplies;
- ``config``: strict dataclass configs and the command-line options generated from them;
- ``checkpoint``: atomic, checksummed checkpoints loaded with ``weights_only=True``;
- ``markov``: transformers on the Markov-k benchmark against the exact Bayes NLL; ``ladder``: grow them
  until the gap gate passes; ``figures``: the plots the trainers write;
- ``equilibrium``: the equilibrium LM trained with BP / BPTT / implicit / EP on Markov-k or text;
- ``lengthgen``: train on windows of W tokens, measure the per-position NLL out to 20·W (docs/design.md §9).
"""

from . import checkpoint, config, core, equilibrium, ladder, lengthgen, markov

__all__ = ["checkpoint", "config", "core", "equilibrium", "ladder", "lengthgen", "markov"]
