"""Reading a GGUF file (or a split one, ``NAME-00001-of-0000N.gguf``) as a checkpoint of Hugging Face names.

Responsibility: the same reading interface as :class:`~.checkpoint.CheckpointReader` (``names``, ``in``,
``entry``, ``load``, ``read_into``) over llama.cpp's tensors, so the loader builds blocks from a GGUF as
from safetensors: names mapped by :mod:`.gguf_names` (DeepSeek-V3/K2's and GPT-OSS's by :mod:`.gguf_arch`,
with their split tensors joined back), llama.cpp's permuted Q/K rows put back in Hugging Face's order,
stacked experts' gate and up concatenated, Q4_0, Q4_1 and Q4_K matrices offered in their 4-bit form
(:mod:`.gguf_q4_0`, :mod:`.gguf_q4`), and every other type than F32/F16 dequantized (``gguf.quants``) to the dtype asked
for, a bounded number of rows at a time, straight into the tensor's own storage. The metadata (``metadata``) and the ``config.json`` it stands for (:meth:`config_dict`)
come from the first file.

Invariants: the files are memory-mapped by the ``gguf`` package and only the tensors asked for are
read; nothing returned is a view of a map (each tensor is copied into its own memory as converted), and
a tensor's pages are dropped from the process's resident memory once it is read. A
split with a file missing, or a tensor of a type that cannot be dequantized, is an error naming it.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import gguf_arch
from .checkpoint import MissingTensorsError
from .gguf_names import (
    ARCHITECTURES,
    FULL_LAYER,
    OWN_TABLES,
    PERMUTED_QK,
    config_dict,
    gguf_names,
    hf_names,
    llama3_rope_scaling,
)
from .gguf_q4 import q4_as_packed, q4_plan, quantization_config
from .gguf_q4_0 import PER_EXPERT, STACK_OF, packed_base
from .tensor_file import TensorEntry

logger = logging.getLogger(__name__)

_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")
_CHUNK_BYTES = 16 << 20  # float32 rows dequantized at a time
FLOAT_TYPES = ("F32", "F16", "BF16")


def gguf_paths(path: str | os.PathLike[str]) -> list[Path]:
    """The files of the GGUF ``path``: itself, or for the first (any) file of a split, every part in order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    match = _SPLIT.match(path.name)
    if match is None:
        return [path]
    count = int(match["count"])
    paths = [path.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"split GGUF {path.name} lacks its part(s) {', '.join(missing)} in {path.parent}")
    return paths


def model_stem(path: str | os.PathLike[str]) -> str:
    """A GGUF's model name: the file's stem, without a split's ``-00001-of-0000N``."""
    name = Path(path).name
    match = _SPLIT.match(name)
    return match["stem"] if match else name.removesuffix(".gguf")


def _open(path: Path) -> Any:
    import gguf  # numpy-only, but only a GGUF needs it

    try:
        return gguf.GGUFReader(path, "r")
    except (ValueError, OSError, IndexError) as e:
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from None


