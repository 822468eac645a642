"""Datasets as in-memory NumPy arrays (NHWC float32 in [0, 1], int32 labels), and batching."""

from advtrace._src.data import Batch  # noqa: I001  (one symbol per line, optax style)
from advtrace._src.data import Dataset
from advtrace._src.data import DatasetInfo
from advtrace._src.data import DatasetNotFoundError
from advtrace._src.data import batches
from advtrace._src.data import dataset_info
from advtrace._src.data import deepsec_split
from advtrace._src.data import load
from advtrace._src.data import select_candidates

__all__ = (
    "Batch",
    "Dataset",
    "DatasetInfo",
    "DatasetNotFoundError",
    "batches",
    "dataset_info",
    "deepsec_split",
    "load",
    "select_candidates",
)
