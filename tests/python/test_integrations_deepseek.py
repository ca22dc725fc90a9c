"""moelb.integrations.deepseek: DeepSeek eplb.py's ``rebalance_experts`` contract
(reference/integrations.md, reference/eplb.md section 1.2).

- The contract under both algorithms: int64 CPU tensors of DeepSeek's shapes, ``log2phy`` listing
  exactly each expert's slots and ``-1``-padded to the call's largest replica count, every expert
  placed, the divisibility eplb.py asserts on raised as an ``AssertionError``.
- ``algorithm="deepseek"`` equals eplb.py, as ported in benchmarks/deepseek_eplb_reference.py (the
  reference test_eplb.py holds moelb's planner to; its PyTorch port mirrors eplb.py's tensor code
  with a stable sort), on tie-free loads across topologies -- replica order included -- and on
  the README example (which has a tie) exactly.
- ``algorithm="moelb"`` returns moelb's plan; bad input is a typed error naming the parameter;
  importing the integrations imports neither PyTorch nor an engine.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import moelb
import numpy as np
import pytest
from moelb.integrations import EnginePreconditionError

torch = pytest.importorskip("torch")
from moelb.integrations.deepseek import rebalance_experts  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))
import deepseek_eplb_reference as ds_ref  # noqa: E402

README_WEIGHT = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]
# reference/eplb.md 1.8: eplb.py's output on the README example.
README_PHY2LOG = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]
README_LOG2PHY = [
    [[12, -1], [15, 13], [11, -1], [6, -1], [7, 5], [0, 2], [1, -1], [3, -1], [4, -1], [9, -1],
     [8, 10], [14, -1]],
    [[13, -1], [15, 11], [8, -1], [14, -1], [9, -1], [10, 12], [2, 4], [0, -1], [6, 3], [7, -1],
     [1, -1], [5, -1]],
]  # fmt: skip
README_LOGCNT = [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]

# (L, E, num_replicas, num_groups, num_nodes, num_gpus): hierarchical (K % N == 0) on 1, 2, 4
# nodes, global (K % N != 0), one slot per GPU, no redundant slot, many copies of one expert.
TOPOLOGIES = [
    (3, 16, 24, 4, 2, 8),
    (2, 32, 48, 8, 4, 16),
    (2, 24, 32, 4, 1, 4),
    (2, 24, 32, 3, 2, 8),
    (2, 12, 16, 1, 1, 16),
    (2, 16, 16, 4, 2, 4),
    (1, 8, 64, 2, 2, 8),
    (4, 64, 80, 8, 2, 8),
]


def tie_free_weight(rng: np.random.Generator, num_layers: int, num_experts: int) -> np.ndarray:
    """float32 loads drawn from a continuous range: no two loads, group sums or per-replica
    loads tie (eplb.py's own order under ties follows torch's unstable sort)."""
    return rng.uniform(1.0, 1000.0, (num_layers, num_experts)).astype(np.float32)


def check_contract(result: tuple, num_layers: int, num_experts: int, num_replicas: int) -> None:
    """DeepSeek's return triple: dtypes, device, shapes, padding, every expert placed."""
    phy2log, log2phy, logcnt = result
    for tensor in result:
        assert isinstance(tensor, torch.Tensor)
        assert tensor.dtype == torch.int64 and tensor.device.type == "cpu"
    assert tuple(phy2log.shape) == (num_layers, num_replicas)
    assert tuple(logcnt.shape) == (num_layers, num_experts)
    width = int(logcnt.max())
    assert tuple(log2phy.shape) == (num_layers, num_experts, width)
    p2l, l2p, cnt = phy2log.numpy(), log2phy.numpy(), logcnt.numpy()
    assert p2l.min() >= 0 and p2l.max() < num_experts
    assert (cnt >= 1).all() and (cnt.sum(axis=1) == num_replicas).all()  # every expert placed
    for layer in range(num_layers):
        assert (np.bincount(p2l[layer], minlength=num_experts) == cnt[layer]).all()
        for expert in range(num_experts):
            row = l2p[layer, expert]
            count = cnt[layer, expert]
            assert sorted(row[:count]) == np.flatnonzero(p2l[layer] == expert).tolist()
            assert (row[count:] == -1).all()


