"""One look for every figure: colour-blind-safe (Okabe-Ito) colours fixed per method."""

from __future__ import annotations

METHOD_COLORS: dict[str, str] = {
    "grpo": "#E69F00",
    "gspo": "#56B4E9",
    "ctpo": "#009E73",
    "ctpo-fixed": "#0072B2",
    "seq-is": "#CC79A7",
}
"""Okabe-Ito colours; the same method has the same colour in every figure."""
FALLBACK_COLORS = ("#D55E00", "#F0E442", "#000000", "#999999")


def method_color(method: str, index: int = 0) -> str:
    """The method's colour, or a distinct fallback for a method the registry does not know."""
    return METHOD_COLORS.get(method, FALLBACK_COLORS[index % len(FALLBACK_COLORS)])
