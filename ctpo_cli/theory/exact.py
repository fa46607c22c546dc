"""The paper's Table 1, computed: bias and variance of each importance-sampling (IS) weight.

Setting (notation of method.md). A target policy pi (the one being trained) and a behaviour policy mu
(the one that sampled) emit T tokens a_1..a_T from a vocabulary of V. The state s_t that step t
conditions on is the whole prefix a_<t (:class:`TabularProblem`) or only the previous token
(:class:`MarkovProblem`). Softmax parameterisation pi(.|s) = softmax(theta_{t,s}) with separate
parameters for every step t and state s, so

    grad_theta log pi(a | s_t) = onehot(a) - pi(. | s_t)     in the block (t, s_t), zero elsewhere.

The behaviour policy is mu(.|s) = softmax(theta_{t,s} + drift * xi_{t,s}) with xi ~ N(0, I), and a
random outcome reward R(a_1..a_T) ~ U(0, 1) ends the episode:

    J(theta) = E_pi[R],   Q^pi(s_t, a_t) = E_pi[R | a_1..a_t],
    grad J   = E_pi[ sum_t grad log pi(a_t|s_t) Q^pi(s_t, a_t) ]              (policy-gradient theorem).

Estimators. With d_t = log pi(a_t|s_t) - log mu(a_t|s_t) and K_t = d_1 + ... + d_t, each weight of
Table 1 is w_t = exp(b K_{t-1} + c d_t + e (K_T - K_t)) for exponents (b, c, e) (:data:`WEIGHTINGS`):

    token (GRPO)        r_t   = exp(d_t)        (0, 1, 0)
    full sequence       R     = exp(K_T)        (1, 1, 1)
    geometric (GSPO)    g     = exp(K_T / T)    (1/T, 1/T, 1/T)
    cumulative (CTPO)   rho_t = exp(K_t)        (1, 1, 0)

and the single-sequence estimator, a_1..a_T ~ mu, is

    X = sum_t w_t f_t,    f_t = grad log pi(a_t|s_t) A_t,

with A_t = Q^pi(s_t, a_t) (advantage "q", the default) or A^pi(s_t, a_t) = Q^pi - V^pi(s_t)
(advantage "a"); on-policy both give grad J, since E_pi[grad log pi(a|s)] = 0.

Reported: the relative bias ||E_mu X - grad J|| / ||grad J|| and the total variance
tr Cov_mu(X) = E_mu||X||^2 - ||E_mu X||^2. Since f_t lies in step t's block, ||X||^2 = sum_t
w_t^2 ||f_t||^2: the total variance is the sum over positions of Var_t = E||w_t f_t||^2 - ||E w_t f_t||^2.

What theory says. f_t depends on a_1..a_t only, so E_mu[rho_t f_t] = E_pi[f_t] = E_mu[R f_t]:
cumulative and full are unbiased; token and geometric weights do not reweight the prefix (or the
suffix) correctly and are biased. Conditioning on a_<=t, E_mu[R^2 ||f_t||^2] =
E_mu[rho_t^2 ||f_t||^2 E_mu[(R/rho_t)^2 | a_<=t]] and E_mu[(R/rho_t)^2 | a_<=t] >= (E_mu[R/rho_t |
a_<=t])^2 = 1 (Jensen; strict unless the remaining ratio is constant), and the two means are equal,
so Var_t(cumulative) < Var_t(full) for t < T, with equality at t = T. Summed over t this gives the
total-variance inequality for separate per-position parameters.

Shared parameters. An LLM uses the same weights at every position. Then the terms of different
positions land in the same coordinates, the total variance gains sum_{s != t} tr Cov(w_s f_s, w_t f_t),
and these cross terms can reverse the order: :func:`shared_parameter_moments` (steps 2..T share one
table) finds problems with Var(full) < Var(cumulative). The per-token claim survives, the claim
about the whole gradient estimator does not.

Outcome advantage. GRPO-style trainers put the outcome A_t = R(a_1..a_T) at every token (advantage
"outcome"; no baseline here). Then f_t depends on the tokens after t, and E_mu[rho_t f_t] =
E_pi[grad log pi(a_t|s_t) Q^mu(s_t, a_t)], the gradient with the *behaviour* policy's Q: the
cumulative weight is no longer unbiased, the full sequence ratio still is.

Exact values: enumerating the V^T sequences (:func:`exact_moments`, any problem, small V^T) and
forward-backward recursions over the V states of a :class:`MarkovProblem` (:func:`markov_exact_moments`,
any T). Monte Carlo: :func:`sampled_estimators` gives the estimates a practitioner would have, with
delta-method standard errors, and :func:`independence_ratio` the closed form Var_t(full)/Var_t(cumulative)
~ prod_{u>t} E_mu[r_u^2] (= m^(T-t)) for independent per-token ratios. Estimating Var(full) from
samples needs the fourth moment of R, which grows like (E_mu r^4)^T: at long horizons the sampled
variance of the full-sequence estimator, and its standard error, understate the exact value (compare
the two in ``ctpo theory --monte-carlo``).
"""

from __future__ import annotations

import csv
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from ctpo_cli.errors import ConfigError

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
Blocks = tuple[FloatArray, ...]
"""A vector in parameter space, one (S_t, V) block per step t."""
Advantage = Literal["q", "a", "outcome"]
ADVANTAGES: tuple[Advantage, ...] = ("q", "a", "outcome")

MAX_SEQUENCES = 2**18
"""Largest V^T that exact enumeration accepts (memory grows as V^T * T * V)."""
MAX_SAMPLED_TOKENS = 20_000_000
"""Largest samples * T that the Monte Carlo mode accepts (memory grows as samples * T * V)."""
UNBIASED_TOLERANCE = 1e-9
"""A relative bias below this, on every seed, is reported as measured-unbiased."""


# --------------------------------------------------------------------------------------------------
# Weightings


@dataclass(frozen=True)
class Weighting:
    """One IS weight of Table 1: w_t = exp(b K_{t-1} + c d_t + e (K_T - K_t)), (b, c, e) = exponents.

    ``per_token`` divides the exponents by T (the geometric mean). ``method`` is the loss in
    :mod:`ctpo_cli.algo.losses` that uses this weight; ``paper_*`` is what the paper's Table 1 says.
    """

    name: str
    label: str
    method: str
    formula: str
    exponents: tuple[float, float, float]
    per_token: bool
    paper_unbiased: bool
    paper_variance: str

    def powers(self, horizon: int) -> tuple[float, float, float]:
        """(b, c, e) for a horizon of T steps."""
        scale = 1.0 / horizon if self.per_token else 1.0
        b, c, e = self.exponents
        return b * scale, c * scale, e * scale