@pytest.mark.parametrize("algorithm", ["moelb", "deepseek"])
@pytest.mark.parametrize("topology", TOPOLOGIES, ids=lambda t: "x".join(map(str, t)))
def test_contract(algorithm: str, topology: tuple[int, ...]) -> None:
    num_layers, num_experts, num_replicas, num_groups, num_nodes, num_gpus = topology
    weight = torch.from_numpy(
        tie_free_weight(np.random.default_rng(sum(topology)), num_layers, num_experts)
    )
    result = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus, algorithm)
    check_contract(result, num_layers, num_experts, num_replicas)


@pytest.mark.parametrize("topology", TOPOLOGIES, ids=lambda t: "x".join(map(str, t)))
@pytest.mark.parametrize("seed", range(3))
def test_deepseek_equals_eplb_py(topology: tuple[int, ...], seed: int) -> None:
    num_layers, num_experts, num_replicas, num_groups, num_nodes, num_gpus = topology
    weight = tie_free_weight(np.random.default_rng([seed, *topology]), num_layers, num_experts)
    ours = rebalance_experts(
        torch.from_numpy(weight), num_replicas, num_groups, num_nodes, num_gpus, "deepseek"
    )
    theirs = ds_ref.rebalance_experts_torch(
        torch.from_numpy(weight), num_replicas, num_groups, num_nodes, num_gpus
    )
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.shape == reference.shape
        assert torch.equal(mine, reference)


def test_deepseek_equals_eplb_py_on_counts() -> None:
    """Integer counts (what the recorders give), as int64 tensors, converted by .float()."""
    rng = np.random.default_rng(7)
    counts = torch.from_numpy(rng.permutation(np.arange(1, 58 * 256 + 1)).reshape(58, 256) * 3)
    ours = rebalance_experts(counts, 288, 8, 4, 32, algorithm="deepseek")
    theirs = ds_ref.rebalance_experts_torch(counts, 288, 8, 4, 32)
    for mine, reference in zip(ours, theirs, strict=True):
        assert torch.equal(mine, reference)


def test_readme_example_exactly() -> None:
    """eplb.py's published output, including the replica order of layer 1's expert 8, whose
    replicas tie with expert 9 (86 tokens each)."""
    phy2log, log2phy, logcnt = rebalance_experts(
        torch.tensor(README_WEIGHT), 16, 4, 2, 8, algorithm="deepseek"
    )
    assert phy2log.tolist() == README_PHY2LOG
    assert log2phy.tolist() == README_LOG2PHY
    assert logcnt.tolist() == README_LOGCNT


def test_global_fallback_when_groups_do_not_divide_nodes() -> None:
    """num_groups % num_nodes != 0 selects the global policy (no error), as in eplb.py."""
    weight = tie_free_weight(np.random.default_rng(3), 2, 12)
    ours = rebalance_experts(torch.from_numpy(weight), 16, 3, 2, 8, algorithm="deepseek")
    glob = ds_ref.rebalance_experts_torch(torch.from_numpy(weight), 16, 1, 1, 8)
    for mine, reference in zip(ours, glob, strict=True):
        assert torch.equal(mine, reference)


def test_moelb_is_moelbs_plan() -> None:
    weight = tie_free_weight(np.random.default_rng(11), 4, 32)
    phy2log, log2phy, _ = rebalance_experts(torch.from_numpy(weight), 48, 4, 2, 8)
    plan = moelb.rebalance(weight.astype(np.float64), 48, 4, 2, 8, "moelb")
    assert (phy2log.numpy() == plan.location.physical_to_logical).all()
    # No creation order under moelb: replicas in ascending slot order, as ExpertLocation lists.
    l2p = plan.location.logical_to_physical
    width = log2phy.shape[2]
    assert (log2phy.numpy() == l2p[:, :, :width]).all() and (l2p[:, :, width:] == -1).all()


def test_moelb_previous_keeps_slots() -> None:
    """previous=: experts that stay keep their slots. A placement with each GPU's slots permuted
    has the plan's balance; against it the plan moves nothing."""
    weight = tie_free_weight(np.random.default_rng(5), 3, 16)
    phy2log, _, _ = rebalance_experts(weight, 24, 4, 2, 8)
    shuffled = phy2log.numpy().reshape(3, 8, 3)[:, :, ::-1].reshape(3, 24).copy()
    assert not (shuffled == phy2log.numpy()).all()
    kept, _, _ = rebalance_experts(weight, 24, 4, 2, 8, previous=torch.from_numpy(shuffled))
    assert (kept.numpy() == shuffled).all()


