"""``ctpo bench``: speed as a ratio against a named baseline measured in the same run.

* :mod:`~ctpo_cli.bench.loss`: our losses against verl's ``vanilla``.
* :mod:`~ctpo_cli.bench.scoring`: the scoring pool against math-verify in-process.
* :mod:`~ctpo_cli.bench.sandbox`: the sandbox service against bare ``python -c`` subprocesses.
"""
