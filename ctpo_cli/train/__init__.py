"""``ctpo train``: one command, two engines.

* :mod:`~ctpo_cli.train.experiments`: composes ``experiments/*.yaml`` into verl's config and checks it
  with verl's own Hydra files and validation.
* :mod:`~ctpo_cli.train.launcher`: runs ``python -m verl.trainer.main_ppo`` with a run directory, an
  MLflow run and a sandbox.
* :mod:`ctpo_cli.train.verl`: everything verl imports from us (the ``verl.plugins`` entry point).
* :mod:`ctpo_cli.train.local`: the same losses and diagnostics in a small trainer on one machine.
"""
