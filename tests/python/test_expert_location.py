"""ExpertLocation: construction and validation, derived maps, read-only views, pickling, and the
logical -> physical dispatch (static table, random, round robin). DESIGN.md section 2."""

from __future__ import annotations

import gc
import pickle

import moelb
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st


def test_trivial_layout() -> None:
    loc = moelb.ExpertLocation.trivial(2, 16, 24, 4, num_nodes=2)
    assert (loc.num_layers, loc.num_logical_experts, loc.num_physical_experts) == (2, 16, 24)
    assert (loc.ep_size, loc.num_nodes, loc.num_local_physical_experts) == (4, 2, 6)
    assert loc.max_replicas == 2
    expected_p2l = np.tile(np.arange(24) % 16, (2, 1))
    np.testing.assert_array_equal(loc.physical_to_logical, expected_p2l)
    assert loc.physical_to_logical.dtype == np.int32
    count = np.where(np.arange(16) < 8, 2, 1)
    np.testing.assert_array_equal(loc.logical_count, np.tile(count, (2, 1)))
    l2p = np.stack([np.arange(16), np.where(np.arange(16) < 8, np.arange(16) + 16, -1)], axis=1)
    np.testing.assert_array_equal(loc.logical_to_physical, np.stack([l2p, l2p]))
    assert loc.logical_to_physical.shape == (2, 16, 2)


def test_trivial_equals_explicit_constructor() -> None:
    explicit = moelb.ExpertLocation(np.tile(np.arange(12) % 8, (3, 1)), 8, 4)
    assert explicit == moelb.ExpertLocation.trivial(3, 8, 12, 4)
    assert explicit != moelb.ExpertLocation.trivial(3, 8, 12, 2)
    assert explicit != moelb.ExpertLocation.trivial(2, 8, 12, 4)


def random_placement(rng: np.random.Generator, layers: int, experts: int, slots: int) -> np.ndarray:
    """[layers, slots]: every expert at least once, the extra slots random experts, shuffled."""
    rows = []
    for _ in range(layers):
        extra = rng.integers(0, experts, slots - experts)
        rows.append(rng.permutation(np.concatenate([np.arange(experts), extra])))
    return np.array(rows)


def test_logical_to_physical_and_count_follow_the_placement() -> None:
    rng = np.random.default_rng(0)
    p2l = random_placement(rng, 3, 10, 40)
    loc = moelb.ExpertLocation(p2l, 10, ep_size=8, num_nodes=2)
    count = np.stack([np.bincount(row, minlength=10) for row in p2l])
    np.testing.assert_array_equal(loc.logical_count, count)
    assert loc.max_replicas == count.max()
    for layer in range(3):
        for expert in range(10):
            slots = np.flatnonzero(p2l[layer] == expert)
            row = loc.logical_to_physical[layer, expert]
            np.testing.assert_array_equal(row[: len(slots)], slots)  # ascending slots
            np.testing.assert_array_equal(row[len(slots) :], -1)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((np.array([[0, 1, 2, 4]]), 4, 1), r"physical_to_logical\[0, 3\] = 4"),
        ((np.array([[0, 1, -1, 2]]), 3, 1), r"physical_to_logical\[0, 2\] = -1"),
        (
            (np.array([[0, 1, 2, 3], [0, 1, 1, 3]]), 4, 2),
            "logical expert 2 has no replica in layer 1",
        ),
        (
            (np.array([[0, 1, 2, 0, 1, 2]]), 3, 4),
            "num_physical_experts=6 is not divisible by ep_size=4",
        ),
        ((np.array([[0, 1, 2, 3]]), 4, 4, 3), "ep_size=4 is not divisible by num_nodes=3"),
        ((np.array([[0, 1, 2, 3]]), 6, 2), "num_physical_experts=4 is smaller"),
        ((np.array([[0, 1]]), 2, 0), "ep_size"),
        ((np.array([[0, 1]]), 2, 1, 0), "num_nodes"),
        ((np.array([[0, 1]]), 0, 1), "num_logical_experts"),
        ((np.zeros((0, 4), dtype=np.int32), 4, 1), "physical_to_logical"),
        ((np.array([0, 1, 2, 3]), 4, 1), "physical_to_logical must be 2-D"),
        ((np.array([[0, 1, 2, 2**40]]), 3, 1), "physical_to_logical"),
    ],
)
def test_validation_errors(args, match: str) -> None:
    with pytest.raises(moelb.InvalidArgumentError, match=match):
        moelb.ExpertLocation(*args)