WEIGHTINGS: tuple[Weighting, ...] = (
    Weighting(
        name="token",
        label="token (GRPO)",
        method="grpo",
        formula="r_t",
        exponents=(0.0, 1.0, 0.0),
        per_token=False,
        paper_unbiased=False,
        paper_variance="low",
    ),
    Weighting(
        name="full",
        label="full sequence",
        method="seq-is",
        formula="R",
        exponents=(1.0, 1.0, 1.0),
        per_token=False,
        paper_unbiased=True,
        paper_variance="high",
    ),
    Weighting(
        name="geometric",
        label="geometric (GSPO)",
        method="gspo",
        formula="g = R^(1/T)",
        exponents=(1.0, 1.0, 1.0),
        per_token=True,
        paper_unbiased=False,
        paper_variance="reduced scale",
    ),
    Weighting(
        name="cumulative",
        label="cumulative (CTPO)",
        method="ctpo",
        formula="rho_t",
        exponents=(1.0, 1.0, 0.0),
        per_token=False,
        paper_unbiased=True,
        paper_variance="< full sequence",
    ),
)
"""In the paper's row order."""
WEIGHTING_NAMES = tuple(w.name for w in WEIGHTINGS)


def log_weights(log_ratio: FloatArray, weighting: Weighting) -> FloatArray:
    """log w_t = b K_{t-1} + c d_t + e (K_T - K_t) for every row of d, shape (n, T)."""
    b, c, e = weighting.powers(log_ratio.shape[1])
    cumulative = np.cumsum(log_ratio, axis=1)
    before = cumulative - log_ratio
    after = cumulative[:, -1:] - cumulative
    return b * before + c * log_ratio + e * after


# --------------------------------------------------------------------------------------------------
# Problems


def log_softmax(logits: FloatArray) -> FloatArray:
    """log softmax over the last axis."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@dataclass(frozen=True)
class Problem(ABC):
    """Target and behaviour policies over ``vocab`` tokens: one (S_t, V) logit table per step t = 0..T-1.

    Parameter-space vectors are stored flat: step t's block starts at ``offsets[t]``, and the row of
    state s in it at ``offsets[t] + s V``.
    """

    vocab: int
    target_logits: Blocks
    behaviour_logits: Blocks

    @property
    def horizon(self) -> int:
        """T, the number of steps."""
        return len(self.target_logits)

    @cached_property
    def offsets(self) -> IntArray:
        """Start of each step's block in the flat parameter vector, and its total size, shape (T + 1,)."""
        return np.concatenate([[0], np.cumsum([x.size for x in self.target_logits])]).astype(np.int64)

    def split(self, flat: FloatArray) -> Blocks:
        """A flat parameter-space vector as one (S_t, V) block per step."""
        return tuple(b.reshape(-1, self.vocab) for b in np.split(flat, self.offsets[1:-1]))

    @cached_property
    def log_pi_flat(self) -> FloatArray:
        """log pi(a | s) for every (t, s, a), flat."""
        return np.concatenate([log_softmax(x).ravel() for x in self.target_logits])

    @cached_property
    def log_mu_flat(self) -> FloatArray:
        """log mu(a | s) for every (t, s, a), flat."""
        return np.concatenate([log_softmax(x).ravel() for x in self.behaviour_logits])

    @property
    def log_pi(self) -> Blocks:
        """log pi(a | s) per step, (S_t, V)."""
        return self.split(self.log_pi_flat)

    @property
    def log_mu(self) -> Blocks:
        """log mu(a | s) per step, (S_t, V)."""
        return self.split(self.log_mu_flat)

    @abstractmethod
    def states(self, step: int, prefixes: IntArray) -> IntArray:
        """The state index s_t (a row of step ``step``'s tables) of each prefix a_<t, shape (n, step)."""

    @abstractmethod
    def outcome(self, sequences: IntArray) -> FloatArray:
        """The reward R(a_1..a_T) of each sequence, shape (n, T) -> (n,)."""


@dataclass(frozen=True)
class TabularProblem(Problem):
    """State = the whole prefix (V^t states at step t); reward: one value per sequence, shape (V^T,)."""

    reward: FloatArray

    def states(self, step: int, prefixes: IntArray) -> IntArray:
        """The prefix read as a base-V number."""
        return prefixes @ (self.vocab ** np.arange(step - 1, -1, -1, dtype=np.int64))

    def outcome(self, sequences: IntArray) -> FloatArray:
        """reward[sequence read as a base-V number]."""
        return self.reward[self.states(self.horizon, sequences)]


@dataclass(frozen=True)
class MarkovProblem(Problem):
    """State = the previous token (one start state at t = 1); the reward is a function of the last two
    tokens, ``reward[s_T, a_T]`` of shape (S_T, V), so Q^pi(s_t, a_t) depends on (t, s_t, a_t) only."""

    reward: FloatArray

    def states(self, step: int, prefixes: IntArray) -> IntArray:
        """0 at the first step, the previous token after."""
        if step == 0:
            return np.zeros(len(prefixes), dtype=np.int64)
        return prefixes[:, step - 1]

    def outcome(self, sequences: IntArray) -> FloatArray:
        """reward[s_T, a_T]."""
        last = self.horizon - 1
        return self.reward[self.states(last, sequences[:, :last]), sequences[:, last]]


def _random_logits(
    state_counts: Sequence[int], vocab: int, drift: float, rng: np.random.Generator
) -> tuple[Blocks, Blocks]:
    """Target logits ~ N(0, 1) per (state, token); behaviour = target + drift * N(0, 1)."""
    target = tuple(rng.standard_normal((n, vocab)) for n in state_counts)
    behaviour = tuple(x + drift * rng.standard_normal(x.shape) for x in target)
    return target, behaviour


def random_tabular_problem(
    vocab: int, horizon: int, drift: float, rng: np.random.Generator
) -> TabularProblem:
    """A random :class:`TabularProblem` with reward ~ U(0, 1) per sequence."""
    target, behaviour = _random_logits([vocab**t for t in range(horizon)], vocab, drift, rng)
    return TabularProblem(vocab, target, behaviour, rng.uniform(size=vocab**horizon))


def random_markov_problem(
    vocab: int, horizon: int, drift: float, rng: np.random.Generator, homogeneous: bool = False
) -> MarkovProblem:
    """A random :class:`MarkovProblem` with reward ~ U(0, 1) per (last state, last token).

    ``homogeneous``: one (V, V) logit table, and one behaviour table, for every step after the first
    (a time-homogeneous policy, whose parameters can be shared across positions).
    """
    if homogeneous and horizon > 1:
        (first, table), (first_mu, table_mu) = _random_logits([1, vocab], vocab, drift, rng)
        target, behaviour = (first, *[table] * (horizon - 1)), (first_mu, *[table_mu] * (horizon - 1))
    else:
        target, behaviour = _random_logits([1] + [vocab] * (horizon - 1), vocab, drift, rng)
    return MarkovProblem(vocab, target, behaviour, rng.uniform(size=(len(target[-1]), vocab)))


