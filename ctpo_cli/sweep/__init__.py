"""``ctpo sweep``: a grid of runs (methods x seeds x overrides) on Ray, evaluated and reported together."""
