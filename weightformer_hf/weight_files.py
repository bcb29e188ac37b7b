"""Weight files of one checkpoint folder: which files hold the weights, their integrity, lazy reading.

A checkpoint folder (a local directory or a downloaded Hub snapshot) stores its weights as one
`model.safetensors`, as shards listed in `model.safetensors.index.json`, or, in older repos, as pickle
files (`pytorch_model.bin`, its index, `*.pth`). This module picks the files, checks safetensors headers
(which catches truncated and corrupt files before anything is read), hashes local folders and reads
safetensors tensors one at a time.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import InvalidWeightsError, TeacherSourceError, first_line

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLES = ("pytorch_model.bin", "pytorch_model.pth", "model.pth")


@dataclass
class WeightFiles:
    """The weight files of a checkpoint, relative to its folder, and whether they are safetensors."""

    files: list[str]
    safetensors: bool
    index: str | None = None  # the shard index file, when sharded

    @property
    def all_files(self) -> list[str]:
        return ([self.index] if self.index else []) + self.files


def choose_weight_files(available: list[str], where: str, read_index=None) -> WeightFiles:
    """Pick the weight files among `available` (file names in a folder or repo), safetensors first.

    `read_index(name)` returns the parsed JSON of an index file (downloading it for Hub repos); it is
    only called for sharded checkpoints. Raises `TeacherSourceError` naming `where` if nothing fits.
    """
    names = set(available)
    if SAFE_INDEX in names:
        return WeightFiles(_present(_shards(read_index, SAFE_INDEX, where), names, SAFE_INDEX, where), True, SAFE_INDEX)
    if SAFE_SINGLE in names:
        return WeightFiles([SAFE_SINGLE], True)
    top_level = sorted(n for n in names if "/" not in n and n.endswith(".safetensors"))
    if len(top_level) == 1:
        return WeightFiles(top_level, True)
    if PICKLE_INDEX in names:
        return WeightFiles(_present(_shards(read_index, PICKLE_INDEX, where), names, PICKLE_INDEX, where), False,
                           PICKLE_INDEX)  # fmt: skip
    for name in PICKLE_SINGLES:
        if name in names:
            return WeightFiles([name], False)
    raise TeacherSourceError(
        f"{where} has no weight file: expected {SAFE_SINGLE}, {SAFE_INDEX} (sharded) or "
        f"{', '.join(PICKLE_SINGLES)}; found {sorted(names)[:12]}"
    )


def _present(shards: list[str], names: set[str], index_name: str, where: str) -> list[str]:
    missing = [s for s in shards if s not in names]
    if missing:
        raise InvalidWeightsError(f"{where}: {index_name} lists shard {missing[0]!r}, which is missing")
    return shards


def _shards(read_index, index_name: str, where: str) -> list[str]:
    try:
        weight_map = read_index(index_name)["weight_map"]
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise InvalidWeightsError(f"{where}: {index_name} is not a valid shard index ({err})") from err
    return sorted(set(weight_map.values()))


def check_safetensors(path: Path, where: str) -> list[str]:
    """The tensor names of a safetensors file; `InvalidWeightsError` naming the file if it is unreadable.

    safetensors validates the header against the file size, so truncated files fail here.
    """
    if not path.is_file():
        raise InvalidWeightsError(f"{where}: weight file {path.name!r} is missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError, ValueError) as err:
        raise InvalidWeightsError(
            f"{where}: weight file {path.name!r} is corrupt or truncated ({err}); re-download or re-save it"
        ) from err


def content_hash(folder: Path, files: list[str]) -> str:
    """sha256 over the names and bytes of `files` (sorted): the identity of a local checkpoint."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0")
        with open(folder / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


# safetensors dtype names that torch can read straight from the file bytes (little-endian)
_TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data starts."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def is_lazy(state: Mapping) -> bool:
    """Whether `state` reads tensors from disk on access, like `LazySafetensorsStateDict` (it can tell a tensor's
    shape without reading it), so callers should re-read rather than keep what they took from it."""
    return callable(getattr(state, "shape", None)) and not isinstance(state, dict)


class LazySafetensorsStateDict(Mapping):
    """A read-only state dict whose tensors are read from safetensors files on access.

    Nothing is held in memory but the headers (parsed once): each `__getitem__` reads one tensor into
    fresh memory with one positioned read (no memory map stays open, so reading a whole teacher tensor by
    tensor never holds more than one tensor), optionally moved to `device`/`dtype`. Nothing is cached:
    K teachers can be streamed layer by layer. `shape(name)` needs no read at all, which lets
    `TeacherSet` validate shapes without reading any tensor.
    """

    def __init__(
        self,
        folder: Path,
        files: list[str],
        where: str,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.where = where
        self.device, self.dtype = device, dtype
        self._file_of: dict[str, Path] = {}
        self._entry: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name in files:
            path = folder / name
            keys = check_safetensors(path, where)
            try:
                header, start = _read_header(path)
            except (OSError, ValueError, struct.error) as err:
                raise InvalidWeightsError(f"{where}: weight file {name!r} has an unreadable header ({err})") from err
            for key in keys:
                self._file_of[key] = path
                info = header[key]
                begin, end = info["data_offsets"]
                self._entry[key] = (info["dtype"], tuple(info["shape"]), start + begin, end - begin)

    def _read(self, name: str) -> torch.Tensor:
        path = self._file_of[name]  # KeyError for unknown names, as a dict would
        dtype_name, shape, offset, nbytes = self._entry[name]
        torch_dtype = _TORCH_DTYPES.get(dtype_name)
        if torch_dtype is None or sys.byteorder != "little":  # rare dtypes: let safetensors decode them
            with safe_open(str(path), framework="pt") as handle:
                return handle.get_tensor(name)
        tensor = torch.empty(shape, dtype=torch_dtype)
        if nbytes != tensor.numel() * tensor.element_size():
            raise InvalidWeightsError(f"{self.where}: tensor {name!r} in {path.name!r} has an inconsistent size")
        self._read_into(path, tensor, offset)
        return tensor

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` (axis 0) of tensor `name`, reading only their bytes."""
        dtype_name, shape, offset, nbytes = self._entry[name]
        torch_dtype = _TORCH_DTYPES.get(dtype_name)
        if torch_dtype is None or sys.byteorder != "little" or not shape:
            return self[name][start:stop]
        start, stop = max(0, start), min(shape[0], stop)
        row_bytes = nbytes // shape[0] if shape[0] else 0
        try:
            tensor = torch.empty((max(0, stop - start), *shape[1:]), dtype=torch_dtype)
            self._read_into(self._file_of[name], tensor, offset + start * row_bytes)
        except OSError as err:
            raise InvalidWeightsError(
                f"{self.where}: cannot read tensor {name!r} from {self._file_of[name].name!r} ({err})"
            ) from err
        return self._convert(tensor)

    @staticmethod
    def _read_into(path: Path, tensor: torch.Tensor, offset: int) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if not nbytes:
            return
        buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        with open(path, "rb", buffering=0) as handle:
            handle.seek(offset)
            done = 0
            while done < nbytes:
                got = handle.readinto(buffer[done:])
                if not got:
                    raise OSError(f"file ends {nbytes - done} bytes early")
                done += got

    def _convert(self, tensor: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype if self.dtype is not None and tensor.is_floating_point() else None
        if self.device is not None or dtype is not None:
            tensor = tensor.to(device=self.device, dtype=dtype)
        return tensor

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            tensor = self._read(name)
        except (SafetensorError, OSError) as err:
            path = self._file_of[name]
            raise InvalidWeightsError(
                f"{self.where}: cannot read tensor {name!r} from {path.name!r} ({err})"
            ) from err
        return self._convert(tensor)

    def shape(self, name: str) -> tuple[int, ...]:
        self._file_of[name]  # KeyError for unknown names
        return self._entry[name][1]

    def is_floating(self, name: str) -> bool:
        """Whether the file stores `name` as floating point, without reading it."""
        return self._entry[name][0] in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def __contains__(self, name: object) -> bool:
        return name in self._file_of


class OverlayStateDict(Mapping):
    """`base` with some tensors replaced (reordered classifier rows) without reading the others."""

    def __init__(self, base: Mapping[str, torch.Tensor], overrides: Mapping[str, torch.Tensor]):
        self.base, self.overrides = base, dict(overrides)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.overrides[name] if name in self.overrides else self.base[name]

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name in self.overrides:
            return self.overrides[name][start:stop]
        return tensor_rows(self.base, name, start, stop)

    def is_floating(self, name: str) -> bool:
        if name in self.overrides:
            return self.overrides[name].is_floating_point()
        return is_floating(self.base, name)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.overrides:
            return tuple(self.overrides[name].shape)
        shape_of = getattr(self.base, "shape", None)
        return tuple(shape_of(name)) if callable(shape_of) else tuple(self.base[name].shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    def __contains__(self, name: object) -> bool:
        return name in self.base


def tensor_rows(state: Mapping[str, torch.Tensor], name: str, start: int, stop: int) -> torch.Tensor:
    """Rows `start:stop` (axis 0) of `state[name]`; lazy mappings read only those rows (a view otherwise)."""
    read_rows = getattr(state, "read_rows", None)
    return read_rows(name, start, stop) if callable(read_rows) else state[name][start:stop]


def load_pickle_state_dict(folder: Path, files: list[str], where: str) -> dict[str, torch.Tensor]:
    """Tensors from pickle checkpoints, with `weights_only=True` (no arbitrary code on unpickling)."""
    state: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            loaded = torch.load(folder / name, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for bad pickles
            # its first line only: the rest advises `weights_only=False`, which would run the file's code
            raise InvalidWeightsError(
                f"{where}: cannot read pickle weight file {name!r} safely ({first_line(err)}); it is truncated, "
                "corrupt or holds objects other than tensors"
            ) from err
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
        state.update({k.removeprefix("module."): v for k, v in loaded.items() if isinstance(v, torch.Tensor)})
    return state


def is_floating(state_dict: Mapping[str, torch.Tensor], name: str) -> bool:
    """Whether tensor `name` is floating point, without reading it when the mapping can tell."""
    floating = getattr(state_dict, "is_floating", None)
    return floating(name) if callable(floating) else state_dict[name].is_floating_point()