# --------------------------------------------------------------------------------------------------
# Estimator terms on a set of sequences (enumerated or sampled)


@dataclass(frozen=True)
class Rollouts:
    """Per-token quantities of n sequences; arrays are (n, T) unless stated."""

    tokens: IntArray
    rows: IntArray  # flat index of (t, s_t, token 0): the row of s_t in step t's block
    target_log_prob: FloatArray  # log pi(a_t | s_t)
    behaviour_log_prob: FloatArray  # log mu(a_t | s_t)
    target_probs: FloatArray  # pi(. | s_t), (n, T, V)

    @cached_property
    def log_ratio(self) -> FloatArray:
        """d_t."""
        return self.target_log_prob - self.behaviour_log_prob

    @cached_property
    def score_norm_sq(self) -> FloatArray:
        """||onehot(a_t) - pi(.|s_t)||^2 = 1 - 2 pi(a_t|s_t) + ||pi(.|s_t)||^2."""
        probs = self.target_probs
        return 1.0 - 2.0 * np.exp(self.target_log_prob) + np.einsum("ntv,ntv->nt", probs, probs)

    @cached_property
    def token_index(self) -> IntArray:
        """Flat index of (t, s_t, a_t)."""
        return self.rows + self.tokens

    @cached_property
    def row_index(self) -> IntArray:
        """Flat indices of (t, s_t, a) for every a, (n, T, V)."""
        return self.rows[..., None] + np.arange(self.target_probs.shape[-1])


def rollouts(problem: Problem, tokens: IntArray) -> Rollouts:
    """States and per-token probabilities of the sequences ``tokens`` (n, T)."""
    states = np.stack([problem.states(t, tokens[:, :t]) for t in range(problem.horizon)], axis=1)
    rows = problem.offsets[:-1] + states * problem.vocab
    index = rows + tokens
    spread = rows[..., None] + np.arange(problem.vocab)
    return Rollouts(
        tokens=tokens,
        rows=rows,
        target_log_prob=problem.log_pi_flat[index],
        behaviour_log_prob=problem.log_mu_flat[index],
        target_probs=np.exp(problem.log_pi_flat[spread]),
    )


def score_sums(problem: Problem, data: Rollouts, coef: FloatArray) -> Blocks:
    """sum_n coef[n, t] (onehot(a_t) - pi(.|s_t)), accumulated in the row of (t, s_t), for every t."""
    size = int(problem.offsets[-1])
    spread = (coef[..., None] * data.target_probs).ravel()
    onehot_part = np.bincount(data.token_index.ravel(), weights=coef.ravel(), minlength=size)
    spread_part = np.bincount(data.row_index.ravel(), weights=spread, minlength=size)
    return problem.split((onehot_part - spread_part).astype(np.float64))


def block_norm_sq(blocks: Blocks) -> FloatArray:
    """||block_t||^2 for every step t, shape (T,)."""
    return np.array([float((b**2).sum()) for b in blocks])


def relative_error(estimate: Blocks, reference: Blocks) -> float:
    """||estimate - reference|| / ||reference||."""
    difference = tuple(e - r for e, r in zip(estimate, reference, strict=True))
    return math.sqrt(block_norm_sq(difference).sum() / block_norm_sq(reference).sum())


# --------------------------------------------------------------------------------------------------
# Exact moments by enumeration


@dataclass(frozen=True)
class Moments:
    """E_mu[X] (blocks) and Var_t = E||w_t f_t||^2 - ||E w_t f_t||^2 for t = 1..T of one estimator.

    ``cross_covariance`` = sum_{s != t} tr Cov(w_s f_s, w_t f_t): zero when every position has its
    own parameters (disjoint blocks), not when positions share them (:func:`shared_parameter_moments`).
    """

    mean: Blocks
    position_variance: FloatArray
    cross_covariance: float = field(default=0.0, kw_only=True)

    @property
    def variance(self) -> float:
        """Total variance tr Cov(X) = sum_t Var_t + cross_covariance."""
        return float(self.position_variance.sum()) + self.cross_covariance


@dataclass(frozen=True)
class ExactResult:
    """The exact policy gradient and the exact moments of every weighting's estimator."""

    gradient: Blocks
    estimators: dict[str, Moments]

    def relative_bias(self, name: str) -> float:
        """||E_mu X - grad J|| / ||grad J||."""
        return relative_error(self.estimators[name].mean, self.gradient)


def all_sequences(vocab: int, horizon: int) -> IntArray:
    """Every sequence in V^T, lexicographic (first token slowest), shape (V^T, T)."""
    return np.indices((vocab,) * horizon, dtype=np.int64).reshape(horizon, -1).T


def enumerated_q(target_log_prob: FloatArray, reward: FloatArray, vocab: int) -> FloatArray:
    """Q^pi(s_t, a_t) = sum over continuations a_>t of pi(a_>t | a_<=t) R, for every sequence and t.

    Relies on the order of :func:`all_sequences`: the sequences sharing a_1..a_t are contiguous runs
    of V^(T-t).
    """
    horizon = target_log_prob.shape[1]
    log_after = np.cumsum(target_log_prob[:, ::-1], axis=1)[:, ::-1] - target_log_prob  # sum_{u>t} log pi
    q = np.empty_like(target_log_prob)
    for t in range(horizon):
        run = vocab ** (horizon - 1 - t)
        totals = (np.exp(log_after[:, t]) * reward).reshape(-1, run).sum(axis=1)
        q[:, t] = np.repeat(totals, run)
    return q


def enumerated_advantage(
    q: FloatArray, reward: FloatArray, objective: float, advantage: Advantage
) -> FloatArray:
    """A_t per sequence and step: Q^pi, A^pi = Q^pi - V^pi(s_t), or the outcome R.

    V^pi(s_1) = J and V^pi(s_t) = Q^pi(s_{t-1}, a_{t-1}) for t > 1 (the state is the prefix).
    """
    if advantage == "q":
        return q
    if advantage == "a":
        return q - np.concatenate([np.full((len(q), 1), objective), q[:, :-1]], axis=1)
    return np.broadcast_to(reward[:, None], q.shape)


