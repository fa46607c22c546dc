"""Tests of ctpo_cli.algo.diagnostics: per-position statistics of K_t, fed from inside the loss.

Expected values are computed here by Python loops over the tokens (t and K_t from their definition in
docs/method.md), never by the code under test.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import pandas as pd
import pytest
import torch

from ctpo_cli.algo import diagnostics
from ctpo_cli.algo.losses import get_policy_loss

DT = torch.float64
COLUMNS = [
    "step",
    "offpolicy",
    "position",
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
]
STATS = COLUMNS[3:]
CTPO_CONFIG = {"ctpo_clip_low": 0.05, "ctpo_clip_high": 0.08, "ctpo_clip_c": 0.1, "ctpo_power": 0.4}

OwnWindow = Callable[[float, float, int], tuple[bool, bool]]


def ctpo_own(k: float, d: float, t: int) -> tuple[bool, bool]:
    """Outside the configured CTPO window [-0.05 t^0.4, 0.08 t^0.4] on K_t."""
    return k < -0.05 * t**0.4, k > 0.08 * t**0.4


def grpo_own(k: float, d: float, t: int) -> tuple[bool, bool]:
    """Outside the PPO window [0.8, 1.2] on the token ratio exp(d_t)."""
    return math.exp(d) < 0.8, math.exp(d) > 1.2


OWN: dict[str, tuple[dict[str, float], OwnWindow]] = {"ctpo": (CTPO_CONFIG, ctpo_own), "grpo": ({}, grpo_own)}


def make_batch(seed: int, rows: int = 5, cols: int = 24, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """Ragged responses with tool-output spans (mask 0, garbage log ratios) inside them."""
    gen = torch.Generator().manual_seed(seed)
    lp = -2.0 * torch.rand(rows, cols, generator=gen, dtype=DT)
    d = scale * torch.randn(rows, cols, generator=gen, dtype=DT)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(rows):
        mask[i, : cols - 3 * i] = True
    mask[0, 4:9] = False
    mask[min(2, rows - 1), 1:3] = False
    d[~mask] = 5.0
    adv = torch.randn(rows, 1, generator=gen, dtype=DT).expand(rows, cols).contiguous()
    return {"old_log_prob": lp - d, "log_prob": lp, "advantages": adv, "response_mask": mask}


def feed(name: str, batch: Mapping[str, torch.Tensor], config: Mapping[str, float] | None = None) -> None:
    """One micro-batch through the loss (forward and backward), as the trainer does."""
    lp = batch["log_prob"].detach().clone().requires_grad_(True)
    loss, _ = get_policy_loss(name)(
        batch["old_log_prob"], lp, batch["advantages"], batch["response_mask"], "token-mean", config
    )
    loss.backward()


def expected_stats(
    batches: Iterable[Mapping[str, torch.Tensor]], own: OwnWindow
) -> dict[int, dict[str, float]]:
    """{t: {column: value}} summed over every model token of every batch."""
    out: dict[int, dict[str, float]] = {}
    for batch in batches:
        d_all = (batch["log_prob"] - batch["old_log_prob"]).tolist()
        for row_d, row_m in zip(d_all, batch["response_mask"].tolist(), strict=True):
            t, k = 0, 0.0
            for d, m in zip(row_d, row_m, strict=True):
                if not m:
                    continue
                t += 1
                k += d
                low, high = own(k, d, t)
                acc = out.setdefault(t, dict.fromkeys(STATS, 0.0))
                acc["n"] += 1
                acc["k_sum"] += k
                acc["k_sumsq"] += k * k
                acc["d_sum"] += d
                acc["d_sumsq"] += d * d
                acc["own_low"] += low
                acc["own_high"] += high
                acc["fixed_low"] += k < -math.log(2.0)
                acc["fixed_high"] += k > math.log(5.0)
                acc["sqrt_low"] += k < -0.025 * math.sqrt(t)
                acc["sqrt_high"] += k > 0.05 * math.sqrt(t)
    return out


def add(
    a: Mapping[int, Mapping[str, float]], b: Mapping[int, Mapping[str, float]]
) -> dict[int, dict[str, float]]:
    return {
        t: {c: a.get(t, {}).get(c, 0.0) + b.get(t, {}).get(c, 0.0) for c in STATS} for t in set(a) | set(b)
    }


def assert_plane(frame: pd.DataFrame, offpolicy: bool, expected: Mapping[int, Mapping[str, float]]) -> None:
    rows = frame[frame["offpolicy"] == offpolicy].sort_values("position")
    assert rows["position"].tolist() == sorted(expected)
    for column in STATS:
        want = [expected[t][column] for t in sorted(expected)]
        assert rows[column].tolist() == pytest.approx(want, abs=1e-10), column


@pytest.mark.parametrize("name", ["ctpo", "grpo"])
def test_loss_feeds_accumulator(name: str, tmp_path: Path, no_active_diagnostics: None) -> None:
    config, own = OWN[name]
    batches = [make_batch(1), make_batch(2, rows=3, cols=30)]  # two micro-batches of different lengths
    stats = diagnostics.PositionStats(tmp_path, rank=0)
    diagnostics.activate(stats)
    for batch in batches:
        feed(name, batch, config)
    frame = stats.to_frame(step=3)
    expected = expected_stats(batches, own)
    assert_plane(frame, False, expected)
    assert not frame["offpolicy"].any()
    assert (frame["step"] == 3).all()
    # the data exercise every counter (so a column stuck at 0 would fail)
    totals = {c: sum(v[c] for v in expected.values()) for c in STATS}
    assert all(
        totals[c] > 0 for c in ("own_low", "own_high", "fixed_low", "fixed_high", "sqrt_low", "sqrt_high")
    )
    # a masked span does not advance t: in the second batch response 0 spans 30 slots of which 5 are
    # tool output (25 model tokens); the longest response has 27 model tokens
    assert frame["position"].max() == 27
    # the loss does not feed an inactive accumulator
    diagnostics.activate(None)
    feed(name, batches[0], config)
    pd.testing.assert_frame_equal(stats.to_frame(step=3), frame)


def test_minibatch_planes(tmp_path: Path, no_active_diagnostics: None) -> None:
    """The step's first mini-batch is the on-policy plane; every later one (after end_minibatch) off-policy."""
    b1, b2, b3 = make_batch(3), make_batch(4), make_batch(5, rows=2, cols=10)
    stats = diagnostics.PositionStats(tmp_path, rank=0)
    diagnostics.activate(stats)
    feed("ctpo", b1, CTPO_CONFIG)
    assert not stats.to_frame(0)["offpolicy"].any()
    stats.end_minibatch()
    feed("ctpo", b2, CTPO_CONFIG)
    stats.end_minibatch()
    feed("ctpo", b3, CTPO_CONFIG)
    frame = stats.to_frame(0)
    assert_plane(frame, False, expected_stats([b1], ctpo_own))
    assert_plane(frame, True, add(expected_stats([b2], ctpo_own), expected_stats([b3], ctpo_own)))


