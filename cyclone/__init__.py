"""Cyclone: serve ML models, log every prediction with its late label, monitor, retrain."""

__version__ = "0.1.0"