@pytest.mark.parametrize("algorithm", ["moelb", "deepseek"])
@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((15, 4, 2, 8), "num_replicas=15 is not a multiple of num_gpus=8"),
        ((8, 4, 2, 8), "num_replicas=8 is smaller than the 12 logical experts"),
    ],
)
def test_divisibility_asserts(algorithm: str, args: tuple[int, ...], match: str) -> None:
    weight = tie_free_weight(np.random.default_rng(0), 2, 12)
    with pytest.raises(AssertionError, match=match) as info:
        rebalance_experts(weight, *args, algorithm=algorithm)
    # Also moelb's typed error, a ValueError.
    assert isinstance(info.value, moelb.InvalidArgumentError)
    assert isinstance(info.value, EnginePreconditionError)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((16, 5, 1, 8), "num_logical_experts=12 is not a multiple of num_groups=5"),
        ((18, 2, 2, 9), "num_gpus=9 is not a multiple of num_nodes=2"),
    ],
)
def test_deepseek_hierarchical_asserts(args: tuple[int, ...], match: str) -> None:
    """eplb.py asserts on them (with num_groups % num_nodes == 0); moelb plans them without node
    locality."""
    weight = tie_free_weight(np.random.default_rng(0), 2, 12)
    with pytest.raises(AssertionError, match=match):
        rebalance_experts(weight, *args, algorithm="deepseek")
    check_contract(rebalance_experts(weight, *args, algorithm="moelb"), 2, 12, args[0])


@pytest.mark.parametrize(
    ("weight", "kwargs", "match"),
    [
        ([[1.0, -2.0]], {}, r"weight\[0, 1\] = .*-2.0.* is not a finite load >= 0"),
        ([[1.0, float("nan")]], {}, r"weight\[0, 1\] = nan is not a finite load"),
        ([1.0, 2.0], {}, r"weight must have shape \[num_layers, num_logical_experts\]"),
        ([["a", "b"]], {}, "weight must hold numbers"),
        ([[1.0, 2.0]], {"algorithm": "greedy"}, "algorithm='greedy' is not one of"),
        (
            [[1.0, 2.0]],
            {"locality": "node", "algorithm": "deepseek"},
            "apply to algorithm 'moelb' only",
        ),
        ([[1.0, 2.0]], {"windows": 3}, "unknown option"),
        ([[1.0, 2.0]], {"num_gpus": True}, "num_gpus must be a positive integer, got True"),
        ([[1.0, 2.0]], {"num_replicas": 0}, "num_replicas must be a positive integer, got 0"),
    ],
)
def test_bad_input(weight: list, kwargs: dict, match: str) -> None:
    args = {"num_replicas": 2, "num_groups": 1, "num_nodes": 1, "num_gpus": 2}
    args.update(kwargs)
    with pytest.raises(moelb.InvalidArgumentError, match=match) as info:
        rebalance_experts(weight, **args)
    assert not isinstance(info.value, AssertionError)


def test_input_forms_agree() -> None:
    """A tensor (any float or int dtype), a NumPy array and lists give one plan."""
    weight = np.random.default_rng(4).integers(1, 10_000, (2, 16))
    plans = [
        rebalance_experts(form, 24, 4, 2, 8, algorithm=algorithm)
        for algorithm in ("moelb", "deepseek")
        for form in (
            weight,
            weight.tolist(),
            torch.from_numpy(weight),
            torch.tensor(weight).float(),
        )
    ]
    for first in (plans[0], plans[4]):
        group = plans[:4] if first is plans[0] else plans[4:]
        for other in group:
            assert all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_imports_neither_torch_nor_an_engine() -> None:
    code = (
        "import sys, moelb, moelb.integrations, moelb.integrations.deepseek, "
        "moelb.integrations.sglang, moelb.integrations.vllm\n"
        "loaded = sorted(m for m in ('torch', 'sglang', 'vllm') if m in sys.modules)\n"
        "print(loaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
