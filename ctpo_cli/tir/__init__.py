"""Tool-integrated reasoning, shared by training (verl and local) and ``ctpo eval``.

* :mod:`~ctpo_cli.tir.protocol`: what the model sees and does (system prompt, ```python blocks, tool
  output, turn and token budgets) and the tool loop that drives it.
* :mod:`~ctpo_cli.tir.scoring`: the final ``\\boxed{}`` answer checked by math-verify in a process pool.
"""