def test_float_placement_is_a_dtype_error() -> None:
    with pytest.raises(moelb.InvalidDTypeError, match="physical_to_logical"):
        moelb.ExpertLocation(np.array([[0.0, 1.0]]), 2, 1)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 4, 4, 1), "num_layers"),
        ((1, 0, 4, 1), "num_logical_experts"),
        ((1, 8, 4, 1), "num_physical_experts=4"),
        ((1, 4, 6, 4), "ep_size=4"),
        ((1, 4, 8, 4, 3), "num_nodes=3"),
    ],
)
def test_trivial_validation_errors(args, match: str) -> None:
    with pytest.raises(moelb.InvalidArgumentError, match=match):
        moelb.ExpertLocation.trivial(*args)


def test_accepts_any_integer_dtype() -> None:
    p2l = np.array([[1, 0, 1, 0]], dtype=np.uint8)
    loc = moelb.ExpertLocation(p2l, 2, 2)
    np.testing.assert_array_equal(loc.physical_to_logical, p2l)
    assert moelb.ExpertLocation([[1, 0, 1, 0]], 2, 2) == loc


@pytest.mark.parametrize("name", ["physical_to_logical", "logical_to_physical", "logical_count"])
def test_views_are_read_only_and_keep_their_owner_alive(name: str) -> None:
    def make_view() -> np.ndarray:
        return getattr(moelb.ExpertLocation.trivial(2, 8, 12, 4), name)

    view = make_view()  # the location itself is gone
    gc.collect()
    _ = [np.full(1000, 7) for _ in range(100)]  # reuse freed memory if it was freed
    expected = getattr(moelb.ExpertLocation.trivial(2, 8, 12, 4), name)
    np.testing.assert_array_equal(view, expected)
    assert not view.flags.writeable
    with pytest.raises(ValueError):
        view.flat[0] = 3


def test_pickle_round_trip() -> None:
    rng = np.random.default_rng(4)
    loc = moelb.ExpertLocation(random_placement(rng, 2, 12, 24), 12, ep_size=6, num_nodes=3)
    clone = pickle.loads(pickle.dumps(loc))
    assert clone == loc
    assert clone is not loc
    assert (clone.num_nodes, clone.ep_size, clone.num_logical_experts) == (3, 6, 12)
    np.testing.assert_array_equal(clone.logical_to_physical, loc.logical_to_physical)
    np.testing.assert_array_equal(moelb_table(clone, 2, 9), moelb_table(loc, 2, 9))


def test_repr_names_the_shape() -> None:
    text = repr(moelb.ExpertLocation.trivial(2, 8, 12, 4, 2))
    for part in ("num_layers=2", "num_logical_experts=8", "num_physical_experts=12", "ep_size=4"):
        assert part in text


# ---------------------------------------------------------------------------------------------
# Static dispatch


