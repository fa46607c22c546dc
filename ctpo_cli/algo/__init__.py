"""The algorithm: what differs between GRPO, GSPO, CTPO and the rest, and nothing else.

* :mod:`~ctpo_cli.algo.losses`: one registry of methods, one clipped surrogate (docs/method.md (5)),
  verl's policy-loss signature.
* :mod:`~ctpo_cli.algo.defaults`: every method's default hyperparameters (the one source).
* :mod:`~ctpo_cli.algo.diagnostics`: per-position statistics of K_t and clip counts (method.md (14)).

Imports no CLI, tracking, verl or trainer code (``lint-imports`` checks it).
"""
