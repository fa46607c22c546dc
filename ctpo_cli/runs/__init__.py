"""Run records: the run directory every engine writes (:mod:`~ctpo_cli.runs.rundir`) and the one
MLflow lifecycle (:mod:`~ctpo_cli.runs.tracking`). ``analysis`` reads what these write."""
