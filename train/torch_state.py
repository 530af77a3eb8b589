"""Read a legacy (pre-1.6, non-zip) PyTorch state dict into numpy without torch or arbitrary unpickling."""

from __future__ import annotations

import collections
import io
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hematovision.errors import ModelInvalid

logger = logging.getLogger(__name__)

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
_COUNT_BYTES = 8

# The only storage types a state dict of real-valued weights needs (bfloat16 has no numpy type).
_STORAGE_DTYPES = {
    "DoubleStorage": "f8",
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


class CheckpointUnsafe(ModelInvalid):
    """A checkpoint's pickle asks for code this reader does not allow."""


class CheckpointCorrupt(ModelInvalid):
    """A checkpoint is truncated, not in the legacy torch format, or inconsistent."""


@dataclass(frozen=True)
class _StorageType:
    name: str
    dtype: str


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: str
    numel: int
    view_offset: int = 0


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> _TensorRef:
    """Stand-in for torch._utils._rebuild_tensor(_v2): records where the tensor's data lies."""
    if not isinstance(storage, _StorageRef):
        raise CheckpointCorrupt(f"tensor built from {type(storage).__name__}, not a storage")
    return _TensorRef(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the few globals a tensor state dict needs."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str):
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise CheckpointUnsafe(
                f"{self.source}: refuses to load global {module}.{name}; only plain tensor state dicts "
                "are accepted. Re-save the weights with torch.save(model.state_dict(), path) from a trusted source."
            )
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise CheckpointUnsafe(f"{self.source}: unexpected persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel, view = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointCorrupt(f"{self.source}: storage {key} has no known storage type")
        root = self.storages.setdefault(str(key), _StorageRef(str(key), storage_type.dtype, int(numel)))
        if view is None:
            return root
        _view_key, view_offset, _view_size = view
        return _StorageRef(root.key, root.dtype, root.numel, int(view_offset))


def _load_pickle(unpickler: _SafeUnpickler, what: str):
    try:
        return unpickler.load()
    except ModelInvalid:
        raise
    except Exception as exc:  # any malformed pickle; no code of the file's choosing can run here
        raise CheckpointCorrupt(
            f"{unpickler.source}: cannot read the {what} ({exc}); the file is truncated or not a legacy "
            "torch.save checkpoint. Reinstall or re-download it."
        ) from exc


def _read_header(stream: io.BytesIO, source: str) -> str:
    """Check magic number and protocol version; return the numpy byte-order character."""
    magic = _load_pickle(_SafeUnpickler(stream, source), "magic number")
    if magic != LEGACY_MAGIC_NUMBER:
        raise CheckpointCorrupt(f"{source}: not a legacy torch.save file (wrong magic number)")
    version = _load_pickle(_SafeUnpickler(stream, source), "protocol version")
    if version != LEGACY_PROTOCOL_VERSION:
        raise CheckpointCorrupt(f"{source}: unsupported torch serialization protocol {version!r}")
    sys_info = _load_pickle(_SafeUnpickler(stream, source), "system info")
    return "<" if sys_info.get("little_endian", True) else ">"


def _read_storages(stream: io.BytesIO, buffer: bytes, refs: dict[str, _StorageRef], order: str, source: str):
    keys = _load_pickle(_SafeUnpickler(stream, source), "storage key list")
    if sorted(map(str, keys)) != sorted(refs):
        raise CheckpointCorrupt(f"{source}: storage key list does not match the tensors")
    storages, position = {}, stream.tell()
    for key in map(str, keys):
        ref = refs[key]
        dtype = np.dtype(order + ref.dtype)
        end = position + _COUNT_BYTES + ref.numel * dtype.itemsize
        if end > len(buffer):
            raise CheckpointCorrupt(
                f"{source}: truncated: storage {key} needs bytes up to {end}, file has {len(buffer)}. "
                "Reinstall or re-download the checkpoint."
            )
        count = int.from_bytes(buffer[position : position + _COUNT_BYTES], "little" if order == "<" else "big")
        if count != ref.numel:
            raise CheckpointCorrupt(f"{source}: storage {key} holds {count} elements, expected {ref.numel}")
        storages[key] = np.frombuffer(buffer, dtype=dtype, count=count, offset=position + _COUNT_BYTES)
        position = end
    return storages


def _fits(ref: _TensorRef, available: int) -> bool:
    """Whether every element the tensor's offset, size and stride address lies inside the storage."""
    if len(ref.size) != len(ref.stride) or min((ref.offset, *ref.size, *ref.stride)) < 0:
        return False
    if not all(ref.size):
        return ref.offset <= available
    return ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride)) < available


def _materialize(name: str, ref: _TensorRef, storages: dict[str, np.ndarray], source: str) -> np.ndarray:
    data = storages[ref.storage.key][ref.storage.view_offset :]
    if not _fits(ref, data.size):
        raise CheckpointCorrupt(f"{source}: tensor {name} lies outside its storage")
    strides = tuple(s * data.itemsize for s in ref.stride)
    view = np.lib.stride_tricks.as_strided(data[ref.offset :], shape=ref.size, strides=strides, writeable=False)
    return np.array(view, dtype=data.dtype.newbyteorder("="), order="C")


def load_legacy_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a legacy torch.save state dict as {name: numpy array}, without torch and without running code.

    Raises CheckpointUnsafe (a ModelInvalid) when the pickle names a global other than OrderedDict,
    the tensor rebuild functions and storage types; CheckpointCorrupt (a ModelInvalid) when the file
    is missing, truncated, not in the legacy format or not a dict of tensors.
    """
    path = Path(path)
    try:
        buffer = path.read_bytes()
    except OSError as exc:
        raise CheckpointCorrupt(f"{path}: cannot read the checkpoint ({exc})") from exc
    stream, source = io.BytesIO(buffer), str(path)
    if buffer.startswith(b"PK\x03\x04"):
        raise CheckpointCorrupt(
            f"{source}: a zip-format checkpoint (torch >= 1.6); this reader takes the legacy format only. "
            "Re-save it with torch.save(state_dict, path, _use_new_zipfile_serialization=False)."
        )
    order = _read_header(stream, source)
    unpickler = _SafeUnpickler(stream, source)
    state = _load_pickle(unpickler, "state dict")
    if not isinstance(state, dict) or not all(isinstance(v, _TensorRef) for v in state.values()):
        raise CheckpointCorrupt(f"{source}: not a state dict of tensors (save model.state_dict() instead)")
    storages = _read_storages(stream, buffer, unpickler.storages, order, source)
    arrays = {str(name): _materialize(name, ref, storages, source) for name, ref in state.items()}
    logger.debug("read %d tensors from %s", len(arrays), source)
    return arrays
