"""Config-driven DCGAN training for PyTorch."""

__version__ = "0.1.0"
