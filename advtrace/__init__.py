"""advtrace: adversarial-example forensics in JAX."""

__version__ = "0.1.0"