def weighted_moments(problem: Problem, data: Rollouts, terms: FloatArray, probability: FloatArray) -> Moments:
    """Moments of X = sum_t terms[:, t] (onehot(a_t) - pi(.|s_t)) when sequence n has ``probability[n]``."""
    mean = score_sums(problem, data, probability[:, None] * terms)
    second = (probability[:, None] * terms**2 * data.score_norm_sq).sum(axis=0)
    return Moments(mean, second - block_norm_sq(mean))


@dataclass(frozen=True)
class Enumeration:
    """All V^T sequences of a problem with their probabilities, Q^pi and the chosen advantage, (V^T, T)."""

    data: Rollouts
    q: FloatArray
    signal: FloatArray
    pi_probability: FloatArray  # pi(y), (V^T,)
    mu_probability: FloatArray  # mu(y), (V^T,)


def enumerate_problem(problem: Problem, advantage: Advantage) -> Enumeration:
    """Every sequence, pi(y), mu(y), Q^pi(s_t, a_t) and A_t."""
    data = rollouts(problem, all_sequences(problem.vocab, problem.horizon))
    reward = problem.outcome(data.tokens)
    q = enumerated_q(data.target_log_prob, reward, problem.vocab)
    pi_probability = np.exp(data.target_log_prob.sum(axis=1))
    signal = enumerated_advantage(q, reward, float(pi_probability @ reward), advantage)
    return Enumeration(data, q, signal, pi_probability, np.exp(data.behaviour_log_prob.sum(axis=1)))


def exact_moments(problem: Problem, advantage: Advantage = "q") -> ExactResult:
    """Exact gradient and estimator moments by enumerating all V^T sequences (see the module docstring).

    grad J = sum_y pi(y) sum_t (onehot(a_t) - pi(.|s_t)) Q^pi(s_t, a_t); E_mu X and Var_t are the
    same sums with mu(y) w_t and mu(y) w_t^2 ||.||^2.
    """
    e = enumerate_problem(problem, advantage)
    gradient = score_sums(problem, e.data, e.pi_probability[:, None] * e.q)
    estimators = {
        w.name: weighted_moments(
            problem, e.data, np.exp(log_weights(e.data.log_ratio, w)) * e.signal, e.mu_probability
        )
        for w in WEIGHTINGS
    }
    return ExactResult(gradient, estimators)


def ratio_variances(problem: Problem) -> dict[str, FloatArray]:
    """Var_mu(w_t) of every weighting's IS weight at every position t = 1..T, by enumeration.

    This is the quantity of the paper's Table 1 ("variance" of the ratio itself, per token). Since
    E_mu[rho_t] = 1 and rho_t is a mu-martingale, Var(rho_t) = E_mu[rho_t^2] - 1 grows with t and
    reaches Var(R) at t = T: Var(rho_t) <= Var(R) at every position, whatever the parameterisation.
    """
    data = rollouts(problem, all_sequences(problem.vocab, problem.horizon))
    mu = np.exp(data.behaviour_log_prob.sum(axis=1))
    variances = {}
    for w in WEIGHTINGS:
        weight = np.exp(log_weights(data.log_ratio, w))
        variances[w.name] = mu @ weight**2 - (mu @ weight) ** 2
    return variances


def fold_shared(blocks: Blocks) -> Blocks:
    """A per-step vector in the shared parameterisation: the first step's block, and the sum of the others.

    When steps 2..T use one table theta, d/d theta = sum_t d/d theta_t (chain rule).
    """
    if len(blocks) == 1:
        return blocks
    return blocks[0], np.sum(np.stack(blocks[1:]), axis=0)


def shared_parameter_moments(problem: MarkovProblem, advantage: Advantage = "q") -> ExactResult:
    """Exact moments when steps 2..T share one parameter table (an LLM shares its weights across positions).

    X = sum_t w_t f_t is folded with :func:`fold_shared`, so the terms of different positions can
    land in the same block and the total variance gains the cross terms
    sum_{s != t} tr Cov(w_s f_s, w_t f_t) = E||X||^2 - ||E X||^2 - sum_t Var_t, computed here from every
    sequence's folded X. Means and Var_t are those of :func:`exact_moments`, folded.
    """
    if any(not np.array_equal(x, problem.target_logits[-1]) for x in problem.target_logits[1:]) or any(
        not np.array_equal(x, problem.behaviour_logits[-1]) for x in problem.behaviour_logits[1:]
    ):
        raise ValueError("shared parameters need the same logit tables at every step after the first")
    separate = exact_moments(problem, advantage)
    e = enumerate_problem(problem, advantage)
    vocab, count = problem.vocab, len(e.mu_probability)
    size = vocab + vocab * vocab if problem.horizon > 1 else vocab
    step_start = np.where(np.arange(problem.horizon) == 0, 0, vocab)
    rows = e.data.rows - problem.offsets[:-1] + step_start + size * np.arange(count)[:, None]
    scores = np.eye(vocab)[e.data.tokens] - e.data.target_probs
    estimators = {}
    for w in WEIGHTINGS:
        coef = np.exp(log_weights(e.data.log_ratio, w)) * e.signal
        folded = np.bincount(
            (rows[..., None] + np.arange(vocab)).ravel(),
            weights=(coef[..., None] * scores).ravel(),
            minlength=count * size,
        ).reshape(count, size)
        total = float(e.mu_probability @ (folded**2).sum(axis=1) - np.sum((e.mu_probability @ folded) ** 2))
        moments = separate.estimators[w.name]
        estimators[w.name] = Moments(
            fold_shared(moments.mean),
            moments.position_variance,
            cross_covariance=total - float(moments.position_variance.sum()),
        )
    return ExactResult(fold_shared(separate.gradient), estimators)


# --------------------------------------------------------------------------------------------------
# Exact moments of a Markov problem at any T (forward-backward over the V states)


def markov_q(problem: MarkovProblem) -> Blocks:
    """Q^pi_t(s, a), (S_t, V): Q_T = reward, Q_{t-1}(s, a) = V_t(a) = sum_b pi_t(b|a) Q_t(a, b) for every s."""
    log_pi = problem.log_pi
    q = [problem.reward]
    for t in range(problem.horizon - 1, 0, -1):
        value = (np.exp(log_pi[t]) * q[0]).sum(axis=1)
        q.insert(0, np.broadcast_to(value, log_pi[t - 1].shape))
    return tuple(q)


def markov_advantage(problem: MarkovProblem, advantage: Advantage) -> Blocks:
    """A_t(s, a), (S_t, V): Q^pi, or A^pi = Q^pi - sum_b pi(b|s) Q^pi(s, b). The outcome is not Markov."""
    q = markov_q(problem)
    if advantage == "q":
        return q
    if advantage == "a":
        return tuple(
            q_t - (np.exp(lp) * q_t).sum(axis=1, keepdims=True)
            for q_t, lp in zip(q, problem.log_pi, strict=True)
        )
    raise ConfigError("advantage 'outcome' needs exact enumeration; --monte-carlo supports q and a")


