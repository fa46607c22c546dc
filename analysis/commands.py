"""What ``ctpo plot std-growth|clip-rate|curves`` and ``ctpo report`` do: resolve the runs, compute,
draw, write PNG + PDF (+ CSV/Markdown), log them to each run's MLflow record, and say where they went.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pandas as pd
from rich.console import Console
from rich.table import Table

from analysis import aggregate, positions, report
from analysis.curves import CURVES, all_patterns, curve_series, seed_band, smooth
from analysis.figures import (
    ClipSeries,
    MethodCurves,
    StdSeries,
    clip_rate_figure,
    curves_figure,
    ratio_text,
    save,
    std_growth_figure,
)
from analysis.runs import Run, load_metrics, load_positions, log_artifacts, resolve_runs
from ctpo_cli.errors import ConfigError, DataError, InputFileError
from ctpo_cli.runs import atomic
from ctpo_cli.runs.atomic import atomic_path

PHASES = ("early", "mid", "late")
TABLE2_TITLE = "Table 2: avg@k (%) [95% interval: over seeds when there are ≥ 2, else across problems]"
UNIFORMITY_TITLE = (
    "clip rate in the first and last token-quartile of positions (¼: positions holding 25% of tokens)\n"
    f"{positions.window_label('fixed')}; {positions.window_label('sqrt')}"
)
T = TypeVar("T")


@dataclass(frozen=True)
class Options:
    """Options shared by the commands."""

    out: Path = Path("figures")
    log_mlflow: bool = True
    console: Console = field(default_factory=Console)


def parse_steps(text: str) -> list[int]:
    """``"50,100,150"`` -> [50, 100, 150]; empty -> [] (the default spread of steps)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(
            f"--steps takes comma-separated step numbers, e.g. 50,100,150; got {text!r}"
        ) from None


def _runs(run_args: Sequence[str], options: Options) -> list[Run]:
    runs = resolve_runs(run_args)
    table = Table(
        "run", "method", "seed", "records", title="runs" if run_args else "latest run of each method"
    )
    for run in runs:
        table.add_row(run.name, run.method, "–" if run.seed is None else str(run.seed), run.source)
    options.console.print(table)
    return runs


def _publish(runs: Sequence[Run], paths: Sequence[Path], artifact_path: str, options: Options) -> None:
    """Say where the files went and log them to every run's MLflow record."""
    for path in paths:
        options.console.print(f"wrote [bold]{path}[/]")
    if options.log_mlflow:
        for message in log_artifacts(runs, paths, artifact_path):
            options.console.print(message, highlight=False)


def print_frame(frame: pd.DataFrame, title: str, console: Console) -> None:
    table = Table(*[str(c) for c in frame.columns], title=title)
    for row in frame.itertuples(index=False):
        table.add_row(*[str(v) for v in row])
    console.print(table)


