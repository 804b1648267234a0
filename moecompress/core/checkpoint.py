"""Read a local Hugging Face checkpoint folder lazily, one tensor at a time, and validate it."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import stat
import struct
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from .errors import UserError
from .families import Family, MoEWeights, family_for
from .jsonfile import MAX_CONFIG_BYTES, read_json_file  # noqa: F401  (read_json_file: public here)
from .manifest import Manifest

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
    from ..builtin import MODEL_DIR

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


# bytes per element of every safetensors dtype
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
MAX_HEADER_BYTES = 100_000_000
MAX_LAYERS = 100_000  # bound on num_hidden_layers when the weights cannot tell (real models have ~100)
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
# a decoder layer's key on disk, before the family is known: under model.*, or a root transformers renames to model.*
# on load (Nemotron-H's backbone.*: Family.disk_body)
_DISK_LAYER_KEY = re.compile(r"^(?:model|backbone)\.layers\.(\d+)\.")


def load_manifest(path: str | Path) -> Manifest | None:
    """``moecompress.json`` of a folder, read strictly: see ``Manifest.read``."""
    return Manifest.read(Path(path))


def _check_entry(key: Any, v: Any, data_bytes: int) -> None:
    if not isinstance(v, dict):
        raise ValueError(f"entry {key!r} is a {type(v).__name__}, not an object")
    dtype, shape, offsets = v.get("dtype"), v.get("shape"), v.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"tensor {key} has unknown dtype {dtype!r}")
    ints = lambda xs: isinstance(xs, list) and all(type(x) is int and x >= 0 for x in xs)  # noqa: E731
    if not ints(shape) or len(shape) > 8:
        raise ValueError(f"tensor {key} has shape {shape!r}, not a list of sizes")
    if not ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise ValueError(f"tensor {key} has data_offsets {offsets!r}, not [begin, end]")
    numel = 1
    for d in shape:
        numel *= d
    if offsets[1] - offsets[0] != numel * DTYPE_BYTES[dtype]:
        raise ValueError(f"tensor {key} {dtype}{shape} needs {numel * DTYPE_BYTES[dtype]} bytes, has {offsets}")
    if offsets[1] > data_bytes:
        raise ValueError(f"tensor {key} data runs past the end of the file")


def _read_header(path: Path) -> tuple[bytes, dict[str, dict[str, Any]]]:
    """(header bytes, {key: {dtype, shape, data_offsets}}) of a safetensors file; a UserError when the file is
    not one (whatever regular file ``path`` resolves to: a symlink into a blob store is fine, /etc/passwd is not)."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise ValueError("not a regular file")
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("shorter than 8 bytes")
            (n,) = struct.unpack("<Q", raw)
            size = path.stat().st_size
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise ValueError("header length is larger than the file")
            header = f.read(n)
        meta = json.loads(header)
        if not isinstance(meta, dict):
            raise ValueError(f"the header is a JSON {type(meta).__name__}, not an object")
        extra = meta.get("__metadata__", {})
        if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
            raise ValueError("__metadata__ is not an object of strings")
        tensors = {k: v for k, v in meta.items() if k != "__metadata__"}
        for k, v in tensors.items():
            _check_entry(k, v, size - 8 - n)
        return header, tensors
    except (OSError, ValueError, RecursionError, struct.error) as err:
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err).splitlines()[0][:200]
        raise UserError(
            f"{path.name} is not a valid safetensors file ({reason}): re-download or re-save the model"
        ) from None


def _plain_name(fname: Any, index: str) -> str:
    """A shard name from an index must be a plain file name inside the model folder (no folders, no ``..``)."""
    if not isinstance(fname, str):
        raise UserError(f"{index} maps a tensor to {fname!r}, not a file name: the index is corrupt")
    if fname in ("", ".", "..") or Path(fname).is_absolute() or ".." in Path(fname).parts:
        raise UserError(f"{index} names shard {fname!r}, which points outside the model folder: refusing to read it")
    if "/" in fname or "\\" in fname or "\0" in fname:
        raise UserError(f"{index} names shard {fname!r}, which is not a plain file name in the model folder")
    return fname


