"""moelb.checkpoint against synthetic DeepSeek checkpoints written with the ``safetensors``
package: one file, a directory with ``model.safetensors``, a sharded directory with an index. The
FP8 and int8 weights are quantised here by independent NumPy/torch implementations; the loaded
arrays must equal what was written bit for bit (gate_proj rows before up_proj rows, the scale
grids concatenated likewise); every refusal names the parameter, tensor or file."""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from pathlib import Path
from typing import Any

import moelb
import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

from moelb.checkpoint import (  # noqa: E402
    SafetensorsCheckpoint,
    SafetensorsFile,
    deepseek_config_fields,
    load_moe_layer,
    read_moe_layer_weights,
    weight_format_of,
)
from routing_reference import reference_route  # noqa: E402

FORMATS = ("float32", "bfloat16", "fp8_e4m3", "int8")
LAYOUTS = ("file", "directory", "sharded")
#: The layer fields s29h2 adds to DeepSeekMoEConfig (issue 23); tests that build a layer in a
#: format other than float32 run once they exist.
HAS_FORMATS = "weight_format" in {f.name for f in dataclasses.fields(moelb.DeepSeekMoEConfig)}
NEEDS_FORMATS = "DeepSeekMoEConfig has no weight_format field yet (issue 23, the layer's formats)"

LAYER = 3
SHAPE = dict(num_experts=8, hidden=320, inter=256, shared=256)  # H 320: a partial column block


# --- independent quantisers (the contract's definitions, written here) -------------------------


