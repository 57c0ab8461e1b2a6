"""Tensor sources: where HF -> ours conversion (hf.py) reads full tensors under Hugging Face
BloomModel names (no `transformer.` prefix).

A source has `hf_config()` (HF BloomConfig fields), `keys()` (HF names) and `get(name)` (the full
tensor); it may also offer `shape(name)` and `narrow(name, dim, start, stop)`, so that each rank
file reads only its slices. `HFDirectorySource` reads a Hugging Face directory lazily
(safetensors or .bin, single or sharded, with or without the prefix); megatron_deepspeed.py's
MegatronDeepSpeedSource reads Megatron-DeepSpeed layer files. `Reader` gives any source shape /
narrow, with errors that name the source.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Protocol

import torch

from ascendspeed.checkpoint.tensors import HF_PREFIX
from ascendspeed.errors import ConvertError


class TensorSource(Protocol):
    def hf_config(self) -> dict: ...

    def keys(self) -> Iterable[str]: ...

    def get(self, name: str) -> torch.Tensor: ...


class HFDirectorySource:
    """A BloomForCausalLM directory: config.json plus model.safetensors, sharded safetensors
    (model.safetensors.index.json), pytorch_model.bin or sharded .bin. Tensors are read on
    demand (safetensors slices; .bin files memory-mapped)."""

    def __init__(self, path: str):
        self.path = path
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise ConvertError(f"{config_path} does not exist (not a Hugging Face model directory)")
        try:
            with open(config_path, encoding="utf-8") as f:
                self._config = json.load(f)
        except (OSError, ValueError) as error:
            raise ConvertError(f"{config_path}: cannot be read as JSON ({error})") from None
        self._handles: dict[str, object] = {}
        self._where: dict[str, tuple[str, str]] = {}  # name -> (file, key stored in it)
        self.listing = self._discover()

    def _discover(self) -> str:
        """Fill the name -> (file, key) map; the file that lists the names (for messages)."""
        for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                                   ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            index = os.path.join(self.path, index_name)
            if os.path.isfile(index):
                try:
                    with open(index, encoding="utf-8") as f:
                        weight_map = json.load(f)["weight_map"]
                except (OSError, ValueError, KeyError) as error:
                    raise ConvertError(f"{index}: not a weight index ({error!r})") from None
                for key, file in weight_map.items():
                    path = os.path.join(self.path, file)
                    if not os.path.isfile(path):
                        raise ConvertError(f"{path} is missing ({index} names it for {key})")
                    self._add(key, path)
                return index
            path = os.path.join(self.path, single)
            if os.path.isfile(path):
                for key in self._open(path).keys():
                    self._add(key, path)
                return path
        raise ConvertError(f"{self.path}: no model.safetensors, model.safetensors.index.json, "
                           f"pytorch_model.bin or pytorch_model.bin.index.json")

    def _add(self, key: str, path: str) -> None:
        name = key[len(HF_PREFIX):] if key.startswith(HF_PREFIX) else key
        self._where[name] = (path, key)

    def _open(self, path: str):
        if path not in self._handles:
            try:
                if path.endswith(".safetensors"):
                    from safetensors import safe_open
                    self._handles[path] = safe_open(path, framework="pt", device="cpu")
                else:
                    self._handles[path] = _load_bin(path)
            except Exception as error:  # truncated, corrupt, or holding pickled code
                raise ConvertError(f"{path}: cannot be read ({type(error).__name__}: "
                                   f"{_first_line(error)})") from None
            if not hasattr(self._handles[path], "keys"):
                raise ConvertError(f"{path}: holds no state dict")
        return self._handles[path]

    def hf_config(self) -> dict:
        return dict(self._config)

    def keys(self) -> list[str]:
        return list(self._where)

    def where(self, name: str) -> str:
        return self._where[name][0] if name in self._where else self.listing

    def _tensor(self, name: str):
        """The stored tensor (.bin: memory-mapped) or safetensors slice of `name`."""
        if name not in self._where:
            raise ConvertError(f"{self.listing}: no tensor {HF_PREFIX}{name}")
        path, key = self._where[name]
        handle = self._open(path)
        try:
            if path.endswith(".safetensors"):
                return handle.get_slice(key)
            return handle[key]
        except Exception as error:
            raise ConvertError(f"{path}: cannot read tensor {key} ({type(error).__name__}: "
                               f"{_first_line(error)})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        stored = self._tensor(name)
        return tuple(stored.shape) if torch.is_tensor(stored) else tuple(stored.get_shape())

    def narrow(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        stored = self._tensor(name)
        try:
            if torch.is_tensor(stored):
                return stored.narrow(dim, start, stop - start)
            return stored[start:stop] if dim == 0 else stored[:, start:stop]
        except Exception as error:
            raise ConvertError(f"{self.where(name)}: cannot read tensor {name} "
                               f"({type(error).__name__}: {_first_line(error)})") from None

    def get(self, name: str) -> torch.Tensor:
        return self.narrow(name, 0, 0, self.shape(name)[0])


def _load_bin(path: str) -> dict:
    """A .bin state dict, memory-mapped (tensors are read when touched); files written before
    torch's zip format cannot be mapped and are read whole."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def _first_line(error: Exception) -> str:
    text = str(error)
    return text.splitlines()[0][:200] if text else ""


class Reader:
    """shape/narrow over any tensor source: native when it has them, else from get() (the last
    tensor kept, so that a rank's slices of one tensor load it once). Errors name the source."""

    def __init__(self, source: TensorSource, where: str):
        self.source, self.where = source, where
        self._last: tuple[str, torch.Tensor] | None = None

    def _full(self, name: str) -> torch.Tensor:
        if self._last is None or self._last[0] != name:
            self._last = None  # free the previous tensor before reading the next
            try:
                self._last = (name, self.source.get(name))
            except ConvertError:
                raise
            except Exception as error:
                raise ConvertError(f"{self.where}: cannot read tensor {name} "
                                   f"({type(error).__name__}: {_first_line(error)})") from None
        return self._last[1]

    def shape(self, name: str) -> tuple[int, ...]:
        if hasattr(self.source, "shape"):
            return tuple(self.source.shape(name))
        return tuple(self._full(name).shape)

    def narrow(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        if hasattr(self.source, "narrow"):
            return self.source.narrow(name, dim, start, stop)
        return self._full(name).narrow(dim, start, stop - start)

    def where_is(self, name: str) -> str:
        return self.source.where(name) if hasattr(self.source, "where") else self.where
