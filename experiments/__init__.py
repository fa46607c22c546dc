"""The experiments, as YAML: what ``ctpo train`` runs, on either engine.

* verl runs (``ctpo train --method M --model P``): ``base.yaml``, then ``method/<M>.yaml``, then
  ``model/<P>.yaml`` (composition rules: the header of ``base.yaml``, code: ``ctpo_cli.train.experiments``);
  ``verl/`` holds the tool and agent-loop files those runs name.
* local runs (``ctpo train --backend local --preset NAME``): ``local/<NAME>.yaml`` over the documented
  defaults of ``ctpo_cli.train.local.config.LocalConfig``.

The files are package data: :func:`directory` finds them through package resources, so a wheel works
as well as a checkout.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def directory() -> Path:
    """This package's folder (the YAML files lie beside this module in every install)."""
    return Path(str(resources.files(__name__)))
