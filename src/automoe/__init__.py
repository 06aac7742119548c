"""automoe: hardware-aware search for heterogeneous Mixture-of-Experts translation models."""

__version__ = "0.1.0"
