"""ml_collections configs for the experiment binaries; each module exposes ``get_config()``."""
