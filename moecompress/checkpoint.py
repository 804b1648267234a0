"""Read a local Hugging Face checkpoint folder lazily, one tensor at a time, and validate it."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from .adapters import Family, MoEWeights, family_for
from .errors import UserError

SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
)


def builtin_model_dir() -> Path:
    from .builtin import MODEL_DIR

    return MODEL_DIR


def resolve_model(path: str | Path | None) -> Path:
    """The model folder: ``path``, or the built-in model when None (or the word "builtin" and no such folder)."""
    if path is None or (str(path) == "builtin" and not Path("builtin").exists()):
        p = builtin_model_dir()
        if not (p / "config.json").exists():
            raise UserError(f"the built-in model is missing from {p}: reinstall moecompress")
        return p
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"model path {p} does not exist: give a local Hugging Face model folder")
    if not p.is_dir():
        raise UserError(f"model path {p} is a file: give the folder that holds config.json and *.safetensors")
    if not (p / "config.json").exists():
        raise UserError(f"{p} has no config.json: give a local Hugging Face model folder")
    return p.resolve()


def _read_header(path: Path) -> bytes:
    """The safetensors JSON header bytes; raises UserError when the file is not a valid safetensors file."""
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("shorter than 8 bytes")
            (n,) = struct.unpack("<Q", raw)
            size = path.stat().st_size
            if n > min(size - 8, 100_000_000):
                raise ValueError("header length is larger than the file")
            header = f.read(n)
        meta = json.loads(header)
        end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"tensor data runs past the end of the file ({8 + n + end} > {size} bytes)")
        return header
    except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
        raise UserError(
            f"{path.name} is not a valid safetensors file ({err}): re-download or re-save the model"
        ) from None


class Checkpoint:
    """A validated local HF checkpoint folder with lazy tensor access."""

    def __init__(self, path: str | Path | None):
        self.path = resolve_model(path)
        self.config = self._load_config()
        self.family: Family = family_for(self.config)
        self.weight_map = self._load_weight_map()
        self._headers = {f: _read_header(self.path / f) for f in sorted(set(self.weight_map.values()))}

    # ---- validation -----------------------------------------------------------------------------
    def _load_config(self) -> PretrainedConfig:
        try:
            raw = json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{self.path / 'config.json'} is not valid JSON ({err})") from None
        if not isinstance(raw, dict) or "model_type" not in raw:
            raise UserError(f"{self.path / 'config.json'} has no model_type: not a transformers model config")
        try:
            return AutoConfig.from_pretrained(self.path, trust_remote_code=False)
        except (ValueError, KeyError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(
                f"transformers cannot read config.json (model_type {raw['model_type']!r}): {first}"
            ) from None

    def _load_weight_map(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as err:
                raise UserError(f"{index} is not a valid safetensors index ({err})") from None
            root = self.path.resolve()
            for fname in set(wm.values()):
                target = (self.path / fname).resolve()
                if root not in target.parents or Path(fname).is_absolute():
                    raise UserError(f"{index.name} points outside the model folder ({fname!r}): refusing to read it")
                if not target.exists():
                    raise UserError(f"{index.name} names shard {fname} which is missing from {self.path}")
            return dict(wm)
        single = self.path / "model.safetensors"
        if single.exists():
            header = json.loads(_read_header(single))
            return {k: "model.safetensors" for k in header if k != "__metadata__"}
        if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")):
            raise UserError(
                f"{self.path} holds only pickle weights (*.bin/*.pt), which moecompress never loads: "
                "convert them to safetensors first"
            )
        raise UserError(f"{self.path} has no model.safetensors or model.safetensors.index.json")

    # ---- facts ----------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return self.family.num_experts(self.config)

    @property
    def top_k(self) -> int:
        return self.family.top_k(self.config)

    @property
    def moe_layers(self) -> list[int]:
        return self.family.moe_layers(self.config)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over config.json and, per shard, its name, size, safetensors header and 16 evenly spaced
        64 KiB samples of its tensor data (so two same-shaped models with different weights differ, without
        reading whole multi-GB shards)."""
        h = hashlib.sha256((self.path / "config.json").read_bytes())
        block, samples = 64 * 1024, 16
        for fname, header in self._headers.items():
            f = self.path / fname
            size = f.stat().st_size
            h.update(fname.encode())
            h.update(str(size).encode())
            h.update(header)
            start = 8 + len(header)
            span = max(size - start - block, 0)
            with f.open("rb") as fh:
                for i in range(samples):
                    fh.seek(start + span * i // max(samples - 1, 1))
                    h.update(fh.read(block))
        return h.hexdigest()

    @property
    def bytes_on_disk(self) -> int:
        return sum((self.path / f).stat().st_size for f in self._headers)

    def tensor_info(self) -> dict[str, dict[str, Any]]:
        """key -> {dtype, shape} from the headers, without reading data."""
        out: dict[str, dict[str, Any]] = {}
        for header in self._headers.values():
            for k, v in json.loads(header).items():
                if k != "__metadata__":
                    out[k] = {"dtype": v["dtype"], "shape": v["shape"]}
        return out

    @property
    def num_params(self) -> int:
        total = 0
        for info in self.tensor_info().values():
            n = 1
            for s in info["shape"]:
                n *= s
            total += n
        return total

    # ---- tensors --------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.weight_map)

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Read tensors, opening each shard once and closing it after (its memory map is released, so
        resident memory stays at what the caller keeps, not what it has read)."""
        by_file: dict[str, list[str]] = {}
        for key in keys:
            fname = self.weight_map.get(key)
            if fname is None:
                raise UserError(f"tensor {key} is missing from {self.path}")
            by_file.setdefault(fname, []).append(key)
        out: dict[str, torch.Tensor] = {}
        for fname, ks in by_file.items():
            try:
                handle = safe_open(str(self.path / fname), framework="pt")
            except Exception as err:  # safetensors raises its own error types
                raise UserError(f"{fname} cannot be opened as safetensors ({err})") from None
            with handle as f:
                for key in ks:
                    try:
                        out[key] = f.get_tensor(key)
                    except Exception as err:
                        msg = f"tensor {key} in {fname} cannot be read ({err}): the file is corrupt"
                        raise UserError(msg) from None
        return out

    def get(self, key: str) -> torch.Tensor:
        return self.read([key])[key]

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        return self.read([k for k in self.weight_map if k.startswith(prefix)])

    def layer_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """All hub-format tensors of decoder layer ``layer``."""
        return self.prefixed(f"model.layers.{layer}.")

    def moe_weights(self, layer: int) -> MoEWeights:
        """The per-layer view of one MoE layer's routed experts, read lazily from disk."""
        pat = self.family.routed_key_pattern(layer)
        tensors = self.read([k for k in self.weight_map if pat.match(k)])
        return self.family.read_layer(tensors, layer, self.num_experts)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor, one shard open at a time."""
        by_file: dict[str, list[str]] = {}
        for k, f in self.weight_map.items():
            by_file.setdefault(f, []).append(k)
        for keys in by_file.values():
            for i in range(0, len(keys), 64):
                yield from self.read(keys[i : i + 64]).items()

    def side_files(self) -> list[Path]:
        return [self.path / f for f in SIDE_FILES if (self.path / f).exists()]

    def __repr__(self) -> str:
        return f"Checkpoint({self.path}, family={self.family.name}, experts={self.num_experts}, top_k={self.top_k})"
