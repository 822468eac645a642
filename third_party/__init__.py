"""Vendored or adapted third-party code, each with its own licence and provenance README."""
