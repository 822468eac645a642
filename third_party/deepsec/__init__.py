"""Torch-free reader for the DEEPSEC raw-model weight files (MIT licence; see README.md)."""