def fp8_block_quantize(w: np.ndarray, block: tuple[int, int] = (128, 128)):
    """DeepSeek's block FP8: per block scale_inv = amax / 448 (1 for an all-zero block),
    q = float8_e4m3fn(w / scale_inv) rounded by torch. Returns (q torch, scale_inv float32)."""
    rows, cols = w.shape
    br, bc = block
    grid = (-(-rows // br), -(-cols // bc))
    scale = np.ones(grid, dtype=np.float32)
    scaled = np.empty_like(w)
    for i in range(grid[0]):
        for j in range(grid[1]):
            blk = w[i * br : (i + 1) * br, j * bc : (j + 1) * bc]
            amax = float(np.abs(blk).max())
            if amax > 0:
                scale[i, j] = np.float32(amax / 448.0)
            scaled[i * br : (i + 1) * br, j * bc : (j + 1) * bc] = np.clip(
                blk / scale[i, j], -448, 448
            )
    return torch.from_numpy(scaled).to(torch.float8_e4m3fn), scale


def int8_row_quantize(w: np.ndarray):
    """Per output row: scale = amax / 127, q = round(w / scale). Returns (q torch int8, scale)."""
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return torch.from_numpy(q), scale


def dequantize(q: np.ndarray, scale: np.ndarray | None, block=(128, 128)) -> np.ndarray:
    """float64 weights of a stored matrix [rows, cols] (the contract's definition)."""
    w = np.asarray(q).astype(np.float64)
    if q.dtype == np.int8:
        return w * scale.astype(np.float64)[:, None]
    if scale is None:
        return w
    full = np.repeat(np.repeat(scale.astype(np.float64), block[0], 0), block[1], 1)
    return w * full[: w.shape[0], : w.shape[1]]


def raw(t) -> np.ndarray:
    """A torch tensor's bytes [rows, cols * itemsize]."""
    return t.contiguous().view(torch.uint8).numpy()


# --- synthetic checkpoints ---------------------------------------------------------------------


@dataclasses.dataclass
class Projection:
    weight: Any  # the stored torch tensor
    scale: np.ndarray | None  # float32 scale_inv (fp8 grid / int8 per row)
    original: np.ndarray  # float32 before quantisation


def make_projection(rng, rows, cols, fmt, gain=1.0) -> Projection:
    w = (rng.standard_normal((rows, cols)) * gain / np.sqrt(cols)).astype(np.float32)
    if fmt == "float32":
        return Projection(torch.from_numpy(w), None, w)
    if fmt == "bfloat16":
        return Projection(torch.from_numpy(w).to(torch.bfloat16), None, w)
    if fmt == "fp8_e4m3":
        return Projection(*fp8_block_quantize(w), w)
    return Projection(*int8_row_quantize(w), w)


@dataclasses.dataclass
class Synthetic:
    fmt: str
    tensors: dict  # name -> torch tensor, as written
    experts: list  # [{gate_proj, up_proj, down_proj: Projection}]
    shared: dict | None
    gate: np.ndarray  # float32
    bias: np.ndarray | None


def make_layer(
    fmt: str,
    *,
    layer: int = LAYER,
    num_experts: int = SHAPE["num_experts"],
    hidden: int = SHAPE["hidden"],
    inter: int = SHAPE["inter"],
    shared: int | None = SHAPE["shared"],
    bias: bool = True,
    seed: int = 0,
    int8_scale_name: str = "weight_scale_inv",
) -> Synthetic:
    rng = np.random.default_rng(seed)
    p = f"model.layers.{layer}.mlp."
    tensors: dict[str, Any] = {}

    def put(base: str, proj: Projection) -> None:
        tensors[base + ".weight"] = proj.weight
        if proj.scale is not None:
            name = int8_scale_name if fmt == "int8" else "weight_scale_inv"
            tensors[f"{base}.{name}"] = torch.from_numpy(proj.scale)

    gate = rng.standard_normal((num_experts, hidden)).astype(np.float32)
    if fmt == "float32":
        tensors[p + "gate.weight"] = torch.from_numpy(gate)
    else:  # DeepSeek's releases store the router gate in bf16
        tensors[p + "gate.weight"] = torch.from_numpy(gate).to(torch.bfloat16)
        gate = tensors[p + "gate.weight"].float().numpy()
    b = None
    if bias:
        b = (rng.standard_normal(num_experts) * 0.1).astype(np.float32)
        tensors[p + "gate.e_score_correction_bias"] = torch.from_numpy(b)
    experts = []
    for e in range(num_experts):
        # up_proj 100x larger than gate_proj: a swapped half or scale grid cannot go unseen
        proj = {
            "gate_proj": make_projection(rng, inter, hidden, fmt),
            "up_proj": make_projection(rng, inter, hidden, fmt, gain=100.0),
            "down_proj": make_projection(rng, hidden, inter, fmt),
        }
        for name, pr in proj.items():
            put(f"{p}experts.{e}.{name}", pr)
        experts.append(proj)
    sh = None
    if shared:
        sh = {
            "gate_proj": make_projection(rng, shared, hidden, fmt),
            "up_proj": make_projection(rng, shared, hidden, fmt, gain=100.0),
            "down_proj": make_projection(rng, hidden, shared, fmt),
        }
        for name, pr in sh.items():
            put(f"{p}shared_experts.{name}", pr)
    # Another layer's tensors and a dense layer beside it, as in a real checkpoint.
    tensors[f"model.layers.{layer + 1}.mlp.gate.weight"] = torch.zeros(2, 2)
    tensors["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(4, 4)
    return Synthetic(fmt, tensors, experts, sh, gate, b)


def hf_config(fmt: str, **changes: Any) -> dict[str, Any]:
    """A DeepSeek-V3-style config.json of SHAPE."""
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_size": SHAPE["hidden"],
        "moe_intermediate_size": SHAPE["inter"],
        "n_routed_experts": SHAPE["num_experts"],
        "num_experts_per_tok": 2,
        "n_shared_experts": SHAPE["shared"] // SHAPE["inter"],
        "n_group": 4,
        "topk_group": 2,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 3,
        "moe_layer_freq": 1,
        "num_hidden_layers": 6,
        "num_nextn_predict_layers": 1,
        "torch_dtype": "float32" if fmt == "float32" else "bfloat16",
    }
    if fmt == "fp8_e4m3":
        cfg["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128],
        }
    elif fmt == "int8":
        cfg["quantization_config"] = {"quant_method": "w8a8_int8"}
    cfg.update(changes)
    return cfg


def write(
    root: Path, syn: Synthetic, layout: str, config: dict | None = None, shards: int = 3
) -> Path:
    """Writes ``syn`` as ``layout``; returns the path to load from."""
    root.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    if layout == "file":
        path = root / "layer.safetensors"
        safetensors_torch.save_file(syn.tensors, str(path))
        return path
    if layout == "directory":
        safetensors_torch.save_file(syn.tensors, str(root / "model.safetensors"))
        return root
    names = sorted(syn.tensors)
    weight_map = {}
    for s in range(shards):
        shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: syn.tensors[n] for n in names[s::shards]}
        safetensors_torch.save_file(part, str(root / shard))
        weight_map |= dict.fromkeys(part, shard)
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    return root


# --- reading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_loaded_arrays_equal_the_written_ones_bit_for_bit(tmp_path, fmt, layout) -> None:
    syn = make_layer(fmt)
    w = read_moe_layer_weights(write(tmp_path, syn, layout), LAYER)
    e_count, h, i, s = SHAPE["num_experts"], SHAPE["hidden"], SHAPE["inter"], SHAPE["shared"]
    stored = {
        "float32": np.float32,
        "bfloat16": ml_dtypes.bfloat16,
        "fp8_e4m3": ml_dtypes.float8_e4m3fn,
        "int8": np.int8,
    }[fmt]
    assert weight_format_of(w) == fmt
    assert w["w13"].dtype == stored and w["w13"].shape == (e_count, 2 * i, h)
    assert w["w2"].dtype == stored and w["w2"].shape == (e_count, h, i)
    assert w["shared_gate_up"].shape == (2 * s, h) and w["shared_down"].shape == (h, s)
    assert w["gate"].dtype == np.float32 and np.array_equal(w["gate"], syn.gate)
    assert np.array_equal(w["correction_bias"], syn.bias)
    assert w["tid2eid"] is None

    def as_bytes(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a).view(np.uint8)

    for e, proj in enumerate(syn.experts):
        assert np.array_equal(as_bytes(w["w13"][e, :i]), raw(proj["gate_proj"].weight))
        assert np.array_equal(as_bytes(w["w13"][e, i:]), raw(proj["up_proj"].weight))
        assert np.array_equal(as_bytes(w["w2"][e]), raw(proj["down_proj"].weight))
    assert np.array_equal(as_bytes(w["shared_gate_up"][:s]), raw(syn.shared["gate_proj"].weight))
    assert np.array_equal(as_bytes(w["shared_gate_up"][s:]), raw(syn.shared["up_proj"].weight))
    assert np.array_equal(as_bytes(w["shared_down"]), raw(syn.shared["down_proj"].weight))

    scale_keys = ("w13_scale_inv", "w2_scale_inv", "shared_gate_up_scale_inv")
    if fmt in ("float32", "bfloat16"):
        assert not any(k in w for k in scale_keys)
        return
    if fmt == "fp8_e4m3":  # [2I / 128, ceil(H / 128)] = [4, 3]; [ceil(320 / 128), 256 / 128]
        assert w["w13_scale_inv"].shape == (e_count, 4, 3)
        assert w["w2_scale_inv"].shape == (e_count, 3, 2)
        assert w["shared_gate_up_scale_inv"].shape == (4, 3)
        assert w["shared_down_scale_inv"].shape == (3, 2)
    else:
        assert w["w13_scale_inv"].shape == (e_count, 2 * i)
        assert w["w2_scale_inv"].shape == (e_count, h)
    for e, proj in enumerate(syn.experts):
        want13 = np.concatenate([proj["gate_proj"].scale, proj["up_proj"].scale])
        assert np.array_equal(w["w13_scale_inv"][e], want13)
        assert np.array_equal(w["w2_scale_inv"][e], proj["down_proj"].scale)
    want_shared = np.concatenate([syn.shared["gate_proj"].scale, syn.shared["up_proj"].scale])
    assert np.array_equal(w["shared_gate_up_scale_inv"], want_shared)
    assert np.array_equal(w["shared_down_scale_inv"], syn.shared["down_proj"].scale)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
def test_dequantised_weights_are_the_originals_within_the_format(tmp_path, fmt) -> None:
    """The loaded q and scales dequantise (the contract's formula, written here) to the float32
    weights the checkpoint was made from: a swapped half or grid would be off by ~100x."""
    syn = make_layer(fmt)
    w = read_moe_layer_weights(write(tmp_path, syn, "sharded"), LAYER)
    i = SHAPE["inter"]
    for e, proj in enumerate(syn.experts):
        got13 = dequantize(w["w13"][e], w["w13_scale_inv"][e])
        got2 = dequantize(w["w2"][e], w["w2_scale_inv"][e])
        want13 = np.concatenate([proj["gate_proj"].original, proj["up_proj"].original])
        for got, want in ((got13[:i], want13[:i]), (got13[i:], want13[i:]), (got2, None)):
            want = proj["down_proj"].original if want is None else want
            # fp8 e4m3: 3 mantissa bits (relative 2^-4) and subnormals below 2^-6 of the block
            # scale x 448; int8: half a step of amax / 127 per row (slack: float32 rounding)
            if fmt == "fp8_e4m3":
                bound = (np.abs(want) * 2.0**-4 + np.abs(want).max() / 448 * 2.0**-9) * (1 + 1e-6)
            else:
                bound = np.abs(want).max(axis=1, keepdims=True) / 127 * 0.5 * (1 + 1e-5)
            assert np.all(np.abs(got - want) <= bound)


def test_int8_scales_may_be_named_weight_scale_with_a_column(tmp_path) -> None:
    syn = make_layer("int8", int8_scale_name="weight_scale")
    for name in [n for n in syn.tensors if n.endswith(".weight_scale")]:
        syn.tensors[name] = syn.tensors[name].reshape(-1, 1)  # SGLang's w8a8_int8 [rows, 1]
    w = read_moe_layer_weights(write(tmp_path, syn, "file"), LAYER)
    assert np.array_equal(w["w2_scale_inv"][1], syn.experts[1]["down_proj"].scale)


def test_no_shared_expert_and_no_bias(tmp_path) -> None:
    syn = make_layer("bfloat16", shared=None, bias=False)
    w = read_moe_layer_weights(write(tmp_path, syn, "directory"), LAYER)
    assert w["shared_gate_up"] is None and w["shared_down"] is None
    assert w["correction_bias"] is None


def test_f16_weights_widen_exactly_to_float32(tmp_path) -> None:
    syn = make_layer("float32")
    syn.tensors = {k: (v.half() if v.ndim == 2 else v) for k, v in syn.tensors.items()}
    w = read_moe_layer_weights(write(tmp_path, syn, "file"), LAYER)
    assert w["w13"].dtype == np.float32
    want = syn.tensors[f"model.layers.{LAYER}.mlp.experts.2.up_proj.weight"].float().numpy()
    assert np.array_equal(w["w13"][2, SHAPE["inter"] :], want)


def test_reader_matches_the_safetensors_package_on_every_supported_dtype(tmp_path) -> None:
    rng = np.random.default_rng(1)
    tensors = {
        "f32": torch.from_numpy(rng.standard_normal((3, 5)).astype(np.float32)),
        "f16": torch.from_numpy(rng.standard_normal((7,)).astype(np.float16)),
        "bf16": torch.from_numpy(rng.standard_normal((2, 3, 4)).astype(np.float32)).bfloat16(),
        "fp8": torch.from_numpy(rng.standard_normal((4, 4)).astype(np.float32)).to(
            torch.float8_e4m3fn
        ),
        "i8": torch.from_numpy(rng.integers(-128, 128, (9,), dtype=np.int8)),
        "empty": torch.zeros((0, 3)),
        "i64": torch.arange(4),  # in the header, refused only when read
    }
    path = tmp_path / "t.safetensors"
    safetensors_torch.save_file(tensors, str(path), metadata={"format": "pt"})
    f = SafetensorsFile(path)
    assert f.metadata == {"format": "pt"}
    assert set(f.tensors) == set(tensors)
    for name, t in tensors.items():
        if name == "i64":
            with pytest.raises(moelb.InvalidArgumentError, match=r"'i64'.*t\.safetensors.*I64"):
                f.read(name)
            continue
        got = f.read(name)
        assert got.shape == tuple(t.shape)
        assert np.array_equal(got.view(np.uint8).reshape(-1), raw(t).reshape(-1))


# --- refusals of the file format -----------------------------------------------------------------


def write_raw(path: Path, header: dict | bytes, data: bytes, length: int | None = None) -> Path:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


@pytest.mark.parametrize(
    ("header", "data", "length", "match"),
    [
        (b"", b"", 0, "not valid JSON"),
        (b"{", b"", None, "not valid JSON"),
        (b"[]", b"", None, "not an object"),
        (b'{"a": 1, "a": 2}', b"", None, "names 'a' twice"),
        ({"x": entry("F32", [2], 0, 8)}, b"\0" * 8, 10**9, "above the format's limit"),
        ({"x": entry("F32", [2], 0, 8)}, b"\0" * 8, 4096, "truncated: its header needs"),
        ({"x": entry("F32", [4], 0, 16)}, b"\0" * 8, None, "truncated or corrupt.*'x'"),
        ({"x": entry("F32", [3], 0, 8)}, b"\0" * 8, None, r"'x'.*hold 8 bytes.*needs 12"),
        (
            {"x": entry("F32", [2], 0, 8), "y": entry("F32", [2], 4, 12)},
            b"\0" * 12,
            None,
            "tensors 'x' .*and 'y' .*overlap",
        ),
        ({"x": entry("F32", [2], 8, 0)}, b"\0" * 8, None, "data_offsets=.*0 <= begin <= end"),
        ({"x": entry("F32", [-2], 0, 8)}, b"\0" * 8, None, "shape=.*not a list of sizes"),
        ({"x": {"dtype": 3, "shape": [], "data_offsets": [0, 0]}}, b"", None, "dtype=3"),
        ({"__metadata__": {"a": 1}}, b"", None, "__metadata__ must map strings"),
    ],
)
def test_bad_files_are_refused(tmp_path, header, data, length, match) -> None:
    path = write_raw(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(moelb.InvalidArgumentError, match=match) as info:
        SafetensorsFile(path)
    assert "bad.safetensors" in str(info.value)


def test_a_short_file_and_a_missing_file_are_refused(tmp_path) -> None:
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x00")
    with pytest.raises(moelb.InvalidArgumentError, match=r"short\.safetensors is truncated: 2"):
        SafetensorsFile(tmp_path / "short.safetensors")
    with pytest.raises(moelb.InvalidArgumentError, match=r"nope\.safetensors does not exist"):
        SafetensorsFile(tmp_path / "nope.safetensors")
    with pytest.raises(moelb.InvalidArgumentError, match="has neither"):
        SafetensorsCheckpoint(tmp_path)


def test_a_file_cut_short_after_opening_is_refused_when_read(tmp_path) -> None:
    path = write_raw(tmp_path / "t.safetensors", {"x": entry("F32", [4], 0, 16)}, b"\0" * 16)
    f = SafetensorsFile(path)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(moelb.InvalidArgumentError, match="truncated: read 12 of the 16 bytes"):
        f.read("x")


def test_a_truncated_shard_is_refused_naming_it(tmp_path) -> None:
    root = write(tmp_path, make_layer("bfloat16"), "sharded")
    shard = root / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(moelb.InvalidArgumentError, match=r"model-00002-of-00003.*truncated"):
        read_moe_layer_weights(root, LAYER)


# --- refusals of the layer -----------------------------------------------------------------------

P = f"model.layers.{LAYER}.mlp."


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_missing_tensor_is_named_with_its_file(tmp_path, layout) -> None:
    syn = make_layer("fp8_e4m3")
    del syn.tensors[P + "experts.5.up_proj.weight"]
    path = write(tmp_path, syn, layout)
    where = {
        "file": "layer.safetensors",
        "directory": "model.safetensors",
        "sharded": "model.safetensors.index.json",
    }[layout]
    with pytest.raises(moelb.InvalidArgumentError, match=rf"experts\.5\.up_proj\.weight.*{where}"):
        read_moe_layer_weights(path, LAYER)


def test_an_index_pointing_to_the_wrong_or_a_missing_shard(tmp_path) -> None:
    root = write(tmp_path, make_layer("bfloat16"), "sharded")
    index_path = root / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = P + "experts.1.down_proj.weight"
    right = index["weight_map"][name]
    index["weight_map"][name] = next(v for v in index["weight_map"].values() if v != right)
    index_path.write_text(json.dumps(index))
    with pytest.raises(
        moelb.InvalidArgumentError, match=r"experts\.1\.down_proj\.weight.*is not in .*where"
    ):
        read_moe_layer_weights(root, LAYER)
    index["weight_map"][name] = "model-00009-of-00009.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(moelb.InvalidArgumentError, match=r"model-00009-of-00009.* does not exist"):
        read_moe_layer_weights(root, LAYER)
    index["weight_map"][name] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(moelb.InvalidArgumentError, match="not a file name in the directory"):
        SafetensorsCheckpoint(root)
    index_path.write_text("{}")
    with pytest.raises(moelb.InvalidArgumentError, match="no 'weight_map'"):
        SafetensorsCheckpoint(root)


def test_an_index_naming_a_tensor_twice_is_refused(tmp_path) -> None:
    """json.load keeps the last of duplicate keys silently; the index must not."""
    root = write(tmp_path, make_layer("bfloat16"), "sharded")
    index_path = root / "model.safetensors.index.json"
    weight_map = json.loads(index_path.read_text())["weight_map"]
    name = P + "experts.1.down_proj.weight"
    other = next(v for v in weight_map.values() if v != weight_map[name])
    entries = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in weight_map.items()]
    entries.append(f"{json.dumps(name)}: {json.dumps(other)}")  # the wrong shard, last
    index_path.write_text('{"weight_map": {' + ", ".join(entries) + "}}")
    with pytest.raises(
        moelb.InvalidArgumentError,
        match=r"model\.safetensors\.index\.json names 'model\.layers\.3\.mlp\.experts\.1\."
        r"down_proj\.weight' twice",
    ):
        read_moe_layer_weights(root, LAYER)


@pytest.mark.parametrize("layout", ["file", "sharded"])
@pytest.mark.parametrize(
    "extra",
    [
        "experts.8.gate_proj.weight",
        "experts.12.down_proj.weight_scale_inv",
        "experts.x.up_proj.weight",
        "experts.07.up_proj.weight",  # expert 7 spelled otherwise: never read either
    ],
)
def test_tensors_of_experts_outside_the_gate_are_refused(tmp_path, layout, extra) -> None:
    """E comes from the gate's rows (8); a tensor of expert 8 or more (or not numbered as
    DeepSeek numbers them) would otherwise be left out silently."""
    syn = make_layer("bfloat16")
    syn.tensors["model.layers.30.mlp.experts.9.up_proj.weight"] = torch.zeros(2, 2)  # not layer 3
    path = write(tmp_path / "ok", syn, layout)
    assert read_moe_layer_weights(path, LAYER)["w13"].shape[0] == 8
    syn.tensors[P + extra] = torch.zeros(2, 2)
    path = write(tmp_path / "bad", syn, layout)
    with pytest.raises(
        moelb.InvalidArgumentError,
        match=rf"tensor '{re.escape(P + extra)}' in .* is not of a routed expert: the layer has "
        r"E=8 \(model\.layers\.3\.mlp\.gate\.weight's rows\), model\.layers\.3\.mlp\.experts\.0"
        r" to model\.layers\.3\.mlp\.experts\.7$",
    ):
        read_moe_layer_weights(path, LAYER)


def test_missing_scales_mixed_dtypes_and_bad_shapes_are_refused(tmp_path) -> None:
    syn = make_layer("fp8_e4m3")
    del syn.tensors[P + "experts.2.down_proj.weight_scale_inv"]
    with pytest.raises(
        moelb.InvalidArgumentError, match=r"experts\.2\.down_proj\.weight_scale_inv.*fp8_e4m3"
    ):
        read_moe_layer_weights(write(tmp_path / "a", syn, "file"), LAYER)

    syn = make_layer("fp8_e4m3")
    syn.tensors[P + "experts.4.gate_proj.weight"] = syn.tensors[
        P + "experts.4.gate_proj.weight"
    ].bfloat16()
    with pytest.raises(moelb.InvalidArgumentError, match=r"experts\.4\.gate_proj.*BF16.*F8_E4M3"):
        read_moe_layer_weights(write(tmp_path / "b", syn, "file"), LAYER)

    syn = make_layer("fp8_e4m3")
    name = P + "experts.1.up_proj.weight_scale_inv"
    syn.tensors[name] = syn.tensors[name][:, :2].contiguous()
    with pytest.raises(
        moelb.InvalidArgumentError, match=r"up_proj\.weight_scale_inv.*\[2, 2\].*\[2, 3\]"
    ):
        read_moe_layer_weights(write(tmp_path / "c", syn, "file"), LAYER)

    syn = make_layer("bfloat16")
    name = P + "experts.6.down_proj.weight"
    syn.tensors[name] = syn.tensors[name][:, :128].contiguous()
    with pytest.raises(moelb.InvalidArgumentError, match=r"down_proj\.weight.*\[320, 128\]"):
        read_moe_layer_weights(write(tmp_path / "d", syn, "file"), LAYER)

    syn = make_layer("int8")
    name = P + "experts.0.gate_proj.weight_scale_inv"
    syn.tensors[name] = torch.full((SHAPE["inter"],), float("nan"))
    with pytest.raises(moelb.InvalidArgumentError, match="non-finite scales"):
        read_moe_layer_weights(write(tmp_path / "e", syn, "file"), LAYER)

    syn = make_layer("float32")
    syn.tensors[P + "experts.0.gate_proj.weight"] = torch.zeros(
        SHAPE["inter"], SHAPE["hidden"], dtype=torch.int32
    )
    with pytest.raises(moelb.InvalidArgumentError, match="has dtype I32; expert weights must"):
        read_moe_layer_weights(write(tmp_path / "f", syn, "file"), LAYER)


def test_fp8_with_an_intermediate_size_off_the_block_is_refused(tmp_path) -> None:
    syn = make_layer("fp8_e4m3", inter=192, shared=None)
    with pytest.raises(
        moelb.InvalidArgumentError,
        match=r"intermediate size I .*=192 is not a multiple of weight_block_size\[0\]=128",
    ):
        read_moe_layer_weights(write(tmp_path, syn, "file"), LAYER)
    # blocks of 64 rows would let 192 rows concatenate, but the file's grids are of 128 rows
    with pytest.raises(moelb.InvalidArgumentError, match=r"weight_scale_inv.*\[2, 3\].*\[3, 3\]"):
        read_moe_layer_weights(write(tmp_path, syn, "file"), LAYER, weight_block_size=(64, 128))


def test_dense_layers_and_bad_arguments_are_refused(tmp_path) -> None:
    path = write(tmp_path, make_layer("bfloat16"), "file")
    with pytest.raises(moelb.InvalidArgumentError, match="layer_id=0 is a dense MLP layer"):
        read_moe_layer_weights(path, 0)
    with pytest.raises(moelb.InvalidArgumentError, match=r"model\.layers\.7\.mlp\.gate\.weight"):
        read_moe_layer_weights(path, 7)
    with pytest.raises(moelb.InvalidArgumentError, match="layer_id must be"):
        read_moe_layer_weights(path, -1)
    with pytest.raises(moelb.InvalidArgumentError, match="weight_block_size must be"):
        read_moe_layer_weights(path, LAYER, weight_block_size=(0, 128))
    with pytest.raises(moelb.InvalidArgumentError, match="does not exist"):
        read_moe_layer_weights(tmp_path / "missing", LAYER)


# --- config.json ---------------------------------------------------------------------------------


def test_config_fields_of_a_v3_fp8_checkpoint() -> None:
    fields = deepseek_config_fields(hf_config("fp8_e4m3"), LAYER)
    assert fields == {
        "hidden_size": 320,
        "intermediate_size": 256,
        "num_experts": 8,
        "top_k": 2,
        "num_shared_experts": 1,
        "scoring": "sigmoid",
        "num_groups": 4,
        "topk_group": 2,
        "renormalize": True,
        "routed_scaling_factor": 2.5,
        "layer_id": LAYER,
        "weight_format": "fp8_e4m3",
        "weight_block_size": (128, 128),
    }
    assert deepseek_config_fields(hf_config("bfloat16"), 4)["weight_format"] == "bfloat16"
    assert "weight_block_size" not in deepseek_config_fields(hf_config("bfloat16"), 4)
    assert deepseek_config_fields(hf_config("int8"), 4)["weight_format"] == "int8"
    assert deepseek_config_fields(hf_config("float32"), 6)["layer_id"] == 6  # the MTP layer
    assert deepseek_config_fields(hf_config("float32"), 3, activation_dtype="bfloat16")[
        "activation_dtype"
    ] == ("bfloat16")
    block = hf_config("fp8_e4m3")
    block["quantization_config"]["weight_block_size"] = [64, 32]
    assert deepseek_config_fields(block, 3)["weight_block_size"] == (64, 32)


def test_config_fields_of_a_v2_lite_style_config(tmp_path) -> None:
    cfg = hf_config(
        "bfloat16",
        model_type="deepseek_v2",
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        scoring_func="softmax",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        n_shared_experts=2,
        first_k_dense_replace=1,
    )
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    fields = deepseek_config_fields(path, 1)
    assert fields["num_groups"] is None and fields["topk_group"] is None
    assert fields["scoring"] == "softmax" and fields["renormalize"] is False
    assert fields["num_shared_experts"] == 2


@pytest.mark.parametrize(
    ("changes", "layer", "match"),
    [
        ({}, 2, "layer_id=2 is a dense layer.*first_k_dense_replace=3"),
        ({"moe_layer_freq": 2}, 5, "layer_id=5 is a dense layer.*moe_layer_freq=2"),
        ({}, 7, "layer_id=7 but .* has 7 layers"),
        ({"topk_method": "group_limited_greedy"}, 3, "topk_method='group_limited_greedy'"),
        ({"quantization_config": {"quant_method": "awq"}}, 3, "quant_method='awq'"),
        ({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}}, 3, "fmt='e5m2'"),
        (
            {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}},
            3,
            "weight_block_size must be two positive integers",
        ),
        ({"torch_dtype": "int4"}, 3, "torch_dtype='int4'"),
        ({"n_routed_experts": None}, 3, "no 'n_routed_experts'"),
    ],
)
def test_config_refusals(changes, layer, match) -> None:
    with pytest.raises(moelb.InvalidArgumentError, match=match):
        deepseek_config_fields(hf_config("bfloat16", **changes), layer)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("routed_scaling_factor", None, "routed_scaling_factor=None must be a number; it is null"),
        ("routed_scaling_factor", "2.5", "routed_scaling_factor='2.5' must be a number; it is a s"),
        ("routed_scaling_factor", True, "routed_scaling_factor=True must be a number; it is a b"),
        ("n_group", "2", "n_group='2' must be an integer >= 1; it is a string"),
        ("n_group", 0, "n_group=0 must be an integer >= 1; it is an integer"),
        ("n_group", 4.0, "n_group=4.0 must be an integer >= 1; it is a number"),
        ("topk_group", "2", "topk_group='2' must be an integer >= 1"),
        ("num_hidden_layers", "5", "num_hidden_layers='5' must be an integer >= 0"),
        ("num_nextn_predict_layers", "1", "num_nextn_predict_layers='1' must be an integer"),
        ("first_k_dense_replace", "3", "first_k_dense_replace='3' must be an integer >= 0"),
        ("first_k_dense_replace", None, "first_k_dense_replace=None must be an integer >= 0"),
        ("first_k_dense_replace", 3.0, "first_k_dense_replace=3.0 must be an integer >= 0"),
        ("moe_layer_freq", 0.5, r"moe_layer_freq=0\.5 must be an integer >= 1; it is a number"),
        ("moe_layer_freq", 0, "moe_layer_freq=0 must be an integer >= 1; it is an integer"),
        ("moe_layer_freq", True, "moe_layer_freq=True must be an integer >= 1; it is a boolean"),
        ("moe_layer_freq", None, "moe_layer_freq=None must be an integer >= 1; it is null"),
        ("norm_topk_prob", "false", "norm_topk_prob='false' must be true or false; it is a s"),
        ("norm_topk_prob", 0, "norm_topk_prob=0 must be true or false; it is an integer"),
        ("norm_topk_prob", None, "norm_topk_prob=None must be true or false; it is null"),
        ("hidden_size", 320.0, r"hidden_size=320\.0 must be an integer >= 1; it is a number"),
        ("hidden_size", True, "hidden_size=True must be an integer >= 1; it is a boolean"),
        ("moe_intermediate_size", -256, "moe_intermediate_size=-256 must be an integer >= 1"),
        ("num_experts_per_tok", "2", "num_experts_per_tok='2' must be an integer >= 1"),
        ("n_shared_experts", "1", "n_shared_experts='1' must be an integer >= 0"),
        ("n_routed_experts", [8], r"n_routed_experts=\[8\] must be an integer >= 1; it is an ar"),
        ("scoring_func", 1, "scoring_func=1 must be a string; it is an integer"),
        ("topk_method", None, "topk_method=None must be a string; it is null"),
        ("model_type", {"v": 3}, "model_type=.* must be a string; it is an object"),
        ("torch_dtype", ["bfloat16"], r"torch_dtype=\['bfloat16'\] without a quantization"),
    ],
)
def test_config_fields_of_the_wrong_json_type_are_refused(tmp_path, key, value, match) -> None:
    """Never a raw TypeError (float(None), '2' > 1) nor a silent truth value ('false')."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf_config("bfloat16", **{key: value})))
    with pytest.raises(moelb.InvalidArgumentError, match=match) as info:
        deepseek_config_fields(path, LAYER)
    assert "config.json" in str(info.value)


def test_config_nulls_that_mean_absent_and_integral_numbers(tmp_path) -> None:
    """null is the models' 'none' for these four fields (V2's config class defaults them to
    None); a JSON integer is a number where a float is read."""
    cfg = hf_config(
        "bfloat16",
        n_shared_experts=None,
        n_group=None,
        num_nextn_predict_layers=None,
        num_hidden_layers=None,
        routed_scaling_factor=2,
    )
    fields = deepseek_config_fields(cfg, 9)
    assert fields["num_shared_experts"] == 0
    assert fields["num_groups"] is None and fields["topk_group"] is None
    assert fields["routed_scaling_factor"] == 2.0
    assert type(fields["routed_scaling_factor"]) is float
    with pytest.raises(moelb.InvalidArgumentError, match=r"layer_id=6 but .* has 6 layers"):
        deepseek_config_fields(hf_config("bfloat16", num_nextn_predict_layers=None), 6)


def test_moe_layer_freq_and_the_multi_token_prediction_layer() -> None:
    """DeepSeek (and SGLang's _is_layer_sparse): decoder layer i is MoE iff
    i >= first_k_dense_replace and i % moe_layer_freq == 0; the MTP layers after
    num_hidden_layers are MoE whatever their number."""
    cfg = hf_config("bfloat16", moe_layer_freq=2, first_k_dense_replace=1, num_hidden_layers=5)
    assert [k for k in range(6) if _is_moe(cfg, k)] == [2, 4, 5]


def _is_moe(cfg: dict, layer: int) -> bool:
    try:
        deepseek_config_fields(cfg, layer)
    except moelb.InvalidArgumentError as e:
        assert f"layer_id={layer} is a dense layer" in str(e)
        return False
    return True


def test_a_config_naming_a_field_twice_is_refused(tmp_path) -> None:
    text = json.dumps(hf_config("bfloat16"))
    (tmp_path / "config.json").write_text(text[:-1] + ', "n_group": 2}')
    with pytest.raises(moelb.InvalidArgumentError, match=r"config\.json names 'n_group' twice"):
        deepseek_config_fields(tmp_path / "config.json", LAYER)


def test_load_refuses_a_config_that_disagrees_with_the_weights(tmp_path) -> None:
    syn = make_layer("bfloat16")
    with pytest.raises(moelb.InvalidArgumentError, match=r"no config\.json"):
        load_moe_layer(write(tmp_path / "a", syn, "directory"), LAYER)
    cases = [
        (hf_config("fp8_e4m3"), "weight_format 'fp8_e4m3' but .* are 'bfloat16'"),
        (hf_config("bfloat16", hidden_size=512), "hidden_size 512 but .* has 320"),
        (hf_config("bfloat16", n_routed_experts=16), "num_experts 16 but .* has 8"),
        (hf_config("bfloat16", n_shared_experts=0), "shared intermediate size .* 0 but .* 256"),
    ]
    for k, (cfg, match) in enumerate(cases):
        with pytest.raises(moelb.InvalidArgumentError, match=match):
            load_moe_layer(write(tmp_path / f"c{k}", syn, "sharded", cfg), LAYER)


def test_load_checks_the_format_before_the_fp8_block_rows(tmp_path) -> None:
    """A bf16 config over FP8 weights whose I is off the 128-row block: the dtype disagreement
    is the error, not the block rows (which read_moe_layer_weights alone reports)."""
    syn = make_layer("fp8_e4m3", inter=192, shared=None)
    cfg = hf_config("bfloat16", moe_intermediate_size=192, n_shared_experts=0)
    path = write(tmp_path, syn, "sharded", cfg)
    with pytest.raises(
        moelb.InvalidArgumentError,
        match=r"weight_format 'bfloat16' but layer 3's expert weights .* are 'fp8_e4m3' "
        r"\(model\.layers\.3\.mlp\.experts\.0\.gate_proj\.weight is F8_E4M3\)",
    ):
        load_moe_layer(path, LAYER)
    with pytest.raises(moelb.InvalidArgumentError, match="is not a multiple of"):
        read_moe_layer_weights(path, LAYER)


BIAS = re.escape(P + "gate.e_score_correction_bias")
V2_GREEDY = dict(
    model_type="deepseek_v2", topk_method="greedy", scoring_func="softmax", n_group=1, topk_group=1
)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_requires_the_correction_bias_exactly_for_noaux_tc(tmp_path, layout) -> None:
    """reference/moe_layer.md section 2: the bias exists iff topk_method is 'noaux_tc' (and the
    layer is not a hash layer). Without it a V3 layer would route on the unbiased scores."""
    no_bias = make_layer("bfloat16", bias=False)
    with pytest.raises(
        moelb.InvalidArgumentError,
        match=rf"tensor '{BIAS}' is not in .* topk_method='noaux_tc', whose routing adds",
    ):
        load_moe_layer(write(tmp_path / "a", no_bias, layout, hf_config("bfloat16")), LAYER)
    # a deepseek_v3 config without topk_method means noaux_tc too
    cfg = {k: v for k, v in hf_config("bfloat16").items() if k != "topk_method"}
    with pytest.raises(moelb.InvalidArgumentError, match=r"is not in .* topk_method='noaux_tc'"):
        load_moe_layer(write(tmp_path / "b", no_bias, layout, cfg), LAYER)

    greedy = hf_config("bfloat16", **V2_GREEDY)
    with pytest.raises(
        moelb.InvalidArgumentError,
        match=rf"tensor '{BIAS}' is in .* topk_method='greedy', which has no correction",
    ):
        load_moe_layer(write(tmp_path / "c", make_layer("bfloat16"), layout, greedy), LAYER)
    weights, config = load_moe_layer(write(tmp_path / "d", no_bias, layout, greedy), LAYER)
    assert weights["correction_bias"] is None
    assert config.scoring == "softmax" and config.num_groups is None
    # a layer the checkpoint stores as a dense MLP is reported as such, not as a missing bias
    all_moe = hf_config("bfloat16", first_k_dense_replace=0)
    with pytest.raises(moelb.InvalidArgumentError, match="layer_id=0 is a dense MLP layer"):
        load_moe_layer(write(tmp_path / "e", no_bias, layout, all_moe), 0)


# --- end to end: load -> DeepSeekMoE -> forward against float64 ----------------------------------


def reference_forward(config, w: dict, x: np.ndarray) -> np.ndarray:
    """float64 forward of the dequantised weights (routing on float32 logits, as the layer)."""
    fmt = weight_format_of(w)
    block = tuple(getattr(config, "weight_block_size", (128, 128)))

    def deq(name: str, e: int | None = None) -> np.ndarray:
        q, s = w[name], w.get(name + "_scale_inv")
        if e is not None:
            q, s = q[e], None if s is None else s[e]
        return dequantize(q, s if fmt != "float32" else None, block)

    def mlp(xs: np.ndarray, gate_up: np.ndarray, down: np.ndarray) -> np.ndarray:
        gu = xs @ gate_up.T
        g, u = np.split(gu, 2, axis=1)
        return (g / (1 + np.exp(-g)) * u) @ down.T

    logits = x @ w["gate"].T
    ids, weights = reference_route(config, logits, w)
    x64 = x.astype(np.float64)
    out = np.zeros_like(x64)
    for e in range(config.num_experts):
        rows, cols = np.nonzero(ids == e)
        if len(rows):
            y = mlp(x64[rows], deq("w13", e), deq("w2", e))
            np.add.at(out, rows, weights[rows, cols, None].astype(np.float64) * y)
    out *= config.routed_scaling_factor
    return out + mlp(x64, deq("shared_gate_up"), deq("shared_down"))


#: Tolerance of the forward against float64, relative to the output's largest magnitude: float32
#: activations, float32 rounding of sums over H = 320 and I = 256 terms; bfloat16 activations
#: (the input is the reference's too), the output's bf16 rounding (2^-9) and intermediates the
#: layer may keep in bf16.
FORWARD_TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


@pytest.mark.parametrize("activation_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_loaded_layer_forward_matches_a_float64_reference(tmp_path, fmt, activation_dtype) -> None:
    syn = make_layer(fmt)
    path = write(tmp_path, syn, "sharded", hf_config(fmt))
    if HAS_FORMATS:
        weights, config = load_moe_layer(path, LAYER, activation_dtype=activation_dtype)
        assert config.weight_format == fmt and config.activation_dtype == activation_dtype
    elif fmt == "float32" and activation_dtype == "float32":
        # Before the formats exist the layer computes float32, which is exactly weight_format
        # float32 with float32 activations: the same fields without them.
        weights = read_moe_layer_weights(path, LAYER)
        fields = deepseek_config_fields(path / "config.json", LAYER)
        assert fields.pop("weight_format") == "float32"
        config = moelb.DeepSeekMoEConfig(**fields)
    else:
        pytest.skip(NEEDS_FORMATS)
    layer = moelb.DeepSeekMoE(config, weights)
    x = np.random.default_rng(5).standard_normal((33, SHAPE["hidden"])).astype(np.float32)
    if activation_dtype == "bfloat16":
        x = x.astype(ml_dtypes.bfloat16)
    got = layer(x)
    assert got.dtype == x.dtype
    want = reference_forward(config, weights, x.astype(np.float32))
    scale = np.abs(want).max()
    assert scale > 0
    np.testing.assert_allclose(
        got.astype(np.float64), want, rtol=0, atol=FORWARD_TOLERANCE[activation_dtype] * scale
    )


def test_v4_fields_swiglu_limit_and_hash_layers() -> None:
    """DeepSeek-V4's config.json: swiglu_limit becomes the layer's clamp (null: none); a layer
    below num_hash_layers routes by token id through tid2eid, which the loader does not read, so
    it is refused rather than loaded as a learned-routing layer."""
    cfg = hf_config("bfloat16", swiglu_limit=10.0, num_hash_layers=3)
    fields = deepseek_config_fields(cfg, LAYER)
    assert LAYER >= 3 and fields["swiglu_limit"] == 10.0
    assert "swiglu_limit" not in deepseek_config_fields(hf_config("bfloat16", swiglu_limit=None), 3)
    assert "swiglu_limit" not in deepseek_config_fields(hf_config("bfloat16"), LAYER)
    with pytest.raises(moelb.InvalidArgumentError, match=r"layer_id=2 is a hash layer"):
        deepseek_config_fields(hf_config("bfloat16", num_hash_layers=3, first_k_dense_replace=0), 2)
    with pytest.raises(moelb.InvalidArgumentError, match="swiglu_limit='10' must be a number"):
        deepseek_config_fields(hf_config("bfloat16", swiglu_limit="10"), LAYER)
