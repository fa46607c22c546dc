"""Per-position statistics of the cumulative log ratio K_t: the data behind the paper's Figure 1.

The loss feeds the active :class:`PositionStats` at every micro-batch of every mini-batch, so the
statistics see the policy *after* the earlier optimizer steps of the same rollout batch (pi != mu).
Everything stays on the loss's device in one (2, L, S) float64 buffer (S statistics per position,
one plane for the step's first mini-batch, which is on-policy up to numerics, one for the later,
off-policy ones): memory O(max_len), no host synchronisation until :meth:`PositionStats.flush`,
which writes one small parquet file per training step.

Columns of a flushed file, one row per (offpolicy, position) with at least one token:

    step, offpolicy, position (t = 1..L over model tokens),
    n                       tokens at t
    k_sum, k_sumsq          sum of K_t and K_t^2      -> mean, std of K_t
    d_sum, d_sumsq          sum of d_t and d_t^2      -> per-token log-ratio spread
    own_low, own_high       tokens outside the method's own clip window, by direction
    fixed_low, fixed_high   K_t outside the fixed reference window (default ratio [0.5, 5])
    sqrt_low, sqrt_high     K_t outside the sqrt(t) window [-a_low t^p, a_high t^p] (CTPO defaults)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ctpo_cli.algo import defaults
from ctpo_cli.errors import InputFileError

# torch is imported where tensors are handled, so that readers (analysis/) skip its ~2 s import
if TYPE_CHECKING:
    import torch

STAT_COLUMNS = (
    "n",
    "k_sum",
    "k_sumsq",
    "d_sum",
    "d_sumsq",
    "own_low",
    "own_high",
    "fixed_low",
    "fixed_high",
    "sqrt_low",
    "sqrt_high",
)
FIXED_WINDOW = defaults.FIXED_WINDOW
"""Reference fixed window on K_t: ratio [0.5, 5] (the paper's Figure 1), ctpo-fixed's default."""
SQRT_WINDOW = defaults.SQRT_WINDOW
"""Reference position-adaptive window (a_low, a_high, p): K_t in [-a_low t^p, a_high t^p], ctpo's default."""
POSITIONS_DIR = "positions"
STEP_PREFIX = "step_"
"""Files are ``positions/step_XXXXXX[.rankR].parquet`` (one per step and, beyond rank 0, per rank)."""


class PositionStats:
    """On-device accumulator of per-position K_t statistics and clip counts.

    Call :meth:`record` from the loss, :meth:`end_minibatch` after each optimizer step and
    :meth:`flush` once per training step.
    """

    def __init__(
        self,
        out_dir: str | Path,
        fixed_window: tuple[float, float] = FIXED_WINDOW,
        sqrt_window: tuple[float, float, float] = SQRT_WINDOW,
        rank: int | None = None,
    ) -> None:
        if not (fixed_window[0] <= 0 <= fixed_window[1] and min(sqrt_window) >= 0):
            raise ValueError(
                f"reference windows must hold K = 0: fixed {fixed_window} (log-space low <= 0 <= high), "
                f"sqrt {sqrt_window} (a_low, a_high, p >= 0)"
            )
        self.out_dir = Path(out_dir)
        self.fixed_window = fixed_window
        self.sqrt_window = sqrt_window
        self.rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self.minibatch = 0
        self._buf: torch.Tensor | None = None

    def record(
        self,
        cum_log_ratio: torch.Tensor,
        log_ratio: torch.Tensor,
        position: torch.Tensor,
        mask: torch.Tensor,
        own_low: torch.Tensor,
        own_high: torch.Tensor,
    ) -> None:
        """Add one micro-batch; all arguments are (B, L), ``position`` counts model tokens from 1 (up
        to each token, model or not, as :func:`ctpo_cli.algo.losses.token_terms` does).

        The model tokens are first moved into position order (row i's t-th model token to column t-1:
        one scatter of column indices, a gather per input), so that every per-position sum is a plain
        column sum, with no scatter-add over every token and statistic. Sums over the micro-batch's
        rows are taken in the log-probs' dtype (float32 or wider), then accumulated in float64.
        """
        length = cum_log_ratio.shape[1]
        windows = (*self.fixed_window, *self.sqrt_window)
        inputs = [x.detach() for x in (cum_log_ratio, log_ratio, position, mask, own_low, own_high)]
        stacked = position_sums(*inputs, *windows)
        buf = self._buffer(length, cum_log_ratio.device)
        buf[min(self.minibatch, 1), :length] += stacked

    def _buffer(self, length: int, device: torch.device) -> torch.Tensor:
        """The (2, L, S) buffer, grown (never shrunk) to at least ``length`` positions."""
        import torch

        if self._buf is None:
            self._buf = torch.zeros(2, length, len(STAT_COLUMNS), dtype=torch.float64, device=device)
        elif self._buf.shape[1] < length:
            grown = torch.zeros(2, length, len(STAT_COLUMNS), dtype=torch.float64, device=device)
            grown[:, : self._buf.shape[1]] = self._buf
            self._buf = grown
        return self._buf

    def end_minibatch(self) -> None:
        """Mark an optimizer step: later records count as off-policy."""
        self.minibatch += 1

    def flush(self, step: int) -> Path | None:
        """Write this step's statistics to ``out_dir/positions/step_XXXXXX[.rankR].parquet`` and reset.

        Returns the file written, or None when nothing was recorded.
        """
        frame = self.to_frame(step)
        self.minibatch = 0
        if self._buf is not None:
            self._buf.zero_()
        if frame.empty:
            return None
        directory = self.out_dir / POSITIONS_DIR
        directory.mkdir(parents=True, exist_ok=True)
        suffix = f".rank{self.rank}" if self.rank else ""
        path = directory / f"{STEP_PREFIX}{step:06d}{suffix}.parquet"
        tmp = path.with_suffix(".tmp")
        frame.to_parquet(tmp, index=False)
        tmp.replace(path)
        return path

    def to_frame(self, step: int) -> pd.DataFrame:
        """The accumulated statistics as a DataFrame (one host transfer)."""
        if self._buf is None:
            return pd.DataFrame(columns=["step", "offpolicy", "position", *STAT_COLUMNS])
        host = self._buf.cpu().numpy()
        frames = []
        for plane in (0, 1):
            frame = pd.DataFrame(host[plane], columns=list(STAT_COLUMNS))
            frame.insert(0, "position", range(1, len(frame) + 1))
            frame.insert(0, "offpolicy", bool(plane))
            frames.append(frame[frame["n"] > 0])
        out = pd.concat(frames, ignore_index=True)
        out.insert(0, "step", step)
        return out


def _position_sums(
    cum_log_ratio: torch.Tensor,
    log_ratio: torch.Tensor,
    position: torch.Tensor,
    mask: torch.Tensor,
    own_low: torch.Tensor,
    own_high: torch.Tensor,
    fixed_low: float,
    fixed_high: float,
    a_low: float,
    a_high: float,
    power: float,
) -> torch.Tensor:
    """The (L, S) per-position sums of one micro-batch, columns :data:`STAT_COLUMNS` (see
    :meth:`PositionStats.record`), in float64."""
    import torch

    rows, length = cum_log_ratio.shape
    device = cum_log_ratio.device
    model = mask > 0
    column = torch.arange(length, device=device).expand(rows, length)
    tokens = torch.count_nonzero(model, dim=-1).unsqueeze(-1)
    # a permutation of each row: its t-th model token to column t-1, then its other tokens in order
    before = position.long()  # model tokens up to here (t on a model token)
    target = torch.where(model, before - 1, tokens + column - before)
    source = torch.empty_like(column)
    source.scatter_(1, target, column)  # source[i, t-1]: the column of row i's t-th model token
    valid = column < tokens
    dtype = torch.promote_types(cum_log_ratio.dtype, torch.float32)
    # K_t and d_t in position order, 0 past a row's last model token (where the gather is garbage); the
    # reference windows hold 0, so those zeros are never counted outside them
    k = torch.where(valid, cum_log_ratio.gather(1, source), 0).to(dtype)
    d = torch.where(valid, log_ratio.gather(1, source), 0).to(dtype)
    scale = torch.arange(1, length + 1, device=device, dtype=dtype) ** power
    columns = (
        valid,
        k,
        k * k,
        d,
        d * d,
        own_low.gather(1, source).bool() & valid,
        own_high.gather(1, source).bool() & valid,
        k < fixed_low,
        k > fixed_high,
        k < -a_low * scale,
        k > a_high * scale,
    )
    return torch.stack([c.to(dtype).sum(0) for c in columns], dim=-1).double()


COMPILE_FROM_TOKENS = 1 << 18
"""Micro-batches of at least this many token slots (B x L) get :func:`_position_sums` compiled
(``torch.compile``: one fused pass instead of a pass per statistic); smaller ones, and any that
compiling fails on, run it eagerly. The two agree to float rounding (tests/algo/test_diagnostics.py)."""
_compiled: Any = None


def position_sums(*args: Any) -> torch.Tensor:
    """:func:`_position_sums`, compiled for large micro-batches where the compiler works (else eager)."""
    global _compiled
    rows, length = args[0].shape
    if rows * length >= COMPILE_FROM_TOKENS and _compiled is not False:
        import torch

        try:
            if _compiled is None:
                _compiled = torch.compile(_position_sums, dynamic=True)
            return _compiled(*args)
        except Exception as error:  # no C++ compiler, an unsupported device...: eager from now on
            import warnings

            warnings.warn(
                f"per-position diagnostics run eagerly: torch.compile failed ({error})", stacklevel=2
            )
            _compiled = False
    return _position_sums(*args)


_ACTIVE: PositionStats | None = None


def activate(stats: PositionStats | None) -> None:
    """Make ``stats`` the accumulator the losses feed (None: stop feeding)."""
    global _ACTIVE
    _ACTIVE = stats


def active() -> PositionStats | None:
    """The accumulator the losses currently feed, if any."""
    return _ACTIVE


def read_positions(run_dir: str | Path) -> pd.DataFrame:
    """All per-position files of a run, summed over ranks: one row per (step, offpolicy, position)."""
    files = sorted((Path(run_dir) / POSITIONS_DIR).glob(f"{STEP_PREFIX}*.parquet"))
    if not files:
        raise InputFileError(f"no per-position diagnostics under {Path(run_dir) / POSITIONS_DIR}")
    frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    return frame.groupby(["step", "offpolicy", "position"], as_index=False)[list(STAT_COLUMNS)].sum()


def discard_positions_after(run_dir: str | Path, step: int) -> list[Path]:
    """Delete the per-position files of steps after ``step`` (every rank's); the files deleted. A resumed
    run trains those steps again from its checkpoint."""
    later = [
        path
        for path in (Path(run_dir) / POSITIONS_DIR).glob(f"{STEP_PREFIX}*.parquet")
        if int(path.name.removeprefix(STEP_PREFIX).split(".")[0]) > step
    ]
    for path in later:
        path.unlink()
    return later
