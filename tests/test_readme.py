"""The README's two set-up commands are what CI runs (.ci/run), so a green CI means they work."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Set-up \(a fresh machine\)\s+```bash\n(.*?)```", text, re.DOTALL)
    assert block is not None, "README has no set-up block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_has_two_commands_and_ci_runs_them() -> None:
    install, tests = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    steps = [step.strip() for step in install.split("&&")]
    assert steps[-1] == "ctpo quickstart"
    assert steps[:2] == ["apt-get update", "apt-get install -y bubblewrap"]
    assert "apt-get update -qq && apt-get install -y -qq bubblewrap" in ci
    (pip,) = [step for step in steps if step.startswith("pip install")]
    assert pip.replace("pip install", "pip install -q", 1) in ci
    assert tests == "python -m pytest"
    assert "\npython -m pytest\n" in ci
