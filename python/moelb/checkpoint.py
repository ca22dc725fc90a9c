"""One DeepSeek MoE layer's weights from a Hugging Face safetensors checkpoint, by DeepSeek's tensor
names, as the weights dict of ``DeepSeekMoE`` (and, from ``config.json``, its
``DeepSeekMoEConfig``).

The safetensors format is read here, without torch: 8 bytes (little-endian u64) giving the header's
length N, N bytes of JSON mapping each tensor name to ``{"dtype", "shape", "data_offsets": [begin,
end]}`` (offsets relative to the byte buffer after the header; an optional ``"__metadata__"``
of strings), then the raw little-endian bytes. Only the tensors asked for are read (one file read
straight into the destination array each). BF16, F8_E4M3, I8, F32 and F16 map to NumPy through
``ml_dtypes`` (``ml_dtypes.bfloat16``, ``ml_dtypes.float8_e4m3fn``); other dtypes are refused when
read. A header is checked in full when the file is opened: offsets in range (a truncated file is
refused), sizes that match dtype x shape, no two tensors overlapping.

A checkpoint is a directory with ``model.safetensors.index.json`` (its ``weight_map`` names each
tensor's shard) and the shards, a directory with one ``model.safetensors``, or one
``.safetensors`` file; ``config.json`` is read from the directory (or the file's directory).

DeepSeek's names (V2, V3/R1 and their FP8 release; ``{p}`` = ``model.layers.{layer_id}.mlp``):

* ``{p}.gate.weight`` [E, H] and ``{p}.gate.e_score_correction_bias`` [E] (absent: None;
  ``load_moe_layer`` requires it exactly when config.json's topk_method is 'noaux_tc');
* ``{p}.experts.{e}.*`` for e in [0, E) only (E: the gate's rows; any other e is refused);
* ``{p}.experts.{e}.{gate,up,down}_proj.weight`` ([I, H], [I, H], [H, I]);
* ``{p}.shared_experts.{gate,up,down}_proj.weight`` ([Is, H], [Is, H], [H, Is]; absent: no shared
  expert);
* FP8: ``<projection>.weight_scale_inv``, the float32 grid [ceil(rows / 128), ceil(cols / 128)]
  (``w = q * scale_inv[r // 128, c // 128]``); int8: ``<projection>.weight_scale_inv`` or
  ``.weight_scale``, one float per output row ([rows] or [rows, 1]; ``w = q * scale[r]``).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt

from ._core import InvalidArgumentError
from .moe_layer import DeepSeekMoEConfig

__all__ = [
    "CONFIG_NAME",
    "INDEX_NAME",
    "SINGLE_FILE_NAME",
    "SafetensorsCheckpoint",
    "SafetensorsFile",
    "TensorInfo",
    "deepseek_config_fields",
    "load_moe_layer",
    "read_moe_layer_weights",
    "weight_format_of",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
#: The safetensors reference implementation refuses headers above 100 MB; so does this reader.
MAX_HEADER_BYTES = 100_000_000
DEFAULT_BLOCK_SIZE = (128, 128)

#: Bytes per element of every dtype the safetensors format names (for checking a header), and
#: the NumPy dtype of those this reader can return.
_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_NUMPY_DTYPE: dict[str, np.dtype] = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "I8": np.dtype(np.int8),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
}
#: The weight_format of a layer whose expert matrices are stored in this safetensors dtype (F16
#: widens exactly to float32, the format the layer computes it in).
_FORMAT_OF_DTYPE = {
    "F32": "float32",
    "F16": "float32",
    "BF16": "bfloat16",
    "F8_E4M3": "fp8_e4m3",
    "I8": "int8",
}
#: The NumPy dtype of each weight_format's stored matrices (as the weights dict holds them).
_STORED_DTYPE: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "fp8_e4m3": np.dtype(ml_dtypes.float8_e4m3fn),
    "int8": np.dtype(np.int8),
}
_FLOAT_DTYPES = ("F32", "BF16", "F16")  # converted exactly to float32 (gate, bias, scales)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: ``dtype`` (the format's name, e.g. ``"BF16"``),
    ``shape``, and its bytes ``[begin, end)`` as absolute offsets in ``path``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    path: Path

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's dict (``object_pairs_hook``); a key given twice, which ``json.load`` would
    resolve silently as the last one, is refused ("names 'key' twice")."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidArgumentError(f"names {key!r} twice")
        out[key] = value
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class SafetensorsFile:
    """The header of one ``.safetensors`` file (checked in full on opening); ``read`` reads one
    tensor's bytes into a NumPy array.

    path: the file. Raises InvalidArgumentError naming the file for a missing or truncated file,
    a header that is not the format's JSON, sizes that do not match dtype x shape, and offsets
    out of range or overlapping."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        src = str(self.path)
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            raise InvalidArgumentError(f"{src} does not exist") from None
        except IsADirectoryError:
            raise InvalidArgumentError(f"{src} is a directory, not a .safetensors file") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise InvalidArgumentError(
                    f"{src} is truncated: {size} bytes, shorter than the 8-byte header length"
                )
            header_len = int.from_bytes(f.read(8), "little")
            if header_len > MAX_HEADER_BYTES:
                raise InvalidArgumentError(
                    f"{src}: header length {header_len:,} bytes is above the format's limit "
                    f"{MAX_HEADER_BYTES:,} (not a safetensors file?)"
                )
            if 8 + header_len > size:
                raise InvalidArgumentError(
                    f"{src} is truncated: its header needs {header_len:,} bytes after the first 8 "
                    f"but the file has {size - 8:,}"
                )
            raw = f.read(header_len)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise InvalidArgumentError(f"{src}: the header is not valid JSON: {e}") from None
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"{src}: the header {e}") from None
        if not isinstance(header, dict):
            raise InvalidArgumentError(
                f"{src}: the header is a JSON {type(header).__name__}, not an object"
            )
        self.data_start = 8 + header_len
        self.data_size = size - self.data_start
        meta = header.pop("__metadata__", None)
        if meta is not None and not (
            isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
        ):
            raise InvalidArgumentError(f"{src}: __metadata__ must map strings to strings")
        self.metadata: dict[str, str] = dict(meta or {})
        self.tensors: dict[str, TensorInfo] = {
            name: self._entry(name, entry) for name, entry in header.items()
        }
        spans = sorted(self.tensors.values(), key=lambda t: (t.begin, t.end))
        for a, b in itertools.pairwise(spans):
            if b.begin < a.end:
                raise InvalidArgumentError(
                    f"{src}: tensors {a.name!r} (bytes {a.begin - self.data_start}-"
                    f"{a.end - self.data_start}) and {b.name!r} (bytes "
                    f"{b.begin - self.data_start}-{b.end - self.data_start}) overlap"
                )

    def _entry(self, name: str, entry: Any) -> TensorInfo:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise InvalidArgumentError(f"{where}: entry is not a JSON object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str):
            raise InvalidArgumentError(f"{where}: dtype={dtype!r} is not a string")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise InvalidArgumentError(f"{where}: shape={shape!r} is not a list of sizes")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise InvalidArgumentError(
                f"{where}: data_offsets={offsets!r} is not [begin, end] with 0 <= begin <= end"
            )
        begin, end = offsets
        if end > self.data_size:
            raise InvalidArgumentError(
                f"{self.path} is truncated or corrupt: tensor {name!r} ends at byte {end:,} of "
                f"the data but the file holds {self.data_size:,} data bytes"
            )
        itemsize = _ITEMSIZE.get(dtype)
        if itemsize is not None and end - begin != math.prod(shape) * itemsize:
            raise InvalidArgumentError(
                f"{where}: data_offsets={offsets!r} hold {end - begin:,} bytes but dtype {dtype} "
                f"x shape {shape} needs {math.prod(shape) * itemsize:,}"
            )
        return TensorInfo(
            name, dtype, tuple(shape), self.data_start + begin, self.data_start + end, self.path
        )

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        """The entry of tensor ``name`` (InvalidArgumentError naming the file if absent)."""
        try:
            return self.tensors[name]
        except KeyError:
            raise InvalidArgumentError(f"tensor {name!r} is not in {self.path}") from None

    def read(self, name: str, out: npt.NDArray[Any] | None = None) -> npt.NDArray[Any]:
        """Tensor ``name`` as a NumPy array of its dtype (BF16 -> ml_dtypes.bfloat16, F8_E4M3 ->
        ml_dtypes.float8_e4m3fn, I8 -> int8, F16 -> float16, F32 -> float32), read from the file
        into ``out`` (a C-contiguous array of that dtype and shape) or a new array."""
        return read_tensor(self.info(name), out)


def read_tensor(info: TensorInfo, out: npt.NDArray[Any] | None = None) -> npt.NDArray[Any]:
    """The bytes of ``info`` (an entry of ``SafetensorsFile.tensors``) as a NumPy array, read into
    ``out`` (C-contiguous, of the tensor's dtype and shape) or a new array."""
    dtype = _NUMPY_DTYPE.get(info.dtype)
    if dtype is None:
        raise InvalidArgumentError(
            f"tensor {info.name!r} in {info.path} has dtype {info.dtype}; this reader supports "
            f"{', '.join(_NUMPY_DTYPE)}"
        )
    if sys.byteorder != "little" and dtype.itemsize > 1:
        raise InvalidArgumentError(
            "reading multi-byte safetensors dtypes needs a little-endian host"
        )
    if out is None:
        out = np.empty(info.shape, dtype=dtype)
    elif out.dtype != dtype or out.shape != info.shape or not out.flags.c_contiguous:
        raise InvalidArgumentError(
            f"out must be a C-contiguous {dtype} array of shape {info.shape} for {info.name!r}, "
            f"got {out.dtype} {out.shape}"
        )
    buf = out.reshape(-1).view(np.uint8)
    with open(info.path, "rb") as f:
        f.seek(info.begin)
        got = f.readinto(buf)
    if got != info.nbytes:
        raise InvalidArgumentError(
            f"{info.path} is truncated: read {got:,} of the {info.nbytes:,} bytes of {info.name!r}"
        )
    return out


class SafetensorsCheckpoint:
    """A Hugging Face checkpoint: ``path`` is a directory with ``model.safetensors.index.json``
    and the shards its ``weight_map`` names, a directory with ``model.safetensors``, or one
    ``.safetensors`` file. Shards are opened (their headers checked) when first needed.

    ``config_path``: the directory's ``config.json`` if there is one, else None."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._files: dict[Path, SafetensorsFile] = {}
        self._weight_map: dict[str, Path] | None = None
        self.index_path: Path | None = None
        if self.path.is_dir():
            folder = self.path
            index, single = folder / INDEX_NAME, folder / SINGLE_FILE_NAME
            if index.is_file():
                self.index_path = index
                self._weight_map = self._read_index(index)
            elif single.is_file():
                self._files[single] = SafetensorsFile(single)
            else:
                raise InvalidArgumentError(
                    f"path={str(path)!r} has neither {INDEX_NAME} nor {SINGLE_FILE_NAME}"
                )
        elif self.path.is_file():
            folder = self.path.parent
            self._files[self.path] = SafetensorsFile(self.path)
        else:
            raise InvalidArgumentError(f"path={str(path)!r} does not exist")
        config = folder / CONFIG_NAME
        self.config_path: Path | None = config if config.is_file() else None

    @staticmethod
    def _read_index(index: Path) -> dict[str, Path]:
        try:
            obj = json.loads(
                index.read_text(encoding="utf-8"), object_pairs_hook=_reject_duplicates
            )
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise InvalidArgumentError(f"{index} is not valid JSON: {e}") from None
        except InvalidArgumentError as e:  # e.g. one tensor in two shards' entries
            raise InvalidArgumentError(f"{index} {e}") from None
        weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise InvalidArgumentError(f"{index}: no 'weight_map' object of tensor -> shard file")
        shards: dict[str, Path] = {}
        out: dict[str, Path] = {}
        for name, shard in weight_map.items():
            if Path(shard).name != shard:
                raise InvalidArgumentError(
                    f"{index}: shard {shard!r} of {name!r} is not a file name in the directory"
                )
            out[name] = shards.setdefault(shard, index.parent / shard)
        return out

    def _file(self, path: Path) -> SafetensorsFile:
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = SafetensorsFile(path)
        return f

    def names(self) -> list[str]:
        """Every tensor name of the checkpoint (from the index, or the single file's header)."""
        if self._weight_map is not None:
            return list(self._weight_map)
        return [n for f in self._files.values() for n in f.tensors]

    def __contains__(self, name: object) -> bool:
        if self._weight_map is not None:
            return name in self._weight_map
        return any(name in f for f in self._files.values())

    def info(self, name: str) -> TensorInfo:
        """Tensor ``name``'s entry (InvalidArgumentError naming the index or file if absent)."""
        if self._weight_map is None:
            (f,) = self._files.values()
            return f.info(name)
        shard = self._weight_map.get(name)
        if shard is None:
            raise InvalidArgumentError(f"tensor {name!r} is not in {self.index_path}")
        f = self._file(shard)
        if name not in f:
            raise InvalidArgumentError(
                f"tensor {name!r} is not in {shard} (where {self.index_path} says it is)"
            )
        return f.info(name)

    def read(self, name: str, out: npt.NDArray[Any] | None = None) -> npt.NDArray[Any]:
        """Tensor ``name`` as a NumPy array (see ``SafetensorsFile.read``)."""
        return read_tensor(self.info(name), out)


# --------------------------------------------------------------------------------------------
# DeepSeek's names -> the layer's weights dict


def _prefix(layer_id: int) -> str:
    return f"model.layers.{layer_id}.mlp."


def _read_float32(ckpt: SafetensorsCheckpoint, name: str) -> npt.NDArray[np.float32]:
    """A float tensor (F32, BF16 or F16) converted exactly to float32."""
    info = ckpt.info(name)
    if info.dtype not in _FLOAT_DTYPES:
        raise InvalidArgumentError(
            f"tensor {name!r} in {info.path} has dtype {info.dtype}; expected one of "
            f"{', '.join(_FLOAT_DTYPES)}"
        )
    return np.ascontiguousarray(read_tensor(info), dtype=np.float32)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class _Projections:
    """Reads the projection matrices of one layer in one weight format into stacked arrays."""

    def __init__(
        self, ckpt: SafetensorsCheckpoint, first: TensorInfo, block: tuple[int, int]
    ) -> None:
        fmt = _FORMAT_OF_DTYPE.get(first.dtype)
        if fmt is None:
            raise InvalidArgumentError(
                f"tensor {first.name!r} in {first.path} has dtype {first.dtype}; expert weights "
                f"must be one of {', '.join(_FORMAT_OF_DTYPE)}"
            )
        self.ckpt, self.first, self.block, self.format = ckpt, first, block, fmt
        self.dtype = _STORED_DTYPE[fmt]

    def new(self, *shape: int) -> tuple[npt.NDArray[Any], npt.NDArray[np.float32] | None]:
        """The stacked array of ``shape`` (..., rows, cols) and its scales (None if unscaled)."""
        w = np.empty(shape, dtype=self.dtype)
        *lead, rows, cols = shape
        if self.format == "fp8_e4m3":
            br, bc = self.block
            scale_shape = (*lead, _ceil_div(rows, br), _ceil_div(cols, bc))
        elif self.format == "int8":
            scale_shape = (*lead, rows)
        else:
            return w, None
        return w, np.empty(scale_shape, dtype=np.float32)

    def check_rows(self, rows: int, what: str) -> None:
        """fp8 concatenates gate_proj and up_proj along rows, so their scale grids must too."""
        if self.format == "fp8_e4m3" and rows % self.block[0] != 0:
            raise InvalidArgumentError(
                f"{what}={rows} is not a multiple of weight_block_size[0]={self.block[0]}: w13 "
                "concatenates gate_proj and up_proj along rows and their FP8 scale grids cannot "
                "be concatenated"
            )

    def read(
        self,
        base: str,
        rows: int,
        cols: int,
        w: npt.NDArray[Any],
        scale: npt.NDArray[np.float32] | None,
        row0: int = 0,
    ) -> None:
        """Reads ``{base}.weight`` [rows, cols] into ``w[row0 : row0 + rows]`` (``w``: one
        matrix of a stacked array) and its scales into the matching rows of ``scale``."""
        name = base + ".weight"
        info = self.ckpt.info(name)
        if info.dtype != self.first.dtype:
            raise InvalidArgumentError(
                f"tensor {name!r} in {info.path} has dtype {info.dtype} but {self.first.name!r} "
                f"has {self.first.dtype}: one weight_format per layer"
            )
        if info.shape != (rows, cols):
            raise InvalidArgumentError(
                f"tensor {name!r} in {info.path} has shape {list(info.shape)}; expected "
                f"{[rows, cols]}"
            )
        dest = w[row0 : row0 + rows]
        if info.dtype == "F16":
            dest[...] = read_tensor(info)
        else:
            read_tensor(info, dest)
        if scale is None:
            return
        if self.format == "fp8_e4m3":
            br, bc = self.block
            want: tuple[tuple[int, ...], ...] = ((_ceil_div(rows, br), _ceil_div(cols, bc)),)
            names = [base + ".weight_scale_inv"]
            dest_scale = scale[row0 // br : row0 // br + want[0][0]]
        else:
            want = ((rows,), (rows, 1))
            names = [base + ".weight_scale_inv", base + ".weight_scale"]
            dest_scale = scale[row0 : row0 + rows]
        scale_name = next((n for n in names if n in self.ckpt), None)
        if scale_name is None:
            raise InvalidArgumentError(
                f"tensor {names[0]!r} (the {self.format} scales of {name!r}) is not in the "
                f"checkpoint {self.ckpt.path}"
            )
        s = _read_float32(self.ckpt, scale_name)
        if s.shape not in want:
            raise InvalidArgumentError(
                f"tensor {scale_name!r} has shape {list(s.shape)}; expected "
                + " or ".join(str(list(x)) for x in want)
                + (f" (weight_block_size={list(self.block)})" if self.format == "fp8_e4m3" else "")
            )
        if not np.isfinite(s).all():
            raise InvalidArgumentError(f"tensor {scale_name!r} has non-finite scales")
        dest_scale[...] = s.reshape(dest_scale.shape)


def read_moe_layer_weights(
    checkpoint: SafetensorsCheckpoint | str | os.PathLike[str],
    layer_id: int,
    *,
    weight_block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE,
) -> dict[str, Any]:
    """The weights dict of MoE layer ``layer_id`` of a DeepSeek checkpoint (the arrays of
    ``DeepSeekMoE(config, weights)``), read by DeepSeek's tensor names.

    checkpoint: a ``SafetensorsCheckpoint`` or the path of one (directory or file).
    layer_id: the model layer (``model.layers.{layer_id}``); it must be an MoE layer.
    weight_block_size: (rows, cols) of one FP8 scale block (DeepSeek: 128 x 128).

    Returns ``gate`` float32 [E, H], ``correction_bias`` float32 [E] or None, ``w13`` [E, 2I, H]
    (rows [0, I) gate_proj, [I, 2I) up_proj) and ``w2`` [E, H, I] in the stored dtype
    (np.float32 -- F32 and F16 files --, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn or
    np.int8), ``shared_gate_up`` [2 Is, H] and ``shared_down`` [H, Is] likewise (None without a
    shared expert), ``tid2eid`` None and, for FP8 and int8, the float32 scales
    ``w13_scale_inv`` / ``w2_scale_inv`` / ``shared_gate_up_scale_inv`` /
    ``shared_down_scale_inv`` (FP8: [E, 2I / br, ceil(H / bc)] / [E, ceil(H / br), ceil(I / bc)]
    and per matrix likewise; int8: [E, 2I] / [E, H]): gate_proj's and up_proj's grids
    concatenated along rows as their matrices are, which for FP8 needs I % br == 0. A tensor
    ``{p}.experts.{e}.*`` with e not in [0, E) is refused (E: the rows of the gate)."""
    if not _is_int(layer_id) or layer_id < 0:
        raise InvalidArgumentError(f"layer_id must be a non-negative integer, got {layer_id!r}")
    block = _checked_block(weight_block_size, "weight_block_size")
    ckpt = (
        checkpoint
        if isinstance(checkpoint, SafetensorsCheckpoint)
        else SafetensorsCheckpoint(checkpoint)
    )
    p = _prefix(layer_id)
    if p + "gate.weight" not in ckpt and p + "gate_proj.weight" in ckpt:
        raise InvalidArgumentError(
            f"layer_id={layer_id} is a dense MLP layer in {ckpt.path} (it has {p}gate_proj.weight, "
            "no experts)"
        )
    gate = _read_float32(ckpt, p + "gate.weight")
    if gate.ndim != 2:
        raise InvalidArgumentError(
            f"tensor {p}gate.weight has shape {list(gate.shape)}, not [E, H]"
        )
    num_experts, hidden = gate.shape
    bias = None
    if p + "gate.e_score_correction_bias" in ckpt:
        bias = _read_float32(ckpt, p + "gate.e_score_correction_bias")
        if bias.shape != (num_experts,):
            raise InvalidArgumentError(
                f"tensor {p}gate.e_score_correction_bias has shape {list(bias.shape)}; expected "
                f"[{num_experts}] (E of {p}gate.weight)"
            )
    experts = p + "experts."
    expert_ids = {str(e) for e in range(num_experts)}  # as DeepSeek spells them: no '07'
    for name in ckpt.names():
        if name.startswith(experts) and name[len(experts) :].split(".", 1)[0] not in expert_ids:
            raise InvalidArgumentError(
                f"tensor {name!r} in {ckpt.path} is not of a routed expert: the layer has "
                f"E={num_experts} ({p}gate.weight's rows), {experts}0 to {experts}"
                f"{num_experts - 1}"
            )

    first = ckpt.info(p + "experts.0.gate_proj.weight")
    proj = _Projections(ckpt, first, block)
    if len(first.shape) != 2 or first.shape[1] != hidden:
        raise InvalidArgumentError(
            f"tensor {first.name!r} in {first.path} has shape {list(first.shape)}; expected "
            f"[I, {hidden}] (H of {p}gate.weight)"
        )
    inter = first.shape[0]
    proj.check_rows(inter, f"the intermediate size I ({first.name} rows)")
    w13, w13_scale = proj.new(num_experts, 2 * inter, hidden)
    w2, w2_scale = proj.new(num_experts, hidden, inter)
    for e in range(num_experts):
        base = f"{p}experts.{e}."
        s13 = None if w13_scale is None else w13_scale[e]
        proj.read(base + "gate_proj", inter, hidden, w13[e], s13)
        proj.read(base + "up_proj", inter, hidden, w13[e], s13, row0=inter)
        proj.read(
            base + "down_proj", hidden, inter, w2[e], None if w2_scale is None else w2_scale[e]
        )

    shared_gate_up = shared_down = shared_gate_up_scale = shared_down_scale = None
    sp = p + "shared_experts."
    if sp + "gate_proj.weight" in ckpt:
        info = ckpt.info(sp + "gate_proj.weight")
        if len(info.shape) != 2 or info.shape[1] != hidden:
            raise InvalidArgumentError(
                f"tensor {info.name!r} in {info.path} has shape {list(info.shape)}; expected "
                f"[Is, {hidden}] (H of {p}gate.weight)"
            )
        shared = info.shape[0]
        proj.check_rows(shared, f"the shared expert's intermediate size Is ({info.name} rows)")
        shared_gate_up, shared_gate_up_scale = proj.new(2 * shared, hidden)
        shared_down, shared_down_scale = proj.new(hidden, shared)
        proj.read(sp + "gate_proj", shared, hidden, shared_gate_up, shared_gate_up_scale)
        proj.read(sp + "up_proj", shared, hidden, shared_gate_up, shared_gate_up_scale, row0=shared)
        proj.read(sp + "down_proj", hidden, shared, shared_down, shared_down_scale)

    weights: dict[str, Any] = {
        "gate": gate,
        "correction_bias": bias,
        "w13": w13,
        "w2": w2,
        "shared_gate_up": shared_gate_up,
        "shared_down": shared_down,
        "tid2eid": None,
    }
    if w13_scale is not None:
        weights |= {
            "w13_scale_inv": w13_scale,
            "w2_scale_inv": w2_scale,
            "shared_gate_up_scale_inv": shared_gate_up_scale,
            "shared_down_scale_inv": shared_down_scale,
        }
    return weights


def weight_format_of(weights: Mapping[str, Any]) -> str:
    """The weight_format of a weights dict: ``"float32"``, ``"bfloat16"``, ``"fp8_e4m3"`` or
    ``"int8"``, from the dtype of its ``w13``."""
    dtype = np.asarray(weights["w13"]).dtype
    for fmt, stored in _STORED_DTYPE.items():
        if dtype == stored:
            return fmt
    raise InvalidArgumentError(f"weights['w13'] has dtype {dtype}, not a weight_format's")


# --------------------------------------------------------------------------------------------
# config.json -> DeepSeekMoEConfig fields


def _checked_block(block: Any, what: str) -> tuple[int, int]:
    if (
        not isinstance(block, list | tuple)
        or len(block) != 2
        or not all(_is_int(b) and b > 0 for b in block)
    ):
        raise InvalidArgumentError(f"{what} must be two positive integers, got {block!r}")
    return int(block[0]), int(block[1])


def _weight_format(hf: Mapping[str, Any], source: str) -> tuple[str, tuple[int, int] | None]:
    """(weight_format, FP8 block size or None) from quantization_config or torch_dtype."""
    qc = hf.get("quantization_config")
    if qc is not None:
        if not isinstance(qc, Mapping):
            raise InvalidArgumentError(f"{source}: quantization_config is not an object")
        method = qc.get("quant_method")
        if method == "fp8":
            fmt = qc.get("fmt", "e4m3")
            if fmt != "e4m3":
                raise InvalidArgumentError(
                    f"{source}: quantization_config.fmt={fmt!r}; only 'e4m3' is supported"
                )
            block = qc.get("weight_block_size", list(DEFAULT_BLOCK_SIZE))
            return "fp8_e4m3", _checked_block(
                block, f"{source}: quantization_config.weight_block_size"
            )
        if method == "w8a8_int8":
            return "int8", None
        raise InvalidArgumentError(
            f"{source}: quantization_config.quant_method={method!r}; supported: 'fp8' (block "
            "scales, fmt e4m3) and 'w8a8_int8' (per-channel int8 weights)"
        )
    dtype = hf.get("torch_dtype", hf.get("dtype"))
    formats = {"bfloat16": "bfloat16", "float32": "float32", "float16": "float32"}
    if not isinstance(dtype, str) or dtype not in formats:
        raise InvalidArgumentError(
            f"{source}: torch_dtype={dtype!r} without a quantization_config; supported: "
            f"{', '.join(formats)}"
        )
    return formats[dtype], None


_MISSING: Any = object()

#: The JSON types a config.json field may have, by the Python type json.load gives them.
_JSON_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list | tuple) else "an object"


def _config_value(
    hf: Mapping[str, Any],
    key: str,
    kind: type,
    source: str,
    *,
    default: Any = _MISSING,
    minimum: int | None = None,
    null_is_default: bool = False,
) -> Any:
    """``hf[key]``, of JSON type ``kind`` (int: an integer, not a boolean; float: any number but a
    boolean, returned as float; bool: true / false; str: a string) and, for ints, >= ``minimum``.
    Absent: ``default`` (no default: refused); null: refused unless ``null_is_default`` (or, for
    a field with no default, refused as absent)."""
    value = hf.get(key, _MISSING)
    if value is _MISSING or (value is None and (null_is_default or default is _MISSING)):
        if default is _MISSING:  # (V2's config class has n_routed_experts=None when dense)
            raise InvalidArgumentError(f"{source} has no {key!r} (not a DeepSeek MoE config?)")
        return default
    if kind is int:
        ok = _is_int(value) and (minimum is None or value >= minimum)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        want = _JSON_KINDS[kind] + ("" if minimum is None else f" >= {minimum}")
        raise InvalidArgumentError(
            f"{source}: {key}={value!r} must be {want}; it is {_json_type(value)}"
        )
    return float(value) if kind is float else value


def _read_config(
    hf_config: Mapping[str, Any] | str | os.PathLike[str],
) -> tuple[Mapping[str, Any], str]:
    """(the parsed config.json, its name for messages)."""
    if isinstance(hf_config, Mapping):
        return hf_config, "config"
    source = str(hf_config)
    try:
        hf = json.loads(
            Path(hf_config).read_text(encoding="utf-8"), object_pairs_hook=_reject_duplicates
        )
    except FileNotFoundError:
        raise InvalidArgumentError(f"{source} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InvalidArgumentError(f"{source} is not valid JSON: {e}") from None
    except InvalidArgumentError as e:
        raise InvalidArgumentError(f"{source} {e}") from None
    if not isinstance(hf, Mapping):
        raise InvalidArgumentError(f"{source} is not a JSON object")
    return hf, source


def deepseek_config_fields(
    hf_config: Mapping[str, Any] | str | os.PathLike[str],
    layer_id: int,
    *,
    activation_dtype: str | None = None,
) -> dict[str, Any]:
    """The ``DeepSeekMoEConfig`` fields of MoE layer ``layer_id`` of a DeepSeek (V2 / V3 / R1)
    Hugging Face ``config.json`` (a path or the parsed mapping).

    hidden_size, moe_intermediate_size -> intermediate_size, n_routed_experts -> num_experts,
    num_experts_per_tok -> top_k, n_shared_experts -> num_shared_experts (null: 0), scoring_func
    -> scoring, n_group / topk_group -> num_groups / topk_group (for topk_method 'noaux_tc' with
    n_group > 1; 'greedy': ungrouped; V2's 'group_limited_greedy' -- groups ranked by their
    maximum -- is refused), norm_topk_prob -> renormalize, routed_scaling_factor; the weight
    format from quantization_config (quant_method 'fp8', fmt 'e4m3' -> 'fp8_e4m3' with its
    weight_block_size; 'w8a8_int8' -> 'int8') or else torch_dtype ('bfloat16' -> 'bfloat16',
    'float32' / 'float16' -> 'float32'). activation_dtype: included when given (else the
    config's default). A decoder layer below first_k_dense_replace, or not a multiple of
    moe_layer_freq (a positive integer), is dense: refused; the multi-token-prediction layers
    after num_hidden_layers are MoE layers. DeepSeek-V4's fields: swiglu_limit -> swiglu_limit
    (the routed and shared experts' clamp; null: none), and a layer below num_hash_layers (a
    hash layer, routed by token id through a table this loader does not read) is refused.

    Every field read must have its JSON type -- integers (not booleans, strings or fractions),
    numbers, true / false, strings -- else InvalidArgumentError names the field and its value;
    null counts as absent only for num_hidden_layers, num_nextn_predict_layers,
    n_shared_experts, n_group, num_hash_layers and swiglu_limit, whose absence the models
    know."""
    hf, source = _read_config(hf_config)
    return _config_fields(hf, source, layer_id, activation_dtype)[0]


def _config_fields(
    hf: Mapping[str, Any], source: str, layer_id: int, activation_dtype: str | None
) -> tuple[dict[str, Any], str]:
    """(deepseek_config_fields, the config's topk_method)."""
    if not _is_int(layer_id) or layer_id < 0:
        raise InvalidArgumentError(f"layer_id must be a non-negative integer, got {layer_id!r}")

    def get(key: str, kind: type, default: Any = _MISSING, **kw: Any) -> Any:
        return _config_value(hf, key, kind, source, default=default, **kw)

    num_layers = get("num_hidden_layers", int, None, minimum=0, null_is_default=True)
    num_nextn = get("num_nextn_predict_layers", int, 0, minimum=0, null_is_default=True)
    if num_layers is not None and layer_id >= num_layers + num_nextn:
        # DeepSeek-V3's multi-token-prediction layers follow the decoder layers (layer 61).
        raise InvalidArgumentError(
            f"layer_id={layer_id} but {source} has {num_layers + num_nextn} layers "
            f"(num_hidden_layers={num_layers}, num_nextn_predict_layers="
            f"{hf.get('num_nextn_predict_layers')})"
        )
    first_dense = get("first_k_dense_replace", int, 0, minimum=0)
    freq = get("moe_layer_freq", int, 1, minimum=1)
    is_nextn = num_layers is not None and layer_id >= num_layers  # always MoE
    if not is_nextn and (layer_id < first_dense or layer_id % freq != 0):
        raise InvalidArgumentError(
            f"layer_id={layer_id} is a dense layer, not MoE (first_k_dense_replace={first_dense}, "
            f"moe_layer_freq={freq} in {source})"
        )
    # DeepSeek-V4's hash layers route by token id through a table (tid2eid) this loader does not
    # read: refused rather than loaded as learned-routing layers (reference/moe_layer.md 6.3).
    num_hash = get("num_hash_layers", int, 0, minimum=0, null_is_default=True)
    if layer_id < num_hash and not is_nextn:
        raise InvalidArgumentError(
            f"layer_id={layer_id} is a hash layer (num_hash_layers={num_hash} in {source}): its "
            "routing table tid2eid is not read by this loader"
        )
    v3 = get("model_type", str, None) == "deepseek_v3"
    topk_method = get("topk_method", str, "noaux_tc" if v3 else "greedy")
    n_group = get("n_group", int, None, minimum=1, null_is_default=True)
    if topk_method == "noaux_tc":
        grouped = n_group is not None and n_group > 1
    elif topk_method == "greedy":
        grouped = False
    else:
        raise InvalidArgumentError(
            f"{source}: topk_method={topk_method!r}; supported: 'noaux_tc' (DeepSeek-V3's "
            "grouped top-k) and 'greedy'"
        )
    weight_format, block = _weight_format(hf, source)
    fields: dict[str, Any] = {
        "hidden_size": get("hidden_size", int, minimum=1),
        "intermediate_size": get("moe_intermediate_size", int, minimum=1),
        "num_experts": get("n_routed_experts", int, minimum=1),
        "top_k": get("num_experts_per_tok", int, minimum=1),
        "num_shared_experts": get("n_shared_experts", int, 0, minimum=0, null_is_default=True),
        "scoring": get("scoring_func", str, "sigmoid" if v3 else "softmax"),
        "num_groups": n_group if grouped else None,
        "topk_group": get("topk_group", int, minimum=1) if grouped else None,
        "renormalize": get("norm_topk_prob", bool, v3),
        "routed_scaling_factor": get("routed_scaling_factor", float, 1.0),
        "layer_id": layer_id,
        "weight_format": weight_format,
    }
    # V4: the SwiGLU clamp of the routed and shared experts (null or absent: none)
    limit = get("swiglu_limit", float, None, null_is_default=True)
    if limit is not None:
        fields["swiglu_limit"] = limit
    if block is not None:
        fields["weight_block_size"] = block
    if activation_dtype is not None:
        fields["activation_dtype"] = activation_dtype
    return fields, topk_method


def load_moe_layer(
    path: str | os.PathLike[str],
    layer_id: int,
    *,
    activation_dtype: str | None = None,
) -> tuple[dict[str, Any], DeepSeekMoEConfig]:
    """MoE layer ``layer_id`` of the DeepSeek checkpoint at ``path`` (a directory with
    ``config.json``, or a ``.safetensors`` file next to one): ``(weights, config)`` such that
    ``DeepSeekMoE(config, weights)`` is the layer.

    The config comes from ``deepseek_config_fields`` (activation_dtype: 'float32' or 'bfloat16',
    None: the config's default); the weights from ``read_moe_layer_weights`` with the config's
    FP8 block size, and must agree with it: their format with weight_format, their shapes with
    hidden_size / moe_intermediate_size / n_routed_experts / n_shared_experts (the format is
    checked before the weights are read). The layer has ``{p}.gate.e_score_correction_bias``
    exactly when topk_method is 'noaux_tc' (reference/moe_layer.md section 2: the bias exists iff
    the method is noaux_tc and the layer is not a hash layer; hash layers are not read here):
    missing for noaux_tc, or present for 'greedy', which would not use it, is refused."""
    ckpt = SafetensorsCheckpoint(path)
    if ckpt.config_path is None:
        raise InvalidArgumentError(
            f"path={str(path)!r}: no {CONFIG_NAME} beside the weights; use "
            "read_moe_layer_weights and build the DeepSeekMoEConfig yourself"
        )
    hf, source = _read_config(ckpt.config_path)
    fields, topk_method = _config_fields(hf, source, layer_id, activation_dtype)
    _check_before_reading(fields, topk_method, ckpt)
    weights = read_moe_layer_weights(
        ckpt, layer_id, weight_block_size=fields.get("weight_block_size", DEFAULT_BLOCK_SIZE)
    )
    _check_agreement(fields, weights, ckpt)
    return weights, DeepSeekMoEConfig(**fields)


def _check_before_reading(
    fields: Mapping[str, Any], topk_method: str, ckpt: SafetensorsCheckpoint
) -> None:
    """The correction bias's presence against topk_method, and the expert weights' dtype
    against the config's weight_format (before a format's own checks, such as FP8's block
    rows, could blame the shapes for a wrong format)."""
    src, layer_id = ckpt.config_path, fields["layer_id"]
    if _prefix(layer_id) + "gate.weight" not in ckpt:
        return  # read_moe_layer_weights says why (a dense layer, a missing tensor)
    bias = _prefix(layer_id) + "gate.e_score_correction_bias"
    if topk_method == "noaux_tc" and bias not in ckpt:
        raise InvalidArgumentError(
            f"tensor {bias!r} is not in {ckpt.path} but {src} gives topk_method='noaux_tc', "
            "whose routing adds this bias to the scores when choosing experts"
        )
    if topk_method != "noaux_tc" and bias in ckpt:
        raise InvalidArgumentError(
            f"tensor {bias!r} is in {ckpt.path} but {src} gives topk_method={topk_method!r}, "
            "which has no correction bias (only 'noaux_tc' has one)"
        )
    first = _prefix(layer_id) + "experts.0.gate_proj.weight"
    if first in ckpt:  # else read_moe_layer_weights names the missing tensor
        info = ckpt.info(first)
        fmt = _FORMAT_OF_DTYPE.get(info.dtype)
        if fmt is not None and fmt != fields["weight_format"]:
            raise InvalidArgumentError(
                f"{src} gives weight_format {fields['weight_format']!r} but layer {layer_id}'s "
                f"expert weights in {ckpt.path} are {fmt!r} ({first} is {info.dtype})"
            )


def _check_agreement(
    fields: Mapping[str, Any], weights: Mapping[str, Any], ckpt: SafetensorsCheckpoint
) -> None:
    src = ckpt.config_path
    num_experts, two_inter, hidden = weights["w13"].shape
    shared = weights["shared_down"]
    got = {
        "hidden_size": hidden,
        "intermediate_size": two_inter // 2,
        "num_experts": num_experts,
        "shared intermediate size (moe_intermediate_size x n_shared_experts)": (
            0 if shared is None else shared.shape[1]
        ),
    }
    want = {
        "hidden_size": fields["hidden_size"],
        "intermediate_size": fields["intermediate_size"],
        "num_experts": fields["num_experts"],
        "shared intermediate size (moe_intermediate_size x n_shared_experts)": (
            fields["intermediate_size"] * fields["num_shared_experts"]
        ),
    }
    for key, value in want.items():
        if got[key] != value:
            raise InvalidArgumentError(
                f"{src} gives {key} {value} but the checkpoint's layer {fields['layer_id']} "
                f"has {got[key]}"
            )
