"""Default hyperparameters of every method: the one source, used by the losses, the per-position
diagnostics' reference windows and (tied by a test) the experiment files ``experiments/method/*.yaml``.

Values and where they come from (docs/method.md, section 2, equations (7)-(11)):

* PPO-style token/sequence clip, used by ``grpo`` and ``seq-is``: eps_low = eps_high = 0.2, dual clip
  c = 3 for A < 0 (method.md; DAPO's "clip-higher" would set eps_high = 0.28).
* GSPO: eps_low = 3e-4, eps_high = 4e-4 on the geometric-mean sequence ratio, no dual clip (Zheng et
  al. 2025, arXiv 2507.18071).
* CTPO: log-space window [-a_low t^p, a_high t^p] with a_low = 0.025, a_high = 0.05, dual clip
  exp(a_c t^p) with a_c = 0.05, p = 0.5 (Zhang et al. 2026, arXiv 2605.07331).
* CTPO with a fixed window (the paper's ablation, p = 0): the paper does not state the window; its
  Figure 1 compares with ratio [0.5, 5], so a_low = ln 2, a_high = ln 5 and the dual clip at the upper
  bound, a_c = ln 5 (method.md, "CTPO with fixed clip").
"""

from __future__ import annotations

import math
from types import MappingProxyType

PPO = MappingProxyType({"clip_ratio_low": 0.2, "clip_ratio_high": 0.2, "clip_ratio_c": 3.0})
"""grpo and seq-is: ratio window [1 - eps_low, 1 + eps_high] and dual clip c (verl's own key names)."""

GSPO = MappingProxyType({"clip_ratio_low": 3e-4, "clip_ratio_high": 4e-4})
"""gspo: window [1 - eps_low, 1 + eps_high] on g_i = exp(K_|y| / |y|)."""

CTPO = MappingProxyType(
    {"ctpo_clip_low": 0.025, "ctpo_clip_high": 0.05, "ctpo_clip_c": 0.05, "ctpo_power": 0.5}
)
"""ctpo: a_low, a_high, a_c and p of the window on K_t."""

CTPO_FIXED = MappingProxyType(
    {
        "ctpo_clip_low": math.log(2.0),
        "ctpo_clip_high": math.log(5.0),
        "ctpo_clip_c": math.log(5.0),
        "ctpo_power": 0.0,
    }
)
"""ctpo-fixed: ratio window [0.5, 5] at every position (p = 0)."""

FIXED_WINDOW = (-CTPO_FIXED["ctpo_clip_low"], CTPO_FIXED["ctpo_clip_high"])
"""The diagnostics' reference fixed window on K_t, (lo, hi) in log space: ctpo-fixed's."""

SQRT_WINDOW = (CTPO["ctpo_clip_low"], CTPO["ctpo_clip_high"], CTPO["ctpo_power"])
"""The diagnostics' reference position-adaptive window (a_low, a_high, p): ctpo's."""