def check_static_table(loc: moelb.ExpertLocation, seed: int) -> None:
    """The static dispatch rules of DESIGN.md section 2 / expert_location.hpp, checked for every
    (layer, expert, rank): own rank's lowest replica; else a replica on the same node, the node's
    replica-less ranks spread evenly over the node's replicas; else all replicas, the ranks of
    replica-less nodes spread evenly."""
    w, n = loc.ep_size, loc.num_nodes
    s = loc.num_local_physical_experts
    rpn = w // n
    tables = np.stack([moelb_table(loc, rank, seed) for rank in range(w)])  # [W, L, E]
    assert tables.shape == (w, loc.num_layers, loc.num_logical_experts)
    for layer in range(loc.num_layers):
        for expert in range(loc.num_logical_experts):
            reps = loc.logical_to_physical[layer, expert]
            reps = reps[reps >= 0]
            rep_rank = reps // s
            rep_node = rep_rank // rpn
            chosen = tables[:, layer, expert]
            np.testing.assert_array_equal(loc.physical_to_logical[layer][chosen], expert)
            node_users: dict[int, list[int]] = {}
            global_users: list[int] = []
            for rank in range(w):
                own = reps[rep_rank == rank]
                if own.size:
                    assert chosen[rank] == own.min(), (layer, expert, rank)
                elif (rep_node == rank // rpn).any():
                    assert chosen[rank] in reps[rep_node == rank // rpn], (layer, expert, rank)
                    node_users.setdefault(rank // rpn, []).append(int(chosen[rank]))
                else:
                    global_users.append(int(chosen[rank]))
            for node, users in node_users.items():
                candidates = reps[rep_node == node]
                assert_even(users, candidates)
            if global_users:
                assert_even(global_users, reps)


def assert_even(users: list[int], candidates: np.ndarray) -> None:
    """Each candidate serves floor or ceil of len(users) / len(candidates) users."""
    counts = np.array([users.count(int(c)) for c in candidates])
    assert counts.sum() == len(users)
    low, high = len(users) // len(candidates), -(-len(users) // len(candidates))
    assert ((counts >= low) & (counts <= high)).all(), (users, candidates)


def test_static_table_of_the_trivial_layout_by_hand() -> None:
    # 4 ranks of 6 slots on 2 nodes; expert e < 8 lives in slots e (rank 0) and e + 16 (rank 2).
    loc = moelb.ExpertLocation.trivial(1, 16, 24, 4, num_nodes=2)
    tables = np.stack([moelb_table(loc, rank)[0] for rank in range(4)])
    np.testing.assert_array_equal(tables[:, 0], [0, 0, 16, 16])  # own rank, then same node
    np.testing.assert_array_equal(tables[:, 7], [7, 7, 23, 23])
    np.testing.assert_array_equal(tables[:, 8], [8, 8, 8, 8])  # a single replica serves all
    np.testing.assert_array_equal(tables[:, 15], [15, 15, 15, 15])


def test_static_table_sglang_example() -> None:
    # reference/routing_waterfill.md 7.3: 4 GPUs / 2 nodes, 2 slots per GPU, expert i in [2i, 2i+1].
    loc = moelb.ExpertLocation(np.array([[0, 0, 1, 1, 2, 2, 3, 3]]), 4, 4, 2)
    rank0 = moelb_table(loc, 0)[0]
    assert rank0[0] == 0  # own GPU, lowest slot
    assert rank0[1] in (2, 3)  # same node
    assert rank0[2] in (4, 5) and rank0[3] in (6, 7)  # remote: any replica
    check_static_table(loc, seed=0)


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_static_table_rules_on_random_placements(seed: int) -> None:
    rng = np.random.default_rng(seed)
    loc = moelb.ExpertLocation(random_placement(rng, 3, 12, 32), 12, ep_size=16, num_nodes=4)
    check_static_table(loc, seed)


@given(
    num_nodes=st.sampled_from([1, 2, 4]),
    ranks_per_node=st.integers(1, 4),
    slots_per_rank=st.integers(1, 4),
    data=st.data(),
)
def test_static_table_rules_property(num_nodes, ranks_per_node, slots_per_rank, data) -> None:
    w = num_nodes * ranks_per_node
    p = w * slots_per_rank
    e = data.draw(st.integers(1, p))
    seed = data.draw(st.integers(0, 2**32))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32)))
    loc = moelb.ExpertLocation(random_placement(rng, 2, e, p), e, w, num_nodes)
    check_static_table(loc, seed)


def test_static_table_seed_determinism_and_variability() -> None:
    # 8 ranks on 4 nodes, 64 slots for 32 experts: many ranks choose among several remote (or
    # same-node) replicas, and that choice depends on the seed only.
    rng = np.random.default_rng(8)
    loc = moelb.ExpertLocation(random_placement(rng, 2, 32, 64), 32, ep_size=8, num_nodes=4)
    for rank in range(8):
        np.testing.assert_array_equal(moelb_table(loc, rank, 3), moelb_table(loc, rank, 3))
    tables = [np.stack([moelb_table(loc, r, seed) for r in range(8)]) for seed in range(6)]
    assert any(not np.array_equal(tables[0], t) for t in tables[1:])


def test_static_table_errors() -> None:
    loc = moelb.ExpertLocation.trivial(1, 4, 8, 4)
    with pytest.raises(moelb.InvalidArgumentError, match="ep_rank=4"):
        moelb_table(loc, 4)
    with pytest.raises(moelb.InvalidArgumentError, match="ep_rank=-1"):
        moelb_table(loc, -1)
    with pytest.raises(moelb.InvalidArgumentError, match="seed"):
        moelb_table(loc, 0, -2)


# ---------------------------------------------------------------------------------------------
# dispatch()


def moelb_table(loc: moelb.ExpertLocation, rank: int, seed: int = 0) -> np.ndarray:
    return moelb.dispatch_table(loc, "moelb_static", rank, seed)


def location_dispatch(loc, ids, layer, ep_rank=0, algorithm="moelb_static", seed=0):
    return moelb.dispatch_tokens(ids, loc, layer, algorithm, ep_rank=ep_rank, seed=seed)


