"""A torch-free, restricted reader for legacy (pre-1.6, non-zip) ``torch.save`` state dicts.

The legacy format is five pickles followed by raw storages:

1. the magic number ``0x1950a86a20f9469cfc6c``;
2. the protocol version ``1001``;
3. ``sys_info``, a dict (``little_endian`` must be True);
4. the state dict: an ``OrderedDict`` name -> tensor, each tensor a REDUCE of
   ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)``
   whose ``storage`` is a persistent id ``('storage', <Storage type>, key, location, numel,
   view_metadata)``;
5. the list of storage keys, in the order the storages follow.

Each storage is an int64 little-endian element count followed by the raw little-endian data.

Nothing here calls ``pickle.load`` on the file. The three header pickles and the key list are
parsed by an unpickler that allows no globals at all; the state dict by one whose global
allowlist is exactly ``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``,
``torch.FloatStorage`` and ``torch.LongStorage``, each mapped to an inert stand-in. Any other
global (``os.system``, ``builtins.eval``, ...) is refused before it can be called.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
from typing import Any
from typing import NamedTuple

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001


class LegacyTorchError(ValueError):
  """The file is not a well-formed legacy ``torch.save`` state dict, or is unsafe to read."""


class _DType(NamedTuple):
  """Stand-in for ``torch.FloatStorage`` / ``torch.LongStorage``."""
  name: str
  dtype: np.dtype


class _Storage(NamedTuple):
  """A persistent id resolved to a placeholder: the storage key, its dtype and element count."""
  key: str
  dtype: np.dtype
  numel: int


class _TensorRef(NamedTuple):
  """What ``_rebuild_tensor_v2`` recorded; turned into an array once the storages are read."""
  storage: _Storage
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata  # Irrelevant for inference weights.
  if not isinstance(storage, _Storage):
    raise LegacyTorchError(f"tensor storage must be a persistent storage id, got {storage!r}")
  return _TensorRef(storage, int(storage_offset), tuple(int(s) for s in size),
                    tuple(int(s) for s in stride))


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch", "FloatStorage"): _DType("FloatStorage", np.dtype("<f4")),
    ("torch", "LongStorage"): _DType("LongStorage", np.dtype("<i8")),
}


class _NoGlobalsUnpickler(pickle.Unpickler):
  """Allows plain data only: any global or persistent id is refused."""

  def find_class(self, module, name):
    raise LegacyTorchError(
        f"refused global {module}.{name}: this part of the file may hold plain data only")

  def persistent_load(self, pid):
    raise LegacyTorchError(f"refused persistent id {pid!r}: not expected in this part of the file")


class _StateDictUnpickler(pickle.Unpickler):
  """Allows exactly the globals of a legacy state dict; storages resolve to placeholders."""

  def find_class(self, module, name):
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      allowed = ", ".join(f"{m}.{n}" for m, n in _ALLOWED_GLOBALS)
      raise LegacyTorchError(
          f"refused global {module}.{name}: a legacy torch state dict may only reference "
          f"{allowed}") from None

  def persistent_load(self, pid):
    if (not isinstance(pid, tuple) or len(pid) != 6 or pid[0] != "storage"
        or not isinstance(pid[1], _DType) or not isinstance(pid[2], str)
        or not isinstance(pid[4], int) or pid[4] < 0 or pid[5] is not None):
      raise LegacyTorchError(
          f"unsupported persistent id {pid!r}; expected ('storage', FloatStorage|LongStorage, "
          "key, location, numel, None)")
    return _Storage(pid[2], pid[1].dtype, pid[4])


def _unpickle(stream: io.BytesIO, unpickler_cls, what: str) -> Any:
  try:
    return unpickler_cls(stream).load()
  except LegacyTorchError as e:
    raise LegacyTorchError(f"{what}: {e}") from None
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
          IndexError, KeyError, struct.error) as e:
    raise LegacyTorchError(f"{what} is not a valid pickle ({type(e).__name__}: {e})") from None


def _to_array(ref: _TensorRef, data: np.ndarray, name: str) -> np.ndarray:
  size, stride = ref.size, ref.stride
  if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
    raise LegacyTorchError(f"tensor {name!r} has invalid size {size} / stride {stride}")
  if int(np.prod(size)) == 0:
    return np.zeros(size, data.dtype)
  last = ref.offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
  if ref.offset < 0 or last >= data.size:
    raise LegacyTorchError(
        f"tensor {name!r} (offset {ref.offset}, size {size}, stride {stride}) reads past the "
        f"end of its storage of {data.size} elements")
  view = np.lib.stride_tricks.as_strided(
      data[ref.offset:], shape=size, strides=tuple(s * data.itemsize for s in stride),
      writeable=False)
  return np.array(view, dtype=data.dtype.newbyteorder("="))


def load_state_dict_bytes(raw: bytes) -> collections.OrderedDict[str, np.ndarray]:
  """Parses a legacy ``torch.save`` state dict held in memory; see :func:`load_state_dict`."""
  stream = io.BytesIO(raw)
  magic = _unpickle(stream, _NoGlobalsUnpickler, "magic number")
  if magic != MAGIC_NUMBER:
    raise LegacyTorchError(
        f"bad magic number {magic!r}: not a legacy (pre-1.6) torch.save file. Files written by "
        "torch >= 1.6 are zip archives; re-save them with "
        "torch.save(sd, path, _use_new_zipfile_serialization=False).")
  protocol = _unpickle(stream, _NoGlobalsUnpickler, "protocol version")
  if protocol != PROTOCOL_VERSION:
    raise LegacyTorchError(f"unsupported protocol version {protocol!r}; expected 1001")
  sys_info = _unpickle(stream, _NoGlobalsUnpickler, "sys_info")
  if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
    raise LegacyTorchError(f"unsupported sys_info {sys_info!r}; only little-endian files")
  state = _unpickle(stream, _StateDictUnpickler, "state dict")
  if not isinstance(state, dict) or not all(
      isinstance(k, str) and isinstance(v, _TensorRef) for k, v in state.items()):
    raise LegacyTorchError("the state dict pickle is not a mapping of names to tensors")
  keys = _unpickle(stream, _NoGlobalsUnpickler, "storage key list")
  if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
    raise LegacyTorchError("the storage key list is not a list of strings")

  storages = {}
  for ref in state.values():
    previous = storages.setdefault(ref.storage.key, ref.storage)
    if previous != ref.storage:
      raise LegacyTorchError(f"storage {ref.storage.key!r} is declared inconsistently")
  if sorted(keys) != sorted(storages) or len(set(keys)) != len(keys):
    raise LegacyTorchError(
        f"the storage key list ({len(keys)} keys) does not match the {len(storages)} storages "
        "referenced by the state dict")

  pos = stream.tell()
  data = {}
  for key in keys:
    storage = storages[key]
    if pos + 8 > len(raw):
      raise LegacyTorchError(f"file is truncated: missing the header of storage {key!r}")
    (count,) = struct.unpack_from("<q", raw, pos)
    pos += 8
    if count != storage.numel:
      raise LegacyTorchError(
          f"storage {key!r} holds {count} elements but the state dict declares {storage.numel}")
    nbytes = count * storage.dtype.itemsize
    if pos + nbytes > len(raw):
      raise LegacyTorchError(
          f"file is truncated: storage {key!r} needs {nbytes} bytes, {len(raw) - pos} remain")
    data[key] = np.frombuffer(raw, storage.dtype, count, pos)
    pos += nbytes
  if pos != len(raw):
    raise LegacyTorchError(f"{len(raw) - pos} unexpected trailing bytes after the last storage")

  return collections.OrderedDict(
      (name, _to_array(ref, data[ref.storage.key], name)) for name, ref in state.items())


def load_state_dict(path: str | os.PathLike) -> collections.OrderedDict[str, np.ndarray]:
  """Reads a legacy ``torch.save`` state dict into NumPy arrays, without torch or ``pickle.load``.

  Args:
    path: a ``.pt`` file written by ``torch.save(model.state_dict(), path)`` with torch < 1.6
      (or with ``_use_new_zipfile_serialization=False``).

  Returns:
    An ``OrderedDict`` mapping each state-dict key to a NumPy array in the native byte order
    (float32 for ``FloatStorage``, int64 for ``LongStorage``), in PyTorch's layout.

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    LegacyTorchError: on a bad magic number or protocol, a refused global, a truncated storage,
      trailing bytes, or a size/stride that does not fit its storage.
  """
  with open(path, "rb") as f:
    raw = f.read()
  try:
    return load_state_dict_bytes(raw)
  except LegacyTorchError as e:
    raise LegacyTorchError(f"{os.fspath(path)}: {e}") from None