def ratio_kernels(problem: Problem, power: float) -> Blocks:
    """mu_t(a|s) r_t(s, a)^power per step, (S_t, V): one step of E_mu[prod_u r_u^power ...]."""
    return tuple(
        np.exp(lm + power * (lp - lm)) for lp, lm in zip(problem.log_pi, problem.log_mu, strict=True)
    )


def forward_masses(kernels: Blocks) -> Blocks:
    """F_t(s) = E_mu[prod_{u<t} r_u^p 1{s_t = s}]: F_1 = 1, F_{t+1}(a) = sum_s F_t(s) mu r^p (s, a)."""
    masses = [np.ones(1)]
    for kernel in kernels[:-1]:
        masses.append(masses[-1] @ kernel)
    return tuple(masses)


def backward_factors(kernels: Blocks) -> Blocks:
    """G_t(a) = E_mu[prod_{u>t} r_u^p | a_t = a]: G_T = 1, G_{t-1}(a) = sum_b mu r^p (a, b) G_t(b)."""
    factors = [np.ones(kernels[-1].shape[1])]
    for kernel in kernels[:0:-1]:
        factors.insert(0, kernel @ factors[0])
    return tuple(factors)


def markov_weight_mass(problem: MarkovProblem, weighting: Weighting, order: int) -> Blocks:
    """E_mu[w_t^order 1{s_t = s, a_t = a}] = F_t(s) mu_t(a|s) r_t(s, a)^(order c) G_t(a), (S_t, V) per step.

    F has the power order * b and G the power order * e (:func:`forward_masses`, :func:`backward_factors`).
    """
    b, c, e = (order * p for p in weighting.powers(problem.horizon))
    before = forward_masses(ratio_kernels(problem, b))
    after = backward_factors(ratio_kernels(problem, e))
    return tuple(f[:, None] * k * g for f, k, g in zip(before, ratio_kernels(problem, c), after, strict=True))


def expected_scores(mass: Blocks, signal: Blocks, probs: Blocks) -> Blocks:
    """Row s of step t: sum_a mass_t(s, a) A_t(s, a) (onehot(a) - pi_t(.|s))."""
    weighted = [m * x for m, x in zip(mass, signal, strict=True)]
    return tuple(w - w.sum(axis=1, keepdims=True) * p for w, p in zip(weighted, probs, strict=True))


def markov_exact_moments(problem: MarkovProblem, advantage: Advantage = "q") -> ExactResult:
    """Exact gradient and moments of a :class:`MarkovProblem` at any T, in O(T V^2) per weighting.

    With f(s, a) = (onehot(a) - pi_t(.|s)) A_t(s, a) and the masses of :func:`markov_weight_mass`:
    E_mu[w_t f_t] (row s) = sum_a E[w_t 1{s, a}] f(s, a),  E||w_t f_t||^2 = sum_{s,a} E[w_t^2 1{s, a}] ||f(s, a)||^2,
    and grad J is the first sum with P_pi(s_t = s, a_t = a) and Q^pi.
    """
    probs = tuple(np.exp(x) for x in problem.log_pi)
    signal = markov_advantage(problem, advantage)
    norm_sq = tuple(
        x**2 * (1.0 - 2.0 * p + (p**2).sum(axis=1, keepdims=True)) for x, p in zip(signal, probs, strict=True)
    )
    on_policy = tuple(f[:, None] * p for f, p in zip(forward_masses(probs), probs, strict=True))
    gradient = expected_scores(on_policy, markov_q(problem), probs)
    estimators = {}
    for w in WEIGHTINGS:
        mean = expected_scores(markov_weight_mass(problem, w, 1), signal, probs)
        second_mass = markov_weight_mass(problem, w, 2)
        second = np.array([float((m * n).sum()) for m, n in zip(second_mass, norm_sq, strict=True)])
        estimators[w.name] = Moments(mean, second - block_norm_sq(mean))
    return ExactResult(gradient, estimators)


def independence_ratio(problem: MarkovProblem) -> FloatArray:
    """The closed form P_t = prod_{u>t} m_u with m_u = E_mu[r_u^2], for t = 1..T (P_T = 1).

    If the ratios r_u, u > t, were independent of each other and of a_<=t (E_mu r_u = 1), then
    E_mu[R^2 ||f_t||^2] = P_t E_mu[rho_t^2 ||f_t||^2]: P_t is the second-moment ratio full/cumulative
    (m^(T-t) for a constant m), and as both means equal E_pi f_t, the variance ratio would be
    (P_t M - G) / (M - G) >= P_t (M = E rho_t^2 ||f_t||^2, G = ||E_pi f_t||^2). m_u uses the exact
    mu-marginal of s_u. A Markov problem's ratios are *not* independent: comparing P_t with the exact
    ratio measures what the independence assumption costs.
    """
    marginals = forward_masses(ratio_kernels(problem, 0.0))
    second = ratio_kernels(problem, 2.0)
    m = np.array([float(f @ k.sum(axis=1)) for f, k in zip(marginals, second, strict=True)])
    from_t = np.cumprod(m[::-1])[::-1]  # prod_{u>=t} m_u
    return np.append(from_t[1:], 1.0)


# --------------------------------------------------------------------------------------------------
# Monte Carlo


def sample_sequences(problem: Problem, samples: int, rng: np.random.Generator) -> IntArray:
    """``samples`` sequences a_1..a_T ~ mu, shape (samples, T)."""
    log_mu = problem.log_mu
    tokens = np.zeros((samples, problem.horizon), dtype=np.int64)
    for t in range(problem.horizon):
        cdf = np.exp(log_mu[t]).cumsum(axis=1)[problem.states(t, tokens[:, :t])]
        tokens[:, t] = np.minimum((cdf < rng.random((samples, 1))).sum(axis=1), problem.vocab - 1)
    return tokens


@dataclass(frozen=True)
class SampledMoments(Moments):
    """Sample moments of n draws, and each draw's influence on every Var_t, shape (n, T).

    Var_t = n/(n-1) (mean_n ||X_nt||^2 - ||mean_n X_nt||^2) is unbiased; its influence function
    ||X_nt - m_t||^2 - Var_t gives delta-method standard errors.
    """

    influence: FloatArray

    @property
    def position_variance_se(self) -> FloatArray:
        """Standard error of each Var_t."""
        return standard_error(self.influence)

    @property
    def variance_se(self) -> float:
        """Standard error of the total variance."""
        return float(standard_error(self.influence.sum(axis=1)))