def _csv(frame: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path


# ---------------------------------------------------------------------------------------------
# per-position figures


def _panels(
    runs: Sequence[Run], rows: dict[str, pd.DataFrame], requested: Sequence[int]
) -> list[tuple[str, list[tuple[Run, int]]]]:
    """Panels as (title, [(run, step)]): one per requested step (the nearest each run has) or, by
    default, early/mid/late steps of each run; panels that repeat an earlier one are dropped."""
    chosen = {}
    for run in runs:
        available = rows[run.name]["step"].unique().tolist()
        chosen[run.name] = (
            positions.nearest_steps(available, requested)
            if requested
            else positions.spread_steps(available, len(PHASES))
        )
    panels: list[tuple[str, list[tuple[Run, int]]]] = []
    seen: set[tuple[int, ...]] = set()
    for i in range(len(requested) or len(PHASES)):
        members = [(run, chosen[run.name][i]) for run in runs]
        key = tuple(step for _, step in members)
        if key in seen:
            continue
        seen.add(key)
        steps = set(key)
        if requested:
            title = f"step {requested[i]}" if steps == {requested[i]} else f"nearest to step {requested[i]}"
        else:
            title = PHASES[i] + (f" (step {key[0]})" if len(steps) == 1 else "")
        panels.append((title, members))
    return panels


def _position_panels(
    runs: Sequence[Run],
    steps: Sequence[int],
    include_onpolicy: bool,
    build: Callable[[Run, int, pd.DataFrame], T],
) -> list[tuple[str, list[T]]]:
    """The panels of a per-position figure: each run's per-position statistics (the off-policy
    plane unless ``include_onpolicy``), laid out by :func:`_panels`, one ``build(run, step, rows of
    that step)`` per member."""
    rows = {run.name: positions.select_plane(load_positions(run), include_onpolicy) for run in runs}
    return [
        (title, [build(run, step, positions.step_rows(rows[run.name], step)) for run, step in members])
        for title, members in _panels(runs, rows, steps)
    ]


def std_growth(
    run_args: Sequence[str], steps: Sequence[int], include_onpolicy: bool, scale: str, options: Options
) -> list[Path]:
    """``ctpo plot std-growth``: std of K_t against t with the sigma sqrt(t) and free power fits."""

    def build(run: Run, step: int, step_rows: pd.DataFrame) -> StdSeries:
        std = positions.std_by_position(step_rows)
        try:
            fit: positions.GrowthFit | None = positions.fit_growth(std)
        except ValueError:  # K_t without variance at this step (e.g. no advantage, no update): no fit
            fit = None
        return StdSeries(run, step, std, fit)

    runs = _runs(run_args, options)
    panels = _position_panels(runs, steps, include_onpolicy, build)
    fits = pd.DataFrame(
        [
            {"panel": title, "run": s.run.name, "method": s.run.method, "step": s.step, **_fit_fields(s.fit)}
            for title, series in panels
            for s in series
        ]
    ).drop_duplicates(["run", "step"])
    shown = fits.assign(
        sigma=fits["sigma"].map("{:.4g}".format),
        exponent=[f"{b:.3f} ± {se:.3f}" for b, se in zip(fits["exponent"], fits["exponent_se"], strict=True)],
        r2=fits["r2"].map("{:.3f}".format),
        range=[f"{a:.0f}-{b:.0f}" for a, b in zip(fits["t_start"], fits["t_end"], strict=True)],
    )[["run", "step", "sigma", "exponent", "r2", "range", "positions"]]
    shown[fits["sigma"].isna().to_numpy()] = shown[fits["sigma"].isna().to_numpy()].assign(
        sigma="no variance", exponent="–", r2="–", range="–"
    )
    title = f"std(K_t) fits: σ̂ of σ√τ; b ± se and R² of the free fit a·τ^b\n{positions.FIT_RULE}"
    print_frame(shown, title, options.console)
    paths = save(std_growth_figure(panels, scale), options.out, "std_growth")
    paths.append(_csv(fits, options.out / "std_growth_fits.csv"))
    _publish(runs, paths, "figures", options)
    return paths


def _fit_fields(fit: positions.GrowthFit | None) -> dict[str, float]:
    """A fit's fields for the table (NaN when there was nothing to fit)."""
    names = positions.GrowthFit.__dataclass_fields__
    return vars(fit) if fit is not None else dict.fromkeys(names, math.nan)


def clip_rate(
    run_args: Sequence[str], steps: Sequence[int], include_onpolicy: bool, bins: int, options: Options
) -> list[Path]:
    """``ctpo plot clip-rate``: clip rate by position, fixed vs sqrt(t) window, and its uniformity."""

    def build(run: Run, step: int, step_rows: pd.DataFrame) -> ClipSeries:
        return ClipSeries(run, step, positions.clip_rates(step_rows, bins), positions.uniformity(step_rows))

    runs = _runs(run_args, options)
    panels = _position_panels(runs, steps, include_onpolicy, build)
    series = {(s.run.name, s.step): s for _, members in panels for s in members}.values()
    table = pd.concat(
        [s.uniformity.rename_axis("window").reset_index().assign(run=s.run.name, step=s.step) for s in series]
    )
    print_frame(_uniformity_display(table), UNIFORMITY_TITLE, options.console)
    binned = pd.concat([s.rates.assign(run=s.run.name, method=s.run.method, step=s.step) for s in series])
    paths = save(clip_rate_figure(panels), options.out, "clip_rate")
    paths.append(_csv(table, options.out / "clip_rate_uniformity.csv"))
    paths.append(_csv(binned, options.out / "clip_rate_bins.csv"))
    _publish(runs, paths, "figures", options)
    return paths


def _uniformity_display(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, step): each window's first -> last token-quartile clip rate."""
    rows = []
    for (run, step), windows in table.groupby(["run", "step"], sort=False):
        by_window = windows.set_index("window")
        row = {"run": run, "step": step}
        for window, name in (("fixed", "fixed"), ("sqrt", "√t")):
            early, late, ratio = by_window.loc[window, ["early", "late", "ratio"]]
            row[f"{name}: first→last ¼"] = _quartiles(early, late, ratio)
        row["positions t (first ¼ | last ¼)"] = (
            f"{by_window['t_early'].iloc[0]} | {by_window['t_late'].iloc[0]}"
        )
        rows.append(row)
    return pd.DataFrame(rows)


def _quartiles(early: float, late: float, ratio: float) -> str:
    return f"{early:.1%} → {late:.1%} ({ratio_text(ratio)})"


# ---------------------------------------------------------------------------------------------
# training curves


def curves(run_args: Sequence[str], smooth_window: int, options: Options) -> list[Path]:
    """``ctpo plot curves``: reward, validation avg@k, clip fraction, KL, length against step."""
    runs = _runs(run_args, options)
    patterns = all_patterns()
    metrics = {run.name: load_metrics(run, patterns) for run in runs}
    methods = []
    for method in dict.fromkeys(r.method for r in runs):
        members = [r for r in runs if r.method == method]
        bands = {}
        for curve in CURVES:
            found = [curve_series(metrics[r.name], curve) for r in members]
            series = [smooth(s, smooth_window) if curve.dense else s for s in found if s is not None]
            if series:
                bands[curve.name] = seed_band(series)
        missing = [c.name for c in CURVES if c.name not in bands]
        if missing:
            options.console.print(f"{method}: not logged: {', '.join(missing)}", highlight=False)
        methods.append(MethodCurves(method, len(members), bands))
    paths = save(curves_figure(methods, smooth_window), options.out, "curves")
    _publish(runs, paths, "figures", options)
    return paths


# ---------------------------------------------------------------------------------------------
# report


def run_report(run_args: Sequence[str], options: Options, eval_name: str = "") -> list[Path]:
    """``ctpo report``: Table 2, the ablation, eval behaviour and the clipping mechanism per run.

    ``run_args`` may also name eval directories outside any run (the base model); ``eval_name``
    picks ``<run_dir>/eval/<eval_name>/`` when a run has several evaluations.
    """
    base_dirs = [Path(a) for a in run_args if report.is_eval_dir(Path(a))]
    run_names = [a for a in run_args if not report.is_eval_dir(Path(a))]
    runs = _runs(run_names, options) if run_names or not base_dirs else []
    evaluated = [(report.base_run(path), report.read_eval(path)) for path in base_dirs]
    for run in runs:
        try:
            evaluated.append((run, report.read_eval(report.run_eval_dir(run, eval_name))))
        except (FileNotFoundError, DataError) as error:
            options.console.print(f"skipped: {error}", highlight=False)
    if not evaluated:
        raise InputFileError(
            "none of these runs has eval results (<run_dir>/eval/summary.csv); run `ctpo eval` first"
        )
    for run, result in evaluated:
        options.console.print(f"{run.label}: eval results from {result.path}", highlight=False)
    groups = report.group_runs(evaluated)
    table = report.table2(groups)
    sections = [(TABLE2_TITLE, report.table2_display(table), table, "table2")]
    ablation = report.ablation(groups, table)
    if ablation is None:
        options.console.print(
            "ablation: needs evaluated ctpo and ctpo-fixed runs of the same model", highlight=False
        )
    else:
        title = "Ablation: ctpo vs ctpo-fixed (avg@k %, Δ with its 95% interval)"
        sections.append((title, report.ablation_display(ablation), ablation, "ablation"))
    for model, pairs in _seed_pairs(evaluated):
        title = f"{model}: pairwise differences a − b over seeds, paired by seed and problem (* : 95% interval excludes 0)"
        sections.append((title, aggregate.pair_display(pairs), pairs, f"pairs_{model}"))
    behaviour = report.behaviour(groups)
    if not behaviour.empty:
        title = "Eval behaviour (average over benchmarks, mean over seeds)"
        sections.append((title, _numbers(behaviour), behaviour, "behaviour"))
    mechanism = _mechanism(runs, options.console)
    if not mechanism.empty:
        title = "Clipping by position (last diagnosed step, off-policy)"
        sections.append((title, _mechanism_display(mechanism), mechanism, "mechanism"))
    paths = []
    for title, shown, data, stem in sections:
        print_frame(shown, title, options.console)
        paths.append(_csv(data, options.out / f"report_{stem}.csv"))
    markdown = "\n\n".join(f"### {title}\n\n{report.markdown(shown)}" for title, shown, _, _ in sections)
    md_path = options.out / "report.md"
    atomic.write_text(md_path, markdown + "\n")
    paths.append(md_path)
    _publish(runs, paths, "report", options)
    return paths


def _seed_pairs(evaluated: Sequence[tuple[Run, report.EvalResult]]) -> list[tuple[str, pd.DataFrame]]:
    """Per model with several seeds of some method: every pair of its methods, paired by seed and
    problem (:func:`analysis.aggregate.pair_table`, the statistics of ``ctpo sweep``'s report)."""
    by_model: dict[str, list[aggregate.Evaluated]] = {}
    for run, result in evaluated:
        row = report.overall_row(result.summary)
        if run.seed is None or row is None or result.problems is None or run.method == report.BASE:
            continue
        item = aggregate.Evaluated(run.method, run.seed, float(row["avg_at_k"]), result.problems)
        by_model.setdefault(Path(run.model).name, []).append(item)
    out = []
    for model, items in by_model.items():
        methods = list(dict.fromkeys(i.method for i in items))
        seeds = {m: sum(i.method == m for i in items) for m in methods}
        if len(methods) >= 2 and max(seeds.values()) >= 2:
            pairs = aggregate.pair_table(items)
            if not pairs.empty:
                out.append((model, pairs))
    return out


def _mechanism(runs: Sequence[Run], console: Console) -> pd.DataFrame:
    """Per run with per-position diagnostics: step_summary of its last off-policy step."""
    rows = []
    for run in runs:
        try:
            selected = positions.select_plane(load_positions(run))
        except (FileNotFoundError, ValueError) as error:
            console.print(f"clipping table: skipped {run.label}: {error}", highlight=False)
            continue
        step = int(selected["step"].max())
        summary = positions.step_summary(positions.step_rows(selected, step))
        rows.append({"run": run.name, "method": run.method, "step": step, **summary})
    return pd.DataFrame(rows)


def _mechanism_display(frame: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "run": frame["run"],
            "step": frame["step"],
            "σ̂ (σ√τ fit)": frame["sigma"].map("{:.3g}".format),
            "b ± se (R²), t ≥ t₀": [
                "no variance" if math.isnan(b) else f"{b:.2f} ± {se:.2f} ({r:.3f}), {t0:.0f}"
                for b, se, r, t0 in zip(
                    frame["exponent"], frame["exponent_se"], frame["r2"], frame["t_start"], strict=True
                )
            ],
            "fixed: first→last ¼": _window_quartiles(frame, "fixed"),
            "√t: first→last ¼": _window_quartiles(frame, "sqrt"),
        }
    )


def _window_quartiles(frame: pd.DataFrame, window: str) -> list[str]:
    columns = (frame[f"{window}_{c}"] for c in ("early", "late", "ratio"))
    return [_quartiles(*values) for values in zip(*columns, strict=True)]


def _numbers(frame: pd.DataFrame) -> pd.DataFrame:
    """Floats to 3 significant digits, missing values as ``–``."""

    def text(value: float) -> str:
        return "–" if math.isnan(value) else f"{value:.3g}"

    return frame.apply(lambda c: c.map(text) if pd.api.types.is_float_dtype(c) else c)