def test_flush_writes_parquet_and_resets(tmp_path: Path, no_active_diagnostics: None) -> None:
    stats = diagnostics.PositionStats(tmp_path, rank=0)
    assert stats.flush(1) is None  # nothing recorded: no file
    assert not (tmp_path / "positions").exists()
    diagnostics.activate(stats)
    b1, b2 = make_batch(6), make_batch(7)
    feed("ctpo", b1, CTPO_CONFIG)
    stats.end_minibatch()
    feed("ctpo", b2, CTPO_CONFIG)
    path = stats.flush(7)
    assert path == tmp_path / "positions" / "step_000007.parquet"
    written = pd.read_parquet(path)
    assert list(written.columns) == COLUMNS
    assert (written["step"] == 7).all()
    assert_plane(written, False, expected_stats([b1], ctpo_own))
    assert_plane(written, True, expected_stats([b2], ctpo_own))
    assert sorted(p.name for p in (tmp_path / "positions").iterdir()) == [
        "step_000007.parquet"
    ]  # no temp left
    # reset: empty, and the next record is the next step's first (on-policy) mini-batch
    assert stats.to_frame(8).empty
    assert stats.flush(8) is None
    feed("ctpo", b2, CTPO_CONFIG)
    assert_plane(stats.to_frame(8), False, expected_stats([b2], ctpo_own))
    assert not stats.to_frame(8)["offpolicy"].any()
    # other ranks write their own file
    other = diagnostics.PositionStats(tmp_path, rank=2)
    other.record(*_record_args(b1))
    assert other.flush(7) == tmp_path / "positions" / "step_000007.rank2.parquet"