def standard_error(influence: FloatArray) -> FloatArray:
    """std(influence) / sqrt(n) along the first axis (draws)."""
    return np.asarray(influence.std(axis=0, ddof=1) / math.sqrt(len(influence)))


def ratio_with_error(
    numerator: FloatArray,
    numerator_influence: FloatArray,
    denominator: FloatArray,
    denominator_influence: FloatArray,
) -> tuple[FloatArray, FloatArray]:
    """num / den and its delta-method standard error, the two estimated from the same draws."""
    ratio = numerator / denominator
    return ratio, standard_error((numerator_influence - ratio * denominator_influence) / denominator)


def sampled_moments(problem: Problem, data: Rollouts, terms: FloatArray) -> SampledMoments:
    """Moments of X = sum_t terms[:, t] (onehot(a_t) - pi(.|s_t)) estimated from the n rows of ``data``."""
    n = len(terms)
    mean = score_sums(problem, data, terms / n)
    flat_mean = np.concatenate([m.ravel() for m in mean])
    along_mean = flat_mean[data.token_index] - np.einsum(
        "ntv,ntv->nt", flat_mean[data.row_index], data.target_probs
    )
    distance_sq = (
        terms**2 * data.score_norm_sq - 2.0 * terms * along_mean + block_norm_sq(mean)
    )  # ||X_nt - m_t||^2
    variance = distance_sq.mean(axis=0) * n / (n - 1)
    return SampledMoments(mean, variance, distance_sq - variance)


def sampled_estimators(
    problem: MarkovProblem, samples: int, rng: np.random.Generator, advantage: Advantage = "q"
) -> dict[str, SampledMoments]:
    """Monte Carlo moments of every weighting's estimator from ``samples`` sequences drawn from mu."""
    data = rollouts(problem, sample_sequences(problem, samples, rng))
    signal = np.concatenate([x.ravel() for x in markov_advantage(problem, advantage)])[data.token_index]
    return {
        w.name: sampled_moments(problem, data, np.exp(log_weights(data.log_ratio, w)) * signal)
        for w in WEIGHTINGS
    }


# --------------------------------------------------------------------------------------------------
# Studies over seeds: what `ctpo theory` reports


ADVANTAGE_LABELS: dict[str, str] = {
    "q": "Q^pi(s_t, a_t)",
    "a": "A^pi(s_t, a_t) = Q^pi - V^pi(s_t)",
    "outcome": "outcome R(y) at every token (the paper's claims assume a token-level advantage)",
}


@dataclass(frozen=True)
class TextTable:
    """A table as plain strings, for the CLI to render."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str


def check_problem_size(vocab: int, horizon: int, drift: float, seeds: int) -> None:
    """ValueError (one line) unless V >= 2, T >= 1, drift finite and >= 0, seeds >= 1."""
    if vocab < 2:
        raise ConfigError(f"--vocab must be at least 2, got {vocab}")
    if horizon < 1:
        raise ConfigError(f"--horizon must be at least 1, got {horizon}")
    if not (math.isfinite(drift) and drift >= 0):
        raise ConfigError(f"--drift must be a finite number >= 0, got {drift}")
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")


def check_advantage(advantage: str) -> Advantage:
    """The advantage name, or ValueError naming the valid ones."""
    for name in ADVANTAGES:
        if advantage == name:
            return name
    raise ConfigError(f"unknown advantage {advantage!r}; valid: {', '.join(ADVANTAGES)}")


def _spread(values: FloatArray, spec: str) -> str:
    """'mean [min, max]' over seeds (just the value for one seed)."""
    if len(values) == 1:
        return format(float(values[0]), spec)
    return f"{values.mean():{spec}} [{values.min():{spec}}, {values.max():{spec}}]"


@dataclass(frozen=True)
class ExactStudy:
    """Exact relative bias, whole-gradient variance and per-position ratio variance of every weighting,
    per seed.

    Two variances, not to be confused. ``ratio_variance``: Var_mu(w_t) of the IS weight at each
    position (:func:`ratio_variances`), the quantity of the paper's Table 1; the cumulative ratio is
    below the full one at every position by construction. ``variance``: tr Cov_mu(X) of the whole
    one-sequence gradient estimator X = sum_t w_t f_t, which with shared parameters (or an outcome
    advantage) can put the cumulative estimator above the full one.

    The problems are random tabular ones, or with ``shared_parameters`` random time-homogeneous
    Markov ones whose steps 2..T share one parameter table (:func:`shared_parameter_moments`).
    """

    vocab: int
    horizon: int
    drift: float
    seeds: tuple[int, ...]
    advantage: Advantage
    shared_parameters: bool
    relative_bias: dict[str, FloatArray]
    variance: dict[str, FloatArray]
    ratio_variance: dict[str, FloatArray]
    """Var_mu(w_t), shape (seeds, T), per weighting."""

    @property
    def problem(self) -> str:
        """What the random problems are."""
        if self.shared_parameters:
            return "Markov policy, parameters shared across positions"
        return "tabular policy, parameters per position"

    def variance_ratio(self, name: str) -> FloatArray:
        """Var(X_name) / Var(X_cumulative) per seed."""
        return self.variance[name] / self.variance["cumulative"]

    def unbiased(self, name: str) -> bool:
        """Relative bias below :data:`UNBIASED_TOLERANCE` on every seed."""
        return bool((self.relative_bias[name] < UNBIASED_TOLERANCE).all())

    def cumulative_below_full(self) -> int:
        """On how many seeds the whole-gradient variance of cumulative is below full's."""
        return int((self.variance["cumulative"] < self.variance["full"]).sum())

    def ratio_below_full(self) -> int:
        """On how many seeds Var(rho_t) <= Var(R) at every position t (the paper's per-token claim)."""
        below = self.ratio_variance["cumulative"] <= self.ratio_variance["full"] * (1 + 1e-12)
        return int(below.all(axis=1).sum())

    def to_json(self) -> dict[str, Any]:
        """Everything, per seed, as plain JSON types."""
        return {
            "mode": "exact",
            "problem": self.problem,
            "vocab": self.vocab,
            "horizon": self.horizon,
            "drift": self.drift,
            "seeds": list(self.seeds),
            "advantage": self.advantage,
            "unbiased_tolerance": UNBIASED_TOLERANCE,
            "cumulative_variance_below_full_on_seeds": self.cumulative_below_full(),
            "cumulative_ratio_variance_below_full_at_every_position_on_seeds": self.ratio_below_full(),
            "estimators": [
                {
                    "estimator": w.name,
                    "method": w.method,
                    "weight": w.formula,
                    "paper": {"unbiased": w.paper_unbiased, "variance": w.paper_variance},
                    "unbiased_measured": self.unbiased(w.name),
                    "relative_bias": self.relative_bias[w.name].tolist(),
                    "variance": self.variance[w.name].tolist(),
                    "variance_over_cumulative": self.variance_ratio(w.name).tolist(),
                    "ratio_variance_by_position": self.ratio_variance[w.name].tolist(),
                }
                for w in WEIGHTINGS
            ],
        }

    def table(self) -> TextTable:
        """The paper's Table 1 with measured columns (mean [min, max] over seeds)."""
        rows = tuple(
            (
                w.label,
                w.formula,
                "yes" if w.paper_unbiased else "no",
                "yes" if self.unbiased(w.name) else "no",
                _spread(self.relative_bias[w.name], ".2g"),
                w.paper_variance,
                _spread(self.ratio_variance[w.name].mean(axis=1), ".3g"),
                _spread(self.variance[w.name], ".3g"),
                _spread(self.variance_ratio(w.name), ".3g"),
            )
            for w in WEIGHTINGS
        )
        return TextTable(
            title=(
                f"Table 1, exact: {self.problem}, V={self.vocab}, T={self.horizon} ({self.vocab**self.horizon:,} "
                f"sequences), drift {self.drift:g}, {len(self.seeds)} seed(s); mean [min, max] over seeds"
            ),
            columns=(
                "estimator",
                "weight at t",
                "unbiased: paper",
                "measured",
                "relative bias",
                "ratio variance: paper",
                "ratio variance Var(w_t), mean over t",
                "gradient variance tr Cov(X)",
                "gradient variance / cumulative's",
            ),
            rows=rows,
            caption=(
                f"advantage {ADVANTAGE_LABELS[self.advantage]}. relative bias ||E_mu X - grad J|| / ||grad J||; "
                f"measured unbiased: relative bias < {UNBIASED_TOLERANCE:g} on every seed. Ratio variance "
                f"(the paper's Table 1 claim): Var(rho_t) <= Var(R) at every position on "
                f"{self.ratio_below_full()}/{len(self.seeds)} seeds. Gradient variance tr Cov_mu(X) of the "
                f"whole one-sequence estimator X = sum_t w_t f_t (not the paper's claim): cumulative < full "
                f"on {self.cumulative_below_full()}/{len(self.seeds)} seeds."
            ),
        )