class GGUFCheckpoint:
    """Hugging Face names and selective loading of the tensors of one GGUF model (one file, or a split)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import gguf

        self.paths = gguf_paths(path)
        self.model_dir = self.paths[0]
        readers = [_open(p) for p in self.paths]
        self.metadata: dict[str, Any] = {
            name: field.contents() for name, field in readers[0].fields.items() if not name.startswith("GGUF.")
        }
        self._tensors = {t.name: t for reader in readers for t in reader.tensors}
        self._maps = {t.name: reader.data for reader in readers for t in reader.tensors}
        self.arch = self.metadata.get("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"{self.model_dir}: unsupported GGUF architecture {self.arch!r}; supported: "
                             f"{', '.join(ARCHITECTURES)}")
        self._dequant = gguf.quants.dequantize
        self._logged: set[str] = set()
        self.num_layers = int(self.metadata.get(f"{self.arch}.block_count", 0))
        # the 4-bit types the blocks hold as they are (Q4_0, Q4_1, Q4_K), the block matrices read as floats
        self.q4_held, self._float_linears = q4_plan({n: t.tensor_type.name for n, t in self._tensors.items()},
                                                    self.arch)

    # --- what the file is -------------------------------------------------------------------------------

    def config_dict(self) -> dict[str, Any]:
        """The ``config.json`` this GGUF stands for."""
        if "token_embd.weight" not in self._tensors:
            raise ValueError(f"{self.model_dir} has no token_embd.weight tensor")
        vocab = int(self._tensors["token_embd.weight"].shape[1])
        try:
            d = config_dict(self.metadata, set(self._tensors), vocab)
            if "rope_freqs.weight" in self._tensors:  # llama3's RoPE scaling, stored as per-frequency divisors
                factors = self._float(self._tensors["rope_freqs.weight"]).reshape(-1).tolist()
                scaling = llama3_rope_scaling(factors, d["head_dim"], d["rope_theta"])
                if scaling is None:
                    raise ValueError("its rope_freqs tensor matches none of Llama 3's RoPE scalings")
                d["rope_scaling"] = scaling
            if self.q4_held:  # matrices of other types (llama.cpp promotes some) are read as floats
                d["quantization_config"] = quantization_config(self.q4_held, self._float_linears)
        except ValueError as e:
            raise ValueError(f"{self.model_dir}: {e}") from None
        return d

    def file_type(self) -> str:
        """llama.cpp's name for what the blocks' weights are stored as, lower case (``q4_k_m``, ``f16``):
        ``general.file_type``, else the most common type of the blocks' matrices."""
        import gguf

        value = self.metadata.get("general.file_type")
        try:
            name = gguf.LlamaFileType(value).name if value is not None else None
        except ValueError:
            name = None
        if name is not None and name not in ("GUESSED",):
            return name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()
        types = [t.tensor_type.name for n, t in self._tensors.items() if n.startswith("blk.") and len(t.shape) >= 2]
        return max(set(types), key=types.count).lower() if types else "f32"

    def block_types(self, start: int, end: int) -> set[str]:
        """The GGML types of the tensors of blocks ``[start, end)`` (``F32``, ``Q4_0`` ...)."""
        prefixes = tuple(f"blk.{i}." for i in range(start, end))
        return {t.tensor_type.name for n, t in self._tensors.items() if n.startswith(prefixes)}

    # --- the reader interface of CheckpointReader ---------------------------------------------------------

    def names(self) -> list[str]:
        """Every Hugging Face tensor name the file holds, sorted."""
        if self.arch in OWN_TABLES:
            heads = [n for n in hf_names(set(self._tensors), 0) if n in self]
            return sorted(heads + [f"model.layers.{i}.{key}" for i in range(self.num_layers)
                                   for key in gguf_arch.block_keys(self.arch)
                                   if gguf_arch.sources(self.arch, i, key, self._tensors) is not None])
        prefix = "block_sparse_moe." if self.config_dict()["model_type"] == "mixtral" else "mlp."
        return sorted(hf_names(set(self._tensors), self.num_layers, moe_prefix=prefix))

    def _source(self, name: str) -> tuple[list[Any], int | None, str] | None:
        """The GGUF tensor(s) holding ``name``, for one expert's 4-bit matrix which expert of the stack, and
        how the parts make the tensor (:func:`.gguf_arch.shape`)."""
        base, packed = packed_base(name)
        expert = PER_EXPERT.match(base) if packed else None
        if expert is not None:
            layer, index, part = expert.groups()
            stack = self._tensors.get(f"blk.{layer}.{STACK_OF[part]}.weight")
            return ([stack], int(index), "plain") if stack is not None and int(index) < int(stack.shape[2]) else None
        layer_name = FULL_LAYER.match(base)
        if self.arch in OWN_TABLES and layer_name is not None:
            found = gguf_arch.sources(self.arch, int(layer_name.group(1)), layer_name.group(2), self._tensors)
            return None if found is None else ([self._tensors[p] for p in found[1]], None, found[0])
        parts = gguf_names(base)
        if parts is None or not all(p in self._tensors for p in parts):
            return None
        return [self._tensors[p] for p in parts], None, "plain" if len(parts) == 1 else "rows"

    def __contains__(self, name: object) -> bool:
        source = self._source(name) if isinstance(name, str) else None
        if source is None:
            return False
        # 4-bit names exist for the 4-bit matrices of a file whose blocks hold them so (zeros: not Q4_0 alone)
        packed = packed_base(name)[1]  # type: ignore[arg-type]
        return not packed or (source[0][0].tensor_type.name in self.q4_held
                              and (packed != "weight_zero" or self.q4_held != {"Q4_0"}))

    def missing_files(self, names: Iterable[str] | None = None) -> list[str]:
        """Files holding ``names`` that are absent: none (every part of a split is checked at open)."""
        return []

    def parts(self, name: str) -> list[Any]:
        """The GGUF tensors holding ``name`` (gguf's reader's; their ``data`` a view of the map)."""
        if name not in self:
            raise MissingTensorsError(self.model_dir, [name])
        return self._source(name)[0]  # type: ignore[index]

    def entry(self, name: str) -> TensorEntry:
        """Tensor ``name``'s dtype as read (float32 for a quantized one) and shape, in torch's order."""
        parts = self.parts(name)
        packed = packed_base(name)[1]
        if packed:  # a 4-bit matrix [N, K] as int4 words, scales (and zeros) per group of 32
            rows, cols = int(parts[0].shape[1]), int(parts[0].shape[0])
            scale = torch.float16 if self.q4_held == {"Q4_0"} else torch.float32  # Q4_0's alone: its own
            dtype, shape = {"weight_packed": (torch.int32, (rows, cols // 8)),
                            "weight_scale": (scale, (rows, cols // 32)),
                            "weight_zero": (torch.float32, (rows, cols // 32)),
                            "weight_shape": (torch.int64, (2,))}[packed]
            return TensorEntry(dtype=dtype, shape=shape, begin=0, end=0)
        shapes = [tuple(int(d) for d in reversed(t.shape)) for t in parts]
        shape = gguf_arch.shape(self._source(name)[2], shapes)  # type: ignore[index]
        dtype = torch.float16 if parts[0].tensor_type.name == "F16" else torch.float32
        return TensorEntry(dtype=dtype, shape=shape, begin=0, end=0)

    def read_into(self, name: str, out: Tensor) -> Tensor:
        """Read tensor ``name`` into ``out`` (its final storage), converting to ``out``'s dtype."""
        parts = self.parts(name)
        if tuple(out.shape) != self.entry(name).shape:
            raise ValueError(f"{name}: shape {tuple(out.shape)} asked for, {self.entry(name).shape} in {self.model_dir}")
        packed = packed_base(name)[1]
        if packed == "weight_shape":
            out.copy_(torch.tensor([int(parts[0].shape[1]), int(parts[0].shape[0])]))
            return out
        expert = self._source(name)[1]  # type: ignore[index]
        if packed:
            self._q4_into(parts[0], packed, out, expert)
        else:  # one tensor, a fused gate/up stack, or an architecture's own layout (gguf_arch)
            gguf_arch.read(self._source(name)[2], parts, out, self.convert, lambda t: np.asarray(t.data))  # type: ignore[index]
        for t in parts:
            self._release(t, expert)
        if self.arch in PERMUTED_QK:
            self._unpermute(name, out)
        return out

    def load(self, names: Iterable[str], dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu") -> dict[str, Tensor]:
        """Read ``names`` in ``dtype`` (None: float32, or float16 for an F16 tensor) onto ``device``."""
        names = list(dict.fromkeys(names))
        missing = sorted(n for n in names if n not in self)
        if missing:
            raise MissingTensorsError(self.model_dir, missing)
        out = {}
        for name in names:
            entry = self.entry(name)
            keep = dtype is None or not entry.dtype.is_floating_point  # packed integers keep their dtype
            tensor = torch.empty(entry.shape, dtype=entry.dtype if keep else dtype)
            out[name] = self.read_into(name, tensor).to(device)
        return out

    # --- conversion -----------------------------------------------------------------------------------

    def _float(self, t: Any) -> np.ndarray:
        return self._dequant(np.asarray(t.data), t.tensor_type)

    def convert(self, t: Any, out: Tensor, data: np.ndarray | None = None) -> None:
        """GGUF tensor ``t`` (or ``data``, a part of it) into ``out`` (its shape in torch's order), a
        bounded number of rows at a time."""
        kind = t.tensor_type.name
        data = np.asarray(t.data) if data is None else data
        rows = data.reshape(-1, data.shape[-1])
        target = out.view(-1, out.shape[-1])
        if kind not in FLOAT_TYPES and kind not in self._logged:
            self._logged.add(kind)
            logger.info("%s: dequantizing %s tensors to %s at load", self.model_dir.name, kind,
                        str(out.dtype).removeprefix("torch."))
        step = max(1, _CHUNK_BYTES // (4 * target.shape[-1]))
        for begin in range(0, rows.shape[0], step):
            chunk = rows[begin : begin + step]
            if kind in ("F32", "F16"):
                values = torch.from_numpy(np.array(chunk))  # copied out of the map
            else:
                try:
                    values = torch.from_numpy(self._dequant(chunk, t.tensor_type))
                except NotImplementedError:
                    raise ValueError(f"{self.model_dir}: {t.name} is stored as {kind}, which cannot be "
                                     f"dequantized here") from None
            target[begin : begin + values.shape[0]].copy_(values.view(-1, target.shape[-1]))

    def _q4_into(self, t: Any, packed: str, out: Tensor, expert: int | None = None) -> None:
        data, kind = np.asarray(t.data), t.tensor_type.name
        q4_as_packed(kind, data[expert] if expert is not None else data, packed, out)
        if kind not in self._logged:
            self._logged.add(kind)
            logger.info("%s: %s matrices held as they are (4-bit, groups of 32)", self.model_dir.name, kind)

    def _release(self, t: Any, expert: int | None = None) -> None:
        """Drop the pages of ``t`` just read from this process's resident memory: a file's pages read
        through a map count for the process until unmapped (they stay in the page cache, uncharged)."""
        mapped = getattr(self._maps[t.name], "_mmap", None)
        if mapped is None or not hasattr(mapped, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        offset, size = t.data_offset, int(t.n_bytes)
        if expert is not None:  # that expert's part of the stack only
            size //= int(t.shape[2])
            offset += expert * size
        begin = offset - offset % mmap.PAGESIZE
        try:
            mapped.madvise(mmap.MADV_DONTNEED, begin, offset + size - begin)
        except (OSError, ValueError):  # only a cost, never an error
            pass

    def _unpermute(self, name: str, out: Tensor) -> None:
        """Undo llama.cpp's Q/K row permutation (``LlamaModel.permute``: each head's rotary halves
        interleaved) so rows are in Hugging Face's order again."""
        if ".self_attn.q_proj." in name:
            heads = int(self.metadata[f"{self.arch}.attention.head_count"])
        elif ".self_attn.k_proj." in name:
            heads = int(self.metadata.get(f"{self.arch}.attention.head_count_kv",
                                          self.metadata[f"{self.arch}.attention.head_count"]))
        else:
            return
        rest = out.shape[1:]
        half = out.shape[0] // heads // 2
        out.copy_(out.reshape(heads, half, 2, *rest).transpose(1, 2).reshape(out.shape))
