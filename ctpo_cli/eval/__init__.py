"""``ctpo eval``: avg@k with tool-integrated reasoning (docs/method.md (15)).

:mod:`~ctpo_cli.eval.settings` (what was asked) -> :mod:`~ctpo_cli.eval.backends` (hf, vllm, openai)
driven through the tool loop of :mod:`ctpo_cli.tir.protocol` by :mod:`~ctpo_cli.eval.runner`, samples
saved by :mod:`~ctpo_cli.eval.store`, summarised by :mod:`~ctpo_cli.eval.metrics`.
"""
