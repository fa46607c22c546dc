"""The sweep's one aggregate report (``<sweep>/report/``), per override set of the grid:

* ``methods.csv``: per method, avg@k over seeds with its 95% t-interval (:mod:`analysis.aggregate`):
  local, on the seed's held-out problems, the starting policy first; verl, on the paper's benchmarks;
* ``pairs.csv``: every pair of trained methods, the difference paired by seed and problem, with its
  95% interval;
* ``drift.csv``: how far each method's policy moved within a rollout batch (|log ratio|, clip rates);
* ``comparison.png`` / ``.pdf``: both tables as a figure; ``report.md``: the tables in Markdown.

With several override sets each gets its files under ``report/<override hash>/``.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from analysis import aggregate
from analysis.commands import print_frame
from analysis.figures import comparison_figure, save
from analysis.report import markdown, overall_row, read_eval
from ctpo_cli.errors import DataError
from ctpo_cli.sweep.grid import Cell, SweepDir, SweepSpec, overrides_key
from ctpo_cli.sweep.local import START, start_eval, start_of


def evaluated(cell: Cell, eval_dir: Path) -> aggregate.Evaluated:
    """A cell's eval as :class:`analysis.aggregate.Evaluated`."""
    result = read_eval(eval_dir)
    row = overall_row(result.summary)
    if row is None or result.problems is None:
        raise DataError(f"{eval_dir} has no overall row or no per-problem file")
    return aggregate.Evaluated(cell.method, cell.seed, float(row["avg_at_k"]), result.problems)


def write_report(sweep: SweepDir, spec: SweepSpec, console: Console) -> list[Path]:
    """Write the report (module docstring), print its tables; returns the files written."""
    cells = spec.cells
    override_sets = list(dict.fromkeys(c.overrides for c in cells))
    paths: list[Path] = []
    for overrides in override_sets:
        members = [c for c in cells if c.overrides == overrides]
        out = sweep.report if len(override_sets) == 1 else sweep.report / overrides_key(overrides)
        starts = list(dict.fromkeys(start_of(c) for c in members)) if spec.backend == "local" else []
        runs = [evaluated(s, start_eval(sweep.root, s)) for s in starts]
        states = {c: sweep.state(c) for c in members}
        runs += [evaluated(c, Path(str(states[c].eval_dir))) for c in members]
        methods = aggregate.method_table(runs)
        pairs = aggregate.pair_table(runs, [m for m in spec.methods])
        drift = aggregate.drift_table([(c.method, Path(str(states[c].run_dir))) for c in members])
        label = " ".join(overrides) or "no overrides"
        seeds = len(spec.seeds)
        if spec.backend == "local":
            title = f"{spec.preset} preset, {seeds} seeds, avg@{spec.samples} on held-out problems ({label})"
            heading = f"Held-out avg@{spec.samples} per method, over {seeds} seeds ({START}: the warm-started policy)"
        else:
            title = f"verl, {spec.model or 'default model'}, {seeds} seeds, avg@{spec.samples} on the paper's benchmarks ({label})"
            heading = f"avg@{spec.samples} on the paper's benchmarks per method, over {seeds} seeds"
        sections = [
            (heading, aggregate.method_display(methods)),
            (
                "Pairwise differences a − b, paired by seed and problem (* : 95% interval excludes 0)",
                aggregate.pair_display(pairs),
            ),
            (
                "Drift within a rollout batch (off-policy mini-batches; mean over seeds and steps)",
                aggregate.drift_display(drift),
            ),
        ]
        for heading, frame in sections:
            print_frame(frame, heading, console)
        out.mkdir(parents=True, exist_ok=True)
        for stem, frame in (("methods", methods), ("pairs", pairs), ("drift", drift)):
            frame.to_csv(out / f"{stem}.csv", index=False)
            paths.append(out / f"{stem}.csv")
        paths += save(comparison_figure(methods, pairs, title), out, "comparison")
        md = out / "report.md"
        md.write_text(
            f"## {title}\n\n" + "\n\n".join(f"### {h}\n\n{markdown(f)}" for h, f in sections) + "\n"
        )
        paths.append(md)
    for path in paths:
        console.print(f"wrote [bold]{path}[/]")
    return paths
