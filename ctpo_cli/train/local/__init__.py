"""The local backend: the same losses and diagnostics as the verl path, on one machine, with a tiny model."""
