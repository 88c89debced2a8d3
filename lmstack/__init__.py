"""lmstack: a JAX/TPU-native stack for training large language models."""

__version__ = "0.1.0"