def _record_args(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Arguments for PositionStats.record computed here (K_t, d_t, t by loops; own-window flags False)."""
    rows, cols = batch["log_prob"].shape
    k = torch.zeros(rows, cols, dtype=DT)
    d = torch.zeros(rows, cols, dtype=DT)
    t = torch.zeros(rows, cols, dtype=DT)
    for i in range(rows):
        count, total = 0, 0.0
        for j in range(cols):
            if bool(batch["response_mask"][i, j]):
                count += 1
                d[i, j] = float(batch["log_prob"][i, j] - batch["old_log_prob"][i, j])
                total += float(d[i, j])
            k[i, j], t[i, j] = total, count
    no = torch.zeros(rows, cols, dtype=torch.bool)
    return k, d, t, batch["response_mask"].to(DT), no, no


def test_memory_is_o_max_len(tmp_path: Path, no_active_diagnostics: None) -> None:
    """The buffer's size follows the longest response, not the number of tokens fed."""
    stats = diagnostics.PositionStats(tmp_path, rank=0)
    diagnostics.activate(stats)
    batch = make_batch(8, rows=4, cols=16)
    for _ in range(40):
        feed("ctpo", batch)
    buf = stats._buf  # the accumulator's only storage
    assert buf is not None and tuple(buf.shape) == (2, 16, len(STATS))
    longer = make_batch(9, rows=2, cols=40)
    feed("ctpo", longer)
    feed("ctpo", batch)
    assert stats._buf is not None and tuple(stats._buf.shape) == (2, 40, len(STATS))
    # growing kept what was recorded before
    frame = stats.to_frame(0)
    n_fed = 41 * int(batch["response_mask"].sum()) + int(longer["response_mask"].sum())
    assert frame["n"].sum() == n_fed


def test_read_positions_sums_ranks(tmp_path: Path) -> None:
    b0, b1, b2 = make_batch(10), make_batch(11), make_batch(12, rows=2, cols=33)
    rank0 = diagnostics.PositionStats(tmp_path, rank=0)
    rank1 = diagnostics.PositionStats(tmp_path, rank=1)
    rank0.record(*_record_args(b0))
    rank1.record(*_record_args(b1))
    rank1.end_minibatch()
    rank1.record(*_record_args(b2))
    rank0.flush(1)
    rank1.flush(1)
    rank0.record(*_record_args(b2))
    rank0.flush(2)
    frame = diagnostics.read_positions(tmp_path)
    assert set(frame["step"]) == {1, 2}
    no_own = lambda k, d, t: (False, False)  # noqa: E731 - record was given no own-window flags
    step1 = frame[frame["step"] == 1]
    assert_plane(step1, False, add(expected_stats([b0], no_own), expected_stats([b1], no_own)))
    assert_plane(step1, True, expected_stats([b2], no_own))
    step2 = frame[frame["step"] == 2]
    assert_plane(step2, False, expected_stats([b2], no_own))
    assert not step2["offpolicy"].any()


def test_read_positions_without_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no per-position diagnostics"):
        diagnostics.read_positions(tmp_path)


def test_discard_positions_after_a_checkpoint_removes_every_ranks_later_files(tmp_path: Path) -> None:
    """A resumed run trains the steps after its checkpoint again; their files go, each rank's too."""
    folder = tmp_path / diagnostics.POSITIONS_DIR
    folder.mkdir()
    names = [
        "step_000001.parquet",
        "step_000001.rank1.parquet",
        "step_000002.parquet",
        "step_000002.rank1.parquet",
        "step_000003.rank1.parquet",
    ]
    for name in names:
        (folder / name).write_bytes(b"")
    removed = diagnostics.discard_positions_after(tmp_path, 1)
    assert sorted(p.name for p in removed) == names[2:]
    assert sorted(p.name for p in folder.iterdir()) == names[:2]


def test_compiled_sums_equal_eager_ones_on_a_large_micro_batch() -> None:
    """Micro-batches of COMPILE_FROM_TOKENS token slots or more are reduced by the compiled function:
    it must give the eager sums, with tool spans (masked runs inside responses) and ragged lengths."""
    rows, length = 64, diagnostics.COMPILE_FROM_TOKENS // 64
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(length // 4, length + 1, (rows, 1), generator=gen)
    mask = torch.arange(length)[None] < lengths
    mask[:, 100:130] = False  # a tool output in every response
    d = torch.where(mask, 0.05 * torch.randn(rows, length, generator=gen), 0.0)
    k = d.cumsum(-1)
    position = mask.float().cumsum(-1)
    low, high = (k < -0.2) & mask, (k > 0.2) & mask
    args = (k, d, position, mask.float(), low, high, *diagnostics.FIXED_WINDOW, *diagnostics.SQRT_WINDOW)
    eager = diagnostics._position_sums(*args)
    compiled = diagnostics.position_sums(*args)
    assert diagnostics._compiled not in (None, False)  # the compiled path ran
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-3)
    assert float(eager[:, 0].sum()) == float(mask.sum())  # every model token counted once