def exact_problem(vocab: int, horizon: int, drift: float, seed: int, shared_parameters: bool) -> Problem:
    """The random problem of ``seed``: tabular, or homogeneous Markov (for shared parameters)."""
    rng = np.random.default_rng(seed)
    if shared_parameters:
        return random_markov_problem(vocab, horizon, drift, rng, homogeneous=True)
    return random_tabular_problem(vocab, horizon, drift, rng)


def exact_result(
    vocab: int, horizon: int, drift: float, seed: int, advantage: Advantage, shared_parameters: bool
) -> ExactResult:
    """Exact moments on the random problem of ``seed`` (tabular, or homogeneous Markov with shared parameters)."""
    problem = exact_problem(vocab, horizon, drift, seed, shared_parameters)
    if shared_parameters:
        assert isinstance(problem, MarkovProblem)
        return shared_parameter_moments(problem, advantage)
    return exact_moments(problem, advantage)


def run_exact_study(
    vocab: int, horizon: int, drift: float, seeds: int, advantage: str = "q", shared_parameters: bool = False
) -> ExactStudy:
    """Exact moments on ``seeds`` random problems (seed i draws problem i); see :class:`ExactStudy`."""
    check_problem_size(vocab, horizon, drift, seeds)
    chosen = check_advantage(advantage)
    if vocab**horizon > MAX_SEQUENCES:
        raise ConfigError(
            f"V^T = {vocab}^{horizon} = {vocab**horizon:,} sequences is above the enumeration limit of "
            f"{MAX_SEQUENCES:,}; use --monte-carlo for longer horizons"
        )
    results = [exact_result(vocab, horizon, drift, seed, chosen, shared_parameters) for seed in range(seeds)]
    ratios = [
        ratio_variances(exact_problem(vocab, horizon, drift, seed, shared_parameters))
        for seed in range(seeds)
    ]
    names = WEIGHTING_NAMES
    return ExactStudy(
        vocab,
        horizon,
        drift,
        tuple(range(seeds)),
        chosen,
        shared_parameters,
        {n: np.array([r.relative_bias(n) for r in results]) for n in names},
        {n: np.array([r.estimators[n].variance for r in results]) for n in names},
        {n: np.array([r[n] for r in ratios]) for n in names},
    )


def monte_carlo_horizons(horizon: int) -> tuple[int, ...]:
    """T, T/2, T/4, T/8 (rounded down, at least 1), ascending and distinct."""
    return tuple(sorted({max(1, horizon >> k) for k in range(4)}))


def total_columns(
    exact: ExactResult, sampled: dict[str, SampledMoments], name: str, samples: int
) -> dict[str, float]:
    """Relative bias and total variance of estimator ``name``: exact, and sampled with standard errors."""
    est, cumulative = sampled[name], sampled["cumulative"]
    ratio, ratio_se = ratio_with_error(
        np.asarray(est.variance),
        est.influence.sum(axis=1),
        np.asarray(cumulative.variance),
        cumulative.influence.sum(axis=1),
    )
    gradient_norm = math.sqrt(block_norm_sq(exact.gradient).sum())
    return {
        "relative_bias_exact": exact.relative_bias(name),
        "mean_error_sampled": relative_error(est.mean, exact.gradient),
        "mean_noise_sampled": math.sqrt(est.variance / samples) / gradient_norm,
        "variance_exact": exact.estimators[name].variance,
        "variance_sampled": est.variance,
        "variance_se": est.variance_se,
        "ratio_exact": exact.estimators[name].variance / exact.estimators["cumulative"].variance,
        "ratio_sampled": float(ratio),
        "ratio_se": float(ratio_se),
    }


def position_columns(
    exact: ExactResult, sampled: dict[str, SampledMoments], name: str
) -> dict[str, FloatArray]:
    """Var_t of estimator ``name`` and Var_t / Var_t(cumulative) per position: exact, sampled, standard error."""
    est, cumulative = sampled[name], sampled["cumulative"]
    ratio, ratio_se = ratio_with_error(
        est.position_variance, est.influence, cumulative.position_variance, cumulative.influence
    )
    reference = exact.estimators[name].position_variance
    return {
        "variance_exact": reference,
        "variance_sampled": est.position_variance,
        "variance_se": est.position_variance_se,
        "ratio_exact": reference / exact.estimators["cumulative"].position_variance,
        "ratio_sampled": ratio,
        "ratio_se": ratio_se,
    }


