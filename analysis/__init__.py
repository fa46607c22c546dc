"""Figures and tables from run directories and the MLflow store (never from a training backend)."""