def dispatch_fixture():
    rng = np.random.default_rng(10)
    loc = moelb.ExpertLocation(random_placement(rng, 2, 8, 24), 8, ep_size=4, num_nodes=2)
    ids = rng.integers(0, 8, (5000, 4)).astype(np.int32)
    ids[::7, 1] = -1
    return loc, ids


def test_dispatch_static_is_the_table() -> None:
    loc, ids = dispatch_fixture()
    for layer in range(2):
        for rank in range(4):
            out = location_dispatch(loc, ids, layer, rank, "moelb_static", 3)
            table = moelb_table(loc, rank, 3)[layer]
            np.testing.assert_array_equal(out, np.where(ids >= 0, table[ids], -1))
    np.testing.assert_array_equal(
        location_dispatch(loc, ids, 1), location_dispatch(loc, ids, 1, 0, "moelb_static", 0)
    )


def test_dispatch_round_robin() -> None:
    loc, ids = dispatch_fixture()
    tokens = np.arange(ids.shape[0])[:, None]
    for layer in range(2):
        for rank in range(4):
            out = location_dispatch(loc, ids, layer, rank, "round_robin")
            count = loc.logical_count[layer][ids]
            index = (tokens + rank) % count
            expected = loc.logical_to_physical[layer][ids, index]
            np.testing.assert_array_equal(out, np.where(ids >= 0, expected, -1))


def test_dispatch_random() -> None:
    loc, ids = dispatch_fixture()
    # One node: a rank without its own replica keeps the whole list (SGLang's collapse).
    loc = moelb.ExpertLocation(loc.physical_to_logical, 8, ep_size=4, num_nodes=1)
    out = location_dispatch(loc, ids, 1, 2, "sglang_dynamic", 7)
    valid = ids >= 0
    np.testing.assert_array_equal(out[~valid], -1)
    np.testing.assert_array_equal(loc.physical_to_logical[1][out[valid]], ids[valid])
    np.testing.assert_array_equal(
        out, location_dispatch(loc, ids, 1, 2, "sglang_dynamic", 7)
    )  # seeded
    assert not np.array_equal(out, location_dispatch(loc, ids, 1, 2, "sglang_dynamic", 8))
    # Roughly uniform over an expert's replicas.
    for expert in range(8):
        reps = loc.logical_to_physical[1, expert]
        reps = reps[reps >= 0]
        picked = out[ids == expert]
        if len(reps) > 1 and not (reps // loc.num_local_physical_experts == 2).any():
            shares = np.array([(picked == r).mean() for r in reps])
            assert (np.abs(shares - 1 / len(reps)) < 0.05).all(), (expert, shares)


def test_dispatch_returns_a_new_array() -> None:
    loc, ids = dispatch_fixture()
    before = ids.copy()
    out = location_dispatch(loc, ids, 0, 0, "sglang_dynamic", 1)
    np.testing.assert_array_equal(ids, before)
    assert out.dtype == np.int32 and out.shape == ids.shape


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layer": 2}, "layer=2"),
        ({"layer": 0, "ep_rank": 4}, "ep_rank=4"),
        ({"layer": 0, "algorithm": "lp"}, "dispatch"),
        ({"layer": 0, "seed": -1}, "seed"),
    ],
)
def test_dispatch_argument_errors(kwargs: dict, match: str) -> None:
    loc, ids = dispatch_fixture()
    with pytest.raises(moelb.InvalidArgumentError, match=match):
        location_dispatch(loc, ids, **kwargs)


@pytest.mark.parametrize("bad", [8, -2])
def test_dispatch_id_out_of_range(bad: int) -> None:
    loc, ids = dispatch_fixture()
    ids[3, 2] = bad
    with pytest.raises(moelb.InvalidArgumentError, match=rf"topk_ids\[3, 2\] = {bad}"):
        location_dispatch(loc, ids, 0)


def test_dispatch_array_errors() -> None:
    loc, ids = dispatch_fixture()
    with pytest.raises(moelb.InvalidDTypeError, match="topk_ids"):
        location_dispatch(loc, ids.astype(np.int64), 0)
    with pytest.raises(moelb.InvalidArgumentError, match="C-contiguous"):
        location_dispatch(loc, ids[:, ::2], 0)
    with pytest.raises(moelb.InvalidArgumentError, match="topk_ids must be 2-D"):
        location_dispatch(loc, ids[0], 0)