def case_records(
    seed: int, problem: MarkovProblem, samples: int, advantage: Advantage
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-position and total records of one (seed, horizon): exact, sampled, and (full only) the closed form."""
    horizon = problem.horizon
    exact = markov_exact_moments(problem, advantage)
    sampled = sampled_estimators(problem, samples, np.random.default_rng([seed, horizon, 1]), advantage)
    closed_form = independence_ratio(problem)
    positions: list[dict[str, Any]] = []
    totals: list[dict[str, Any]] = []
    for w in WEIGHTINGS:
        common = {"seed": seed, "horizon": horizon, "estimator": w.name, "method": w.method}
        totals.append({**common, **total_columns(exact, sampled, w.name, samples)})
        columns = position_columns(exact, sampled, w.name)
        for t in range(horizon):
            row: dict[str, Any] = {
                **common,
                "position": t + 1,
                **{k: float(v[t]) for k, v in columns.items()},
            }
            row["ratio_independence"] = float(closed_form[t]) if w.name == "full" else None
            positions.append(row)
    return positions, totals


def _mean_with_error(values: Sequence[float], errors: Sequence[float]) -> str:
    """'mean ± se' of independent estimates (se of the mean: sqrt(sum se_i^2) / N)."""
    se = math.sqrt(sum(e**2 for e in errors)) / len(errors)
    return f"{np.mean(values):.4g} ± {se:.2g}"


@dataclass(frozen=True)
class MonteCarloStudy:
    """Sampled and exact moments on random Markov problems, for several horizons and seeds.

    ``positions``: one record per (seed, horizon, estimator, position) with the exact and sampled
    Var_t, the ratio Var_t / Var_t(cumulative) (exact, sampled, standard error) and, for the full
    sequence, the closed form under independence. ``totals``: one record per (seed, horizon,
    estimator) with the relative bias and total variance, exact and sampled.
    """

    vocab: int
    horizons: tuple[int, ...]
    drift: float
    seeds: tuple[int, ...]
    samples: int
    advantage: Advantage
    positions: list[dict[str, Any]]
    totals: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        """Configuration and all records as plain JSON types."""
        return {
            "mode": "monte-carlo",
            "problem": "markov",
            "vocab": self.vocab,
            "horizons": list(self.horizons),
            "drift": self.drift,
            "seeds": list(self.seeds),
            "samples": self.samples,
            "advantage": self.advantage,
            "totals": self.totals,
            "positions": self.positions,
        }

    def write_csv(self, path: Path) -> None:
        """The per-position records as CSV (empty cell where the closed form does not apply)."""
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(self.positions[0]))
            writer.writeheader()
            writer.writerows(self.positions)

    def _at(self, horizon: int, estimator: str, position: int | None = None) -> list[dict[str, Any]]:
        records = self.totals if position is None else self.positions
        return [
            r
            for r in records
            if r["horizon"] == horizon
            and r["estimator"] == estimator
            and r.get("position", position) == position
        ]

    def table(self) -> TextTable:
        """Table 1 at the longest horizon: exact next to sampled (mean over seeds, ± standard error)."""
        horizon = self.horizons[-1]
        rows = []
        for w in WEIGHTINGS:
            records = self._at(horizon, w.name)
            column = {key: [r[key] for r in records] for key in records[0]}
            rows.append(
                (
                    w.label,
                    w.formula,
                    f"{np.mean(column['relative_bias_exact']):.2g}",
                    f"{np.mean(column['mean_error_sampled']):.3g} ({np.mean(column['mean_noise_sampled']):.3g})",
                    f"{np.mean(column['variance_exact']):.4g}",
                    _mean_with_error(column["variance_sampled"], column["variance_se"]),
                    f"{np.mean(column['ratio_exact']):.3f}",
                    _mean_with_error(column["ratio_sampled"], column["ratio_se"]),
                )
            )
        first = self._at(horizon, "full", position=1)
        ratio = {
            key: [r[key] for r in first]
            for key in ("ratio_exact", "ratio_independence", "ratio_sampled", "ratio_se")
        }
        return TextTable(
            title=(
                f"Table 1, Monte Carlo: V={self.vocab}, T={horizon}, drift {self.drift:g}, {self.samples:,} draws "
                f"x {len(self.seeds)} seed(s) (Markov policies); mean over seeds"
            ),
            columns=(
                "estimator",
                "weight at t",
                "relative bias (exact)",
                "sampled mean: error (noise)",
                "variance (exact)",
                "variance (sampled)",
                "variance / cumulative's (exact)",
                "(sampled)",
            ),
            rows=tuple(rows),
            caption=(
                f"advantage {ADVANTAGE_LABELS[self.advantage]}. exact: forward-backward over the V states; "
                "sampled: draws of mu, ± delta-method standard error; error (noise): ||sample mean - grad J|| / "
                "||grad J|| and sqrt(Var/n) / ||grad J||, what noise alone gives. Var_t(full) / Var_t(cumulative) "
                f"at t = 1: exact {np.mean(ratio['ratio_exact']):.4g}, closed form under independence "
                f"{np.mean(ratio['ratio_independence']):.4g}, sampled "
                f"{_mean_with_error(ratio['ratio_sampled'], ratio['ratio_se'])}."
            ),
        )


def run_monte_carlo_study(
    vocab: int, horizon: int, drift: float, seeds: int, samples: int, advantage: str = "q"
) -> MonteCarloStudy:
    """Exact and sampled moments on random Markov problems for the horizons :func:`monte_carlo_horizons`.

    Seed i and horizon T draw the problem from ``default_rng([i, T])`` and the samples from
    ``default_rng([i, T, 1])``.
    """
    check_problem_size(vocab, horizon, drift, seeds)
    chosen = check_advantage(advantage)
    if chosen == "outcome":
        raise ConfigError("advantage 'outcome' needs exact enumeration; --monte-carlo supports q and a")
    if samples < 2:
        raise ConfigError(f"--samples must be at least 2, got {samples}")
    if samples * horizon > MAX_SAMPLED_TOKENS:
        raise ConfigError(
            f"--samples x --horizon = {samples * horizon:,} is above the limit of {MAX_SAMPLED_TOKENS:,}"
        )
    horizons = monte_carlo_horizons(horizon)
    positions: list[dict[str, Any]] = []
    totals: list[dict[str, Any]] = []
    for seed in range(seeds):
        for length in horizons:
            problem = random_markov_problem(vocab, length, drift, np.random.default_rng([seed, length]))
            case_positions, case_totals = case_records(seed, problem, samples, chosen)
            positions += case_positions
            totals += case_totals
    return MonteCarloStudy(vocab, horizons, drift, tuple(range(seeds)), samples, chosen, positions, totals)
