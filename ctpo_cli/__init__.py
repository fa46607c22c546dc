"""ctpo: which importance-sampling ratio should a policy-gradient trainer use? (docs/method.md)

The package is laid out along the data flow (docs/architecture.md has the map and the rules):

* :mod:`ctpo_cli.algo`: the losses (one registry, verl's signature), their default hyperparameters and
  the per-position diagnostics. Knows nothing of the CLI, verl or the trainers.
* :mod:`ctpo_cli.tir`: tool-integrated reasoning as the model sees it (prompt, code blocks, tool
  output) and how an answer is scored (math-verify in a process pool).
* :mod:`ctpo_cli.runs`: the run directory (``runs/<name>/``) and the one MLflow lifecycle.
* :mod:`ctpo_cli.train`: ``ctpo train``: experiment composition and the launcher, with two engines,
  :mod:`ctpo_cli.train.verl` (verl's own trainer; our plugin) and :mod:`ctpo_cli.train.local`.
* :mod:`ctpo_cli.eval`: ``ctpo eval`` (avg@k with tools).
* :mod:`ctpo_cli.theory`: the paper's Table 1, computed exactly.
* :mod:`ctpo_cli.bench`: ``ctpo bench loss|scoring``.
* :mod:`ctpo_cli.cli` and :mod:`ctpo_cli.quickstart`: the commands.

Beside it: ``analysis`` (figures and reports from runs), ``sandbox`` (the code-execution service),
``dataset`` (benchmarks) and ``experiments`` (YAML presets).
"""