def expected_shapes(config: PretrainedConfig) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """(state-dict name -> shape, parameter names) of the transformers model config.json describes, built on the
    meta device (no memory, well under a second even for 100B-parameter configs)."""
    from .derive import build_error, causal_lm

    cfg = copy.deepcopy(config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    try:
        with torch.device("meta"):
            model = causal_lm(cfg, experts_implementation="eager")
    except Exception as err:  # a config transformers accepts field by field can still fail as a whole
        why = build_error(err, cfg.model_type)
        raise UserError(f"transformers cannot build a {cfg.model_type} model from config.json ({why})") from None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, [n for n, _ in model.named_parameters()]


def check_shapes(ck: Checkpoint) -> None:
    """Every tensor on disk has the shape config.json implies, and (for plain folders) none is missing.

    Routers are checked first, so the routed expert count is bounded by real tensors before anything of that
    size is built. Routed expert tensors of non-uniform layouts (per-layer prune, exact atomic, quantized) are
    left to their own loaders, which check them against moecompress.json."""
    cfg, fam = ck.config, ck.family
    E, H = ck.num_experts, cfg.hidden_size
    moe = set(ck.moe_layers)
    uniform = ck.layout == "uniform" and not getattr(cfg, "quantization_config", None)

    def mismatch(key: str, got: tuple[int, ...], want: tuple[int, ...], why: str = "") -> UserError:
        return UserError(
            f"tensor {key} has shape {list(got)} but config.json implies {list(want)}{why}: "
            "config.json does not match the weights"
        )

    if uniform:
        for l in sorted(moe):
            rk = fam.router_key(l)
            key = next((k for k in (rk, fam.disk_to_module(rk)) if k in ck._info), None)
            if key is None:
                raise UserError(f"the weights lack the router of MoE layer {l} ({rk}): the checkpoint is incomplete")
            got = tuple(ck._info[key]["shape"])
            if got != (E, H):
                raise mismatch(key, got, (E, H), f" ({E} routed experts x hidden_size {H})")
    expected, params = expected_shapes(cfg)
    names = "|".join(re.escape(n) for n in fam.expert_names)
    blocks = f"{re.escape(fam.disk_block)}|{re.escape(fam.module_block)}"
    expert_re = re.compile(rf"^model\.layers\.(\d+)\.(?:{blocks})\.{re.escape(fam.experts)}\.(\d+)\.({names})\.weight$")
    present: set[Any] = set()
    for k in ck.weight_map:
        got = tuple(ck._info[k]["shape"])
        lm = _LAYER_KEY.match(k)
        layer = int(lm[1]) if lm else -1
        if layer in moe and fam.routed_key_pattern(layer).match(k):
            if not uniform:
                continue
            if em := expert_re.match(k):
                e, proj = int(em[2]), fam.expert_names.index(em[3])
                if e >= E:
                    raise UserError(f"tensor {k} is expert {e}, but config.json declares {E} routed experts")
                fused = expected.get(f"model.layers.{layer}.{fam.module_block}.{fam.experts}.gate_up_proj")
                if fam.gateless:  # transformers' up_proj [E, I, H] (the view's gate is read from the up key)
                    up = expected.get(f"model.layers.{layer}.{fam.module_block}.{fam.experts}.up_proj")
                    fused = None if up is None else (up[0], 2 * up[1], up[2])
                if fused is not None:
                    I = fused[1] // 2
                    want = (I, H) if proj < 2 else (H, I)
                    if got != want:
                        raise mismatch(k, got, want, f" (expert width {I}, hidden_size {H})")
                present.add((layer, e, proj))
                if fam.gateless:
                    present.add((layer, e, 1))
                continue
        name = fam.disk_to_module(k)
        if name in expected:
            want = expected[name]
            if fam.save_transposed and layer in moe and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                want = (want[0], want[2], want[1])  # transformers transposes them on save (Qwen3-VL-MoE)
            if got != want:
                raise mismatch(k, got, want)
            present.add(name)
    if not uniform:
        return
    for n in params:
        if n in present:
            continue
        lm = _LAYER_KEY.match(n)
        l = int(lm[1]) if lm else -1
        ups = tuple(f"{fam.experts}.{u}" for u in (("gate_up_proj", "up_proj") if fam.gateless else ("gate_up_proj",)))
        if l in moe and not fam.fused_disk and n.endswith((*ups, f"{fam.experts}.down_proj")):
            projs = (0, 1) if n.endswith(ups) else (2,)
            gone = [(e, p) for e in range(E) for p in projs if (l, e, p) not in present]
            if not gone:
                continue
            n = fam.expert_key(l, *gone[0])
        raise UserError(f"the weights lack {n}, which the model in config.json needs: the checkpoint is incomplete")


class Checkpoint:
    """A validated local HF checkpoint folder with lazy tensor access.

    Opening one checks, in one place, everything later passes rely on: config.json counts are whole numbers in
    range and agree with each other, shard names are plain file names, every shard is a safetensors file, and
    every tensor's shape agrees with config.json (see ``check_shapes``). A broken or hostile folder fails here
    with one UserError, before any work."""

    def __init__(self, path: str | Path | None):
        self.path = resolve_model(path)
        raw = read_json_file(self.path / "config.json", "config.json (JSON)")
        if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
            raise UserError(f"{self.path / 'config.json'} has no model_type: not a transformers model config")
        try:  # the weights' headers first: they bound what config.json may claim before transformers reads it
            self._read_weights()
            weights_error = None
        except UserError as err:
            weights_error = err
        layers_on_disk = {int(m[1]) for k in getattr(self, "weight_map", {}) if (m := _DISK_LAYER_KEY.match(k))}
        L = raw.get("num_hidden_layers")
        limit = len(layers_on_disk) if weights_error is None else MAX_LAYERS
        if type(L) is int and L > limit:  # transformers builds per-layer lists: 10**9 layers would hang it
            if weights_error is not None:
                raise UserError(f"config.json num_hidden_layers is {L}: no model has more than {MAX_LAYERS:,}")
            raise UserError(
                f"config.json num_hidden_layers is {L}, but the weights hold {limit} decoder layers: "
                "the config does not belong to these weights"
            )
        self.config = self._load_config(raw["model_type"])
        self.family: Family = family_for(self.config)
        self.manifest: Manifest | None = load_manifest(self.path)
        if weights_error is not None:
            raise weights_error
        # a multimodal wrapper: the view is its language model (text_config; keys named as a causal LM's), every other
        # tensor keeps its name; wrapper_config is the whole config.json, written back with only text keys changed
        self.wrapper_config: PretrainedConfig | None = None
        self._disk: dict[str, str] = {}  # view name -> checkpoint name (only the renamed ones)
        # a view tensor transformers concatenates from disk tensors on load: view name -> (dim, disk names)
        self._pieces: dict[str, tuple[int, tuple[str, ...]]] = {}
        self._piece_info: dict[str, tuple[str, dict[str, Any]]] = {}  # disk name of a piece -> (its shard, header)
        if self.family.disk_body != "model":
            self._body_keys()
        if self.family.layer_parts and self.family.nest is None:
            self._nest_keys()  # (only the layer-held block's keys are renamed: model.layers.N.moe.<part>)
        if self.family.nest is not None:
            from .derive import nest_disk_body, nest_disk_head, view_rules

            # (the text model's path in the checkpoint: where the module keeps it, DeepSeek-OCR-2's model.*, or ""
            # for the checkpoint's root: Mistral-Large-4's layers.*, norm.*, output.*)
            disk_body = nest_disk_body(self.config)
            self._nest = (
                self.family.nest[0] if disk_body is None else disk_body,
                nest_disk_head(self.config) or self.family.nest[1],
            )
            # tensors outside the layers the checkpoint names otherwise (Mistral-Large-4's tok_embeddings is the
            # view's model.embed_tokens, lerope.alpha its model.rotary_emb.alpha): disk name -> view name
            self._renamed = {parts[0][0]: view for _, view, parts in view_rules(self.config)}
            self.wrapper_config, self.config = self.config, self.config.get_text_config()
            self._nest_keys()
            layers_on_disk = {int(m[1]) for k in self.weight_map if (m := _LAYER_KEY.match(k))}
        elif self.family.derived:
            self._convert_keys()
        self.family.check_config(self.config, max(layers_on_disk, default=-1) + 1)
        if self.family.save_transposed and not self.family.scaled_input:  # (Llama-4's loader never transposes)
            self.family = replace(self.family, save_transposed=self._saved_transposed())
        missing = sorted(set(range(self.config.num_hidden_layers)) - layers_on_disk)
        if missing:
            raise UserError(f"the weights have no tensors for decoder layer {missing[0]}: the checkpoint is incomplete")
        self.nonfinite: dict[str, tuple[int, int]] = {}  # tensor -> (NaN count, Inf count), filled as tensors are read
        self._finite: set[str] = set()  # tensors read and found finite (a later read skips the check)
        check_shapes(self)

    def _body_keys(self) -> None:
        """Name a checkpoint whose body sits under another root (Nemotron-H: backbone.*) as the view does (model.*);
        ``view_key`` / ``disk_key`` map the root both ways, so outputs keep the checkpoint's names."""
        body = self.family.disk_body
        clash = sorted(k for k in self.weight_map if k.startswith("model."))
        if clash:
            raise UserError(f"{clash[0]} sits beside the {body}.* tensors this model type keeps its body under")
        self.weight_map = {self.view_key(k): f for k, f in self.weight_map.items()}
        self._info = {self.view_key(k): v for k, v in self._info.items()}

    def _nest_keys(self) -> None:
        """Rename a wrapper's language-model keys to the view's (model.language_model.X -> model.X, its lm_head ->
        lm_head.weight); a key of the view that would collide with another checkpoint key is refused."""
        body = self._nest[0] if self.family.nest else "the"
        view: dict[str, str] = {}
        for k in self.weight_map:
            v = self.view_key(k)
            if v != k:
                view[k] = v
        clash = sorted(set(view.values()) & (set(self.weight_map) - set(view)))
        if clash:
            raise UserError(f"{clash[0]} is both a language-model tensor and another tensor of this {body} checkpoint")
        self._disk = {v: k for k, v in view.items()}
        self.weight_map = {view.get(k, k): f for k, f in self.weight_map.items()}
        self._info = {view.get(k, k): v for k, v in self._info.items()}

    def _convert_keys(self) -> None:
        """Name the tensors transformers converts on load beyond per-layer renames as its modules do (``derive``'s
        view rules): a renamed tensor outside the layers (Bailing-hybrid's model.word_embeddings is the view's
        model.embed_tokens), and a module tensor made of several disk tensors (Kimi-Linear's self_attn.conv1d.weight =
        cat(q_conv1d, k_conv1d, v_conv1d)), read concatenated and written back as the disk tensors
        (``disk_items``), bit for bit. Every consumer (the layer stream, the loaders, the shape check) sees the
        module names; outputs keep the checkpoint's."""
        from .derive import view_rules

        rules = view_rules(self.config)
        if not rules:
            return
        prefixes = sorted({m[0] for k in self.weight_map if (m := _LAYER_KEY.match(k))})
        names: dict[str, str] = {}  # disk name -> view name (the first piece of a concatenation)
        whole: dict[str, dict[str, Any]] = {}  # a concatenation's header entry (dtype, shape)
        for scope, module, parts in rules:
            for p in prefixes if scope else [""]:
                disk = [p + d for d, _ in parts]
                have = [k in self.weight_map for k in disk]
                if not any(have):
                    continue  # a layer of another type (Kimi-Linear's full-attention layers have no conv)
                view = p + module
                if not all(have):
                    raise UserError(
                        f"the weights hold {disk[have.index(True)]} but not {disk[have.index(False)]}, which "
                        f"transformers concatenates into {view}: the checkpoint is incomplete"
                    )
                if view in self.weight_map or view in names.values():
                    raise UserError(f"{view} is both a tensor of this checkpoint and made of {disk[0]}")
                names[disk[0]] = view
                dim = parts[0][1]
                if dim < 0:
                    self._disk[view] = disk[0]
                    continue
                infos = [self._info[k] for k in disk]
                shapes = [list(i["shape"]) for i in infos]
                rest = {tuple(sh[:dim] + sh[dim + 1 :]) for sh in shapes if len(sh) > dim}
                if len(rest) != 1 or len({i["dtype"] for i in infos}) != 1 or any(len(sh) <= dim for sh in shapes):
                    raise UserError(
                        f"{', '.join(disk)} have shapes {shapes}: transformers concatenates them into {view} along "
                        f"dimension {dim}, which these shapes do not allow: config.json does not match the weights"
                    )
                self._pieces[view] = (dim, tuple(disk))
                self._piece_info.update({k: (self.weight_map[k], i) for k, i in zip(disk, infos, strict=True)})
                shape = list(shapes[0])
                shape[dim] = sum(sh[dim] for sh in shapes)
                whole[view] = {"dtype": infos[0]["dtype"], "shape": shape}
        gone = {k for _, disk in self._pieces.values() for k in disk[1:]}
        self.weight_map = {names.get(k, k): f for k, f in self.weight_map.items() if k not in gone}
        self._info = {names.get(k, k): v for k, v in self._info.items() if k not in gone} | whole

    def disk_items(self, key: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The checkpoint tensors a view tensor is written as: itself under its checkpoint name, or the disk tensors
        transformers concatenates into it, split back at their sizes (bit for bit what was read)."""
        if key not in self._pieces:
            base = key.rpartition(".")[0]
            made = next((v for v in self._pieces if v.rpartition(".")[0] == base), None)
            if made is not None:
                raise UserError(
                    f"{key} would be written for {made}, which transformers concatenates from "
                    f"{', '.join(self._pieces[made][1])} on load: an operation that rewrites it (quantizing it) "
                    "is not supported for this model type"
                )
            return [(self.disk_key(key), t)]
        dim, disk = self._pieces[key]
        sizes = [self._piece_info[k][1]["shape"][dim] for k in disk]
        if t.dim() <= dim or t.shape[dim] != sum(sizes):
            raise UserError(
                f"{key} has shape {list(t.shape)}: transformers splits it into {', '.join(disk)} "
                f"of sizes {sizes} along dimension {dim} on save, so an operation may not change it"
            )
        return [(k, c.contiguous()) for k, c in zip(disk, t.split(sizes, dim), strict=True)]

    def disk_writer(self, transforms: Any = ()) -> Any:
        """``disk_items`` for an output written by ``transforms``. A quantized output (a transform writing a
        compressed-tensors quantization_config) keeps a concatenated view tensor whole, under its module name:
        transformers 5.23 loads compressed-tensors checkpoints by wrapping every converter of ``.weight`` tensors with
        its experts dequantizer, which fails on Kimi-Linear's q/k/v_conv1d pieces ("Concatenate ... Ckpt contains:
        0"), while the module's own name loads as it is (tests/core/test_disk_layouts.py)."""
        if not any(callable(getattr(tr, "qconfig", None)) for tr in transforms):
            return self.disk_items
        return lambda key, t: [(key, t)] if key in self._pieces else self.disk_items(key, t)

    def _saved_transposed(self) -> bool:
        """A family whose loader transposes fused experts when their shape asks for it (Qwen3-VL-MoE: [E, H, 2I] as
        published, [E, 2I, H] as transformers saves it): which of the two this checkpoint holds (outputs keep it)."""
        key = self.family.fused_key(self.moe_layers[0], "gate_up_proj")
        shape = self._info.get(key, {}).get("shape")
        return bool(shape) and len(shape) == 3 and shape[2] != self.config.hidden_size

    def view_key(self, key: str) -> str:
        """The view's name of a checkpoint key (itself outside a multimodal wrapper's language model and the tensors
        ``_convert_keys`` renames; a piece of a concatenation keeps its name)."""
        body = self.family.disk_body
        if body != "model" and key.startswith(f"{body}."):  # (Nemotron-H: backbone.* -> model.*)
            key = f"model.{key[len(body) + 1 :]}"
        if self.family.nest is None:
            found = next((v for v, d in self._disk.items() if d == key), None)
            return found if found is not None else self._block_view_key(key)
        body, head = self._nest
        if key in self._renamed:
            return self._renamed[key]
        if body and key.startswith(body + "."):
            return self._block_view_key("model." + key[len(body) + 1 :])
        if not body and key.startswith(("layers.", f"{self.family.final_norm}.")):  # the text model at the root
            return self._block_view_key("model." + key)
        if key.startswith(head + "."):
            return "lm_head." + key[len(head) + 1 :]
        return key

    def _block_view_key(self, key: str) -> str:
        """Gemma-4: the router and experts its decoder layer holds (``layers.N.router.*``) are the view's block
        (``layers.N.moe.router.*``, ``interface.DecoderLayerMoe``)."""
        parts = self.family.layer_parts
        if parts and (m := _LAYER_KEY.match(key)) and key[m.end() :].split(".", 1)[0] in parts:
            return f"{m[0]}{self.family.module_block}.{key[m.end() :]}"
        return key

    def disk_key(self, key: str) -> str:
        """The checkpoint name of a view key, also for new keys an operation writes (model.layers.3...weight_packed
        -> model.language_model.layers.3...weight_packed): what outputs are written under."""
        if key in self._disk:
            return self._disk[key]
        if self.family.layer_parts and (m := _LAYER_KEY.match(key)):  # layers.N.moe.<part> -> layers.N.<part>
            rest = key[m.end() :]
            if rest.startswith(self.family.module_block + ".") and rest.split(".", 2)[1] in self.family.layer_parts:
                key = m[0] + rest[len(self.family.module_block) + 1 :]
        if self.family.nest is None:
            body = self.family.disk_body
            return f"{body}.{key[len('model.') :]}" if body != "model" and key.startswith("model.") else key
        body, head = self._nest
        if key.startswith("model.layers."):
            return f"{body}.{key[len('model.') :]}" if body else key[len("model.") :]
        if key.startswith("lm_head."):
            return f"{head}.{key[len('lm_head.') :]}"
        return key

    def check_layout(self, layout: str) -> None:
        """Refuse in one line an output layout this checkpoint cannot be written in: a multimodal wrapper is written
        in the uniform layout only (commands whose layout is known before the pass call this up front), and so is a
        model whose router scales the experts' inputs (Llama-4: the non-uniform loaders fill transformers' own experts
        modules, which hold Llama-4's fused experts transposed, [E, H, 2I])."""
        if self.family.scaled_input and layout not in ("uniform", "quantized"):  # quantized: refused by expert_key
            raise UserError(
                f"{self.config.model_type} (Llama-4) is written in the uniform layout only: the {layout} layout's "
                "loader would fill transformers' Llama4TextExperts, which holds its experts transposed; use the "
                "uniform layout (--layout uniform)"
            )
        if self.wrapper_config is not None and layout not in ("uniform", "quantized"):  # (quant.load.load_wrapper)
            raise UserError(
                f"{self.wrapper_config.model_type} nests its MoE language model in a multimodal model: moecompress "
                f"writes it in the uniform or quantized layout only (the {layout} layout would not load with "
                "moecompress.load yet); use expert pruning or merging with the uniform layout, or channel pruning "
                "with --layout uniform"
            )
        if self.wrapper_config is not None and layout == "quantized" and self._experts_outside_text():
            raise UserError(
                f"{self.wrapper_config.model_type} holds experts outside its language model ({self._nest[0]}; "
                "Qwen3-Omni's talker): transformers does not load those experts unquantized from a quantized "
                "checkpoint (they would be missing), and moecompress quantizes only the language model's; quantize "
                "a checkpoint without them (Qwen3-Omni "
                "with enable_audio_output false, the Thinking release), or prune / merge (uniform layout)"
            )

    def output_config(self, config: dict[str, Any], layout: str = "uniform") -> dict[str, Any]:
        """config.json of an output from the config dict an operation changed: for a multimodal wrapper, its
        config.json with only text_config entries changed (quantization_config stays at the top, where transformers
        reads it). ``config`` is the text config's dict (whole or a diff), or config.json's own dict with text keys
        (expert counts) set at its top."""
        self.check_layout(layout)
        if self.wrapper_config is None:
            renamed = self.family.renames or self.family.disk_block != self.family.module_block
            if renamed and isinstance(config.get("quantization_config"), dict):
                config = dict(config, quantization_config=self._module_targets(config["quantization_config"]))
            return config
        raw = read_json_file(self.path / "config.json", "config.json (JSON)")
        path = self._text_config_path()
        outer = raw  # (Qwen3-Omni's text config is two deep: thinker_config.text_config)
        for k in path[:-1]:
            outer = outer.get(k) if isinstance(outer, dict) else None
        attr = path[-1]
        if not isinstance(outer, dict) or not isinstance(outer.get(attr), dict):
            where = ".".join(path)
            raise UserError(f"config.json has no {where} object, which its model type keeps its language model in")
        if len(path) > 1:  # the level holding the text config (thinker_config) is written as config.json would be
            if config.get("model_type") == raw.get("model_type"):  # config.json's dict: its level, top text keys
                level = copy.deepcopy(config)
                for k in path[:-1]:
                    level = level[k]
                text_keys = set(self.config.to_dict()) | {"quantization_config"}  # (quantization_config: at the top)
                config = dict(level) | {k: v for k, v in config.items() if k not in raw and k in text_keys}
            full = self._output_config_in(outer, attr, config, outer.get("model_type"))
            top = copy.deepcopy(raw)
            inner = top
            for k in path[:-1]:
                inner[k] = dict(inner[k])
                inner = inner[k]
            inner[attr] = full[attr]
            if "quantization_config" in full:
                top["quantization_config"] = full["quantization_config"]
            return top
        return self._output_config_in(raw, attr, config, raw.get("model_type"))

    def _text_config_path(self) -> tuple[str, ...]:
        """The attribute path from the wrapper's config to its text config (("text_config",); Qwen3-Omni's
        ("thinker_config", "text_config"))."""
        for k, v in vars(self.wrapper_config).items():
            if v is self.config:
                return (k,)
        for k, v in vars(self.wrapper_config).items():
            for kk, vv in vars(v).items() if hasattr(v, "to_dict") else ():
                if vv is self.config:
                    return (k, kk)
        raise UserError(
            f"{self.wrapper_config.model_type}'s config does not hold its text config where moecompress looks"
        )

    def _output_config_in(
        self, raw: dict[str, Any], attr: str, config: dict[str, Any], top_type: Any
    ) -> dict[str, Any]:
        """``output_config`` for the dict ``raw`` holding the text config at ``attr`` (config.json, or the level of it
        that holds the text config)."""
        text_keys = set(self.config.to_dict())
        if config.get("model_type") == top_type:  # config.json's dict: move text keys set at its top
            full = copy.deepcopy(config)
            text = dict(full[attr])
            for k in [k for k in full if k not in raw and k in text_keys and k != "quantization_config"]:
                text[k] = full.pop(k)
            full[attr] = text
            if isinstance(full.get("quantization_config"), dict):  # (compress: a quantize stage's, view names)
                full["quantization_config"] = self._disk_names(full["quantization_config"])
                if self.family.renames:
                    full["quantization_config"] = self._module_targets(full["quantization_config"])
            return full
        full, before = copy.deepcopy(raw), self.config.to_dict()
        text = dict(full[attr])
        for k, v in config.items():
            if k == "quantization_config":
                full[k] = self._disk_names(v)
                if self.family.renames and isinstance(v, dict):  # (Mistral-Large-4's attention.wq: self_attn.q_proj)
                    full[k] = self._module_targets(full[k])
            elif k not in before or before[k] != v:
                text[k] = v
        full[attr] = text
        return full

    def _module_targets(self, obj: Any) -> Any:
        """A quantization_config whose targets name modules transformers renames on load (HY-V3's disk
        mlp.shared_mlp.* is the module mlp.shared_experts.*; Kimi-Linear's block_sparse_moe.shared_experts.* is
        mlp.shared_experts.*) with the module's name added to each: compressed-tensors matches targets against the
        loaded model's module names, moecompress.load against the checkpoint's keys."""
        if isinstance(obj, dict):
            return {k: self._module_targets(v) if k != "ignore" else v for k, v in obj.items()}
        if not isinstance(obj, list):
            return obj
        out = list(obj)
        parts = self.family.layer_parts
        for t in obj:
            if not isinstance(t, str):
                continue
            new = t
            pairs = [
                (d[:-7], m[:-7]) for d, m in self.family.renames if d.endswith(".weight") and m.endswith(".weight")
            ]
            if self.family.disk_block != self.family.module_block:  # (Mixtral: no block-named target is written)
                pairs.append((f"{self.family.disk_block}.", f"{self.family.module_block}."))
            mb = f"{self.family.module_block}."  # the block's parts saved in the layer (Mistral-Large-4)
            pairs += [(d[len(mb) :], m) for d, m in pairs if d.startswith(mb) and d[len(mb) :].split(".")[0] in parts]
            for d, m in pairs:
                new = new.replace(re.escape(f".{d}"), re.escape(f".{m}")) if t.startswith("re:") else new
                new = new.replace(f".{d}", f".{m}") if not t.startswith("re:") else new
            if new != t and new not in out:
                out.append(new)
        return out

    def _disk_names(self, obj: Any, body: str | None = None) -> Any:
        """``obj`` (a quantization_config) with the view's module names (model.layers.3.self_attn.q_proj, as plain
        names or escaped in regexes) renamed to the checkpoint's (model.language_model.layers.3...); where the
        checkpoint keeps the text model elsewhere than the module (DeepSeek-OCR-2: model.layers.* on disk), a list
        names both (compressed-tensors matches module names, moecompress.load the checkpoint's keys)."""
        if isinstance(obj, dict):
            return {k: self._disk_names(v, body) for k, v in obj.items()}
        if isinstance(obj, list):
            out = [self._disk_names(v, body) for v in obj]
            if body is None and self.family.nest is not None and self.family.nest[0] != self._nest[0]:
                out += [n for v in obj if (n := self._disk_names(v, self.family.nest[0])) not in out]
            return out
        if not isinstance(obj, str) or self.family.nest is None:
            return obj
        body = self._nest[0] if body is None else body
        disk = f"{body}.layers." if body else "layers."  # ("": the text model at the checkpoint's root)
        obj = obj.replace(re.escape("model.layers."), re.escape(disk))
        for part in self.family.layer_parts:  # the block's modules saved in the layer (layers.N.<part>)
            nested = f".{self.family.module_block}.{part}."
            obj = obj.replace(re.escape(nested), re.escape(f".{part}.")).replace(nested, f".{part}.")
        return disk + obj[len("model.layers.") :] if obj.startswith("model.layers.") else obj

    def _experts_outside_text(self) -> bool:
        """The wrapper's checkpoint holds experts of another model of its own outside its text model (Qwen3-Omni's
        talker.*, built from its talker_config: an MoE that no operation touches): a quantized output of it does not
        load in transformers. (Qwen3.5-MoE's mtp.* experts are not one: transformers drops them on load.)"""
        body = f"{self._nest[0]}." if self._nest[0] else ""  # ("": the text model at the root, Mistral-Large-4)
        outside = {k.split(".", 1)[0] for k in self.weight_map if ".experts." in k and not k.startswith(body)}
        return any(getattr(self.wrapper_config, f"{m}_config", None) is not None for m in outside)

    def _read_weights(self) -> None:
        self.weight_map = self._load_weight_map()
        self._headers: dict[str, bytes] = {}
        self._info: dict[str, dict[str, Any]] = {}
        for f in sorted(set(self.weight_map.values())):
            header, tensors = _read_header(self.path / f)
            self._headers[f] = header
            self._info.update({k: v for k, v in tensors.items() if self.weight_map.get(k) == f})
        for k, f in self.weight_map.items():
            if k not in self._info:
                raise UserError(f"the index maps tensor {k} to {f}, which does not hold it: the index is corrupt")

    # ---- validation -----------------------------------------------------------------------------
    def _load_config(self, model_type: str) -> PretrainedConfig:
        try:
            return AutoConfig.from_pretrained(self.path, trust_remote_code=False)
        except Exception as err:  # transformers/huggingface_hub raise many types for a config they cannot read
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
            raise UserError(
                f"transformers cannot read config.json (model_type {model_type!r}): {' '.join(lines)[:300]}"
            ) from None

    def _load_weight_map(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            raw = read_json_file(index, "safetensors index (JSON)", MAX_HEADER_BYTES)
            wm = raw.get("weight_map") if isinstance(raw, dict) else None
            if not isinstance(wm, dict) or not wm:
                raise UserError(f"{index} has no weight_map object: it is not a valid safetensors index")
            for fname in wm.values():
                _plain_name(fname, index.name)
            for fname in set(wm.values()):
                if not (self.path / fname).exists():
                    raise UserError(f"{index.name} names shard {fname} which is missing from {self.path}")
            return dict(wm)
        single = self.path / "model.safetensors"
        if single.exists():
            return {k: "model.safetensors" for k in _read_header(single)[1]}
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

    @property
    def layout(self) -> str:
        """moecompress.json ``layout`` ("uniform" for a folder moecompress did not write)."""
        return self.manifest.layout if self.manifest is not None else "uniform"

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
        """key -> {dtype, shape} from the (validated) headers, without reading data."""
        return {k: {"dtype": v["dtype"], "shape": list(v["shape"])} for k, v in self._info.items()}

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
        by_file: dict[str, list[tuple[str, str]]] = {}  # shard -> [(view name, checkpoint name)]
        for key in keys:
            if key in self._pieces:  # made of several disk tensors (``_convert_keys``), maybe in several shards
                for dk in self._pieces[key][1]:
                    by_file.setdefault(self._piece_info[dk][0], []).append((key, dk))
                continue
            fname = self.weight_map.get(key)
            if fname is None:
                raise UserError(f"tensor {key} is missing from {self.path}")
            dk = self.disk_key(key) if self.family.disk_body != "model" else self._disk.get(key, key)
            by_file.setdefault(fname, []).append((key, dk))
        out: dict[str, torch.Tensor] = {}
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for fname, ks in by_file.items():
            try:
                handle = safe_open(str(self.path / fname), framework="pt")
            except Exception as err:  # safetensors raises its own error types
                raise UserError(f"{fname} cannot be opened as safetensors ({err})") from None
            with handle as f:
                for key, dk in ks:
                    try:
                        t = f.get_tensor(dk)
                    except Exception as err:
                        msg = f"tensor {key} in {fname} cannot be read ({err}): the file is corrupt"
                        raise UserError(msg) from None
                    if key in self._pieces:
                        out.setdefault(key, t)  # (its place in the order; the concatenation replaces it below)
                        parts.setdefault(key, {})[dk] = t
                        continue
                    out[key] = t
                    self._check_finite(key, out[key])
        for key, got in parts.items():
            dim, disk = self._pieces[key]
            out[key] = torch.cat([got[k] for k in disk], dim)
            self._check_finite(key, out[key])
        return out

    def _check_finite(self, key: str, t: torch.Tensor) -> None:
        """Record and warn (once per tensor, on stderr) about NaN/Inf weights as they are read. Each tensor is checked
        once per Checkpoint: a command that reads the model again (prune's pass after its profile pass) skips the
        tensors already found finite (the files do not change under a run; the check was 0.27 CPU s of the E128
        synthetic's prune pass)."""
        if not t.is_floating_point() or key in self.nonfinite or key in self._finite:
            return
        nan = inf = 0
        for chunk in t.reshape(-1).split(1 << 24):  # bounded temporaries even for a multi-GB embedding
            if not bool(torch.isfinite(chunk).all()):
                nan += int(torch.isnan(chunk).sum())
                inf += int(torch.isinf(chunk).sum())
        if not nan and not inf:
            self._finite.add(key)
            return
        self.nonfinite[key] = (nan, inf)
        from .progress import console

        console.print(
            f"[yellow]warning:[/] tensor {key} holds {nan} NaN and {inf} Inf values: statistics that depend on it "
            "are not finite (written as null in JSON)",
            highlight=False,
            soft_wrap=True,
        )

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

    def side_files(self) -> list[Path]:
        return [self.path / f for f in SIDE_FILES if (self.path / f).exists()]

    def __repr__(self) -> str:
        return f"Checkpoint({self.path}, family={self.family.name}, experts={self.num_experts}, top_k={self.top_k})"
