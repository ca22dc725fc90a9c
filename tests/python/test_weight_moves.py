"""Weight-move plans (DESIGN.md section 4; reference/eplb.md section 2.9): SGLang's
test_expert_location_updater ported as a one-process planner test. Random old/new placements over
many (ep_size, nodes, S, E) shapes, redundant experts included: executing every rank's operations
reproduces the new placement exactly (weights encode the logical id), every receive matches a
send, unchanged slots are never written, each needed expert arrives once per rank, sources are
node-local whenever the receiver's node holds the expert, and the counters add up."""

from __future__ import annotations

from collections import Counter
from typing import Any

import moelb
import numpy as np
import pytest
from moelb import ExpertLocation, InvalidArgumentError, apply_weight_moves, plan_weight_moves

KIND_ORDER = {"copy": 0, "send": 1, "recv": 2, "fanout": 3}


def random_row(rng: np.random.Generator, experts: int, slots: int) -> np.ndarray:
    """Every expert at least once, the extra slots random experts, shuffled (as SGLang's test)."""
    extra = rng.integers(0, experts, slots - experts)
    return rng.permutation(np.concatenate([np.arange(experts), extra]))


def perturbed_row(rng: np.random.Generator, old: np.ndarray, experts: int) -> np.ndarray:
    """`old` with a few slots rewritten, a few swapped, or one rank's slots permuted; still a
    valid placement."""
    while True:
        new = old.copy()
        mode = rng.integers(3)
        if mode == 0:
            where = rng.choice(len(new), size=int(rng.integers(1, max(2, len(new) // 3))))
            new[where] = rng.integers(0, experts, len(where))
        elif mode == 1:
            for _ in range(int(rng.integers(1, 4))):
                a, b = rng.integers(0, len(new), 2)
                new[a], new[b] = new[b], new[a]
        else:
            new = rng.permutation(new)
        if len(np.unique(new)) == experts:
            return new


def random_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    """(old [L, P], new [L, P], E, ep_size, nodes) of a random shape."""
    ep_size = int(rng.choice([1, 2, 3, 4, 6, 8, 12, 16]))
    nodes = int(rng.choice([n for n in (1, 2, 3, 4, 8) if ep_size % n == 0]))
    slots = ep_size * int(rng.integers(1, 7))
    experts = int(rng.integers(1, slots + 1))
    layers = int(rng.integers(1, 3))
    old = np.stack([random_row(rng, experts, slots) for _ in range(layers)])
    if rng.random() < 0.5:
        new = np.stack([random_row(rng, experts, slots) for _ in range(layers)])
    else:
        new = np.stack([perturbed_row(rng, row, experts) for row in old])
    return old, new, experts, ep_size, nodes


def check_plan(
    plan: moelb.WeightMovePlan, old_row: np.ndarray, new_row: np.ndarray, nodes: int
) -> None:
    """Every structural guarantee of a plan, from its per-rank operations."""
    ep_size, slots_per_rank = plan.ep_size, plan.slots_per_rank
    old = old_row.reshape(ep_size, slots_per_rank)
    new = new_row.reshape(ep_size, slots_per_rank)
    ranks_per_node = ep_size // nodes

    def node(rank: int) -> int:
        return rank // ranks_per_node

    def holds(rank: int, expert: int) -> bool:
        return bool((old[rank] == expert).any())

    sends: Counter[tuple[int, int, int]] = Counter()  # (sender, receiver, expert)
    recvs: Counter[tuple[int, int, int]] = Counter()
    arrivals: Counter[tuple[int, int]] = Counter()  # (rank, expert)
    intra = copies = 0
    for rank in range(ep_size):
        ops = plan.ops(rank)
        kinds = [KIND_ORDER[op[0]] for op in ops]
        assert kinds == sorted(kinds), f"rank {rank}: copies, sends, receives, fan-outs: {ops}"
        written: list[int] = []
        received_slots: set[int] = set()
        for kind, expert, src, dst, peer in ops:
            if kind == "send":
                assert dst == -1 and 0 <= src < slots_per_rank and 0 <= peer < ep_size
                assert old[rank, src] == expert, "a send reads a slot holding the expert"
                assert peer != rank
                assert not holds(peer, expert), "never sent to a rank that already held it"
                sends[rank, peer, expert] += 1
                continue
            assert 0 <= dst < slots_per_rank and new[rank, dst] == expert
            assert old[rank, dst] != expert, "an unchanged slot is never written"
            written.append(dst)
            if kind == "recv":
                assert src == -1 and 0 <= peer < ep_size and peer != rank
                assert not holds(rank, expert), "only an expert the rank lacks is received"
                assert holds(peer, expert), "the sender held the expert"
                node_has_it = any(
                    holds(r, expert)
                    for r in range(node(rank) * ranks_per_node, (node(rank) + 1) * ranks_per_node)
                )
                if node_has_it:
                    assert node(peer) == node(rank), "received from another node needlessly"
                recvs[peer, rank, expert] += 1
                arrivals[rank, expert] += 1
                intra += node(peer) == node(rank)
                received_slots.add(dst)
            elif kind == "copy":
                assert peer == -1 and old[rank, src] == expert
                copies += 1
            else:  # fanout: from a slot this rank receives the expert into
                assert kind == "fanout" and peer == -1
                assert src in received_slots and new[rank, src] == expert
                copies += 1
        changed = np.flatnonzero(old[rank] != new[rank]).tolist()
        assert sorted(written) == changed, f"rank {rank}: each changed slot written exactly once"
        # Sends and receives are sorted by (expert, peer) so that both ends agree on the order.
        send_keys = [(e, p) for k, e, _, _, p in ops if k == "send"]
        recv_keys = [(e, p) for k, e, _, _, p in ops if k == "recv"]
        assert send_keys == sorted(send_keys) and recv_keys == sorted(recv_keys)
    assert sends == recvs, "every receive has a matching send and vice versa"
    for rank in range(ep_size):
        for expert in np.unique(new[rank]):
            needed = not holds(rank, int(expert))
            assert arrivals[rank, int(expert)] == int(needed), (rank, expert)
    assert max(arrivals.values(), default=0) <= 1
    # The same sequence of experts leaves q for r as r receives from q.
    for q in range(ep_size):
        for r in range(ep_size):
            out = [e for k, e, _, _, p in plan.ops(q) if k == "send" and p == r]
            into = [e for k, e, _, _, p in plan.ops(r) if k == "recv" and p == q]
            assert out == into
    total = sum(recvs.values())
    assert plan.transfers == total == plan.intra_node_transfers + plan.inter_node_transfers
    assert plan.intra_node_transfers == intra
    assert plan.local_copies == copies
    assert plan.unchanged_slots == int((old == new).sum())


def check_execution(plan: moelb.WeightMovePlan, old_row: np.ndarray, new_row: np.ndarray) -> None:
    """simulate and apply_weight_moves reproduce the new placement; unchanged slots keep their
    exact contents."""
    slots = len(old_row)
    np.testing.assert_array_equal(plan.simulate(old_row.astype(np.int64)), new_row)
    # Contents unique per slot: an unchanged slot must keep its own value, a changed one must get
    # a copy of some old slot holding its new expert.
    tagged = old_row.astype(np.int64) * 100_000 + np.arange(slots)
    out = plan.simulate(tagged)
    unchanged = old_row == new_row
    np.testing.assert_array_equal(out[unchanged], tagged[unchanged])
    np.testing.assert_array_equal(out // 100_000, new_row)
    np.testing.assert_array_equal(old_row[out % 100_000], new_row)
    # Weights [ep_size, S, 2, 3] encoding the logical id, as SGLang's test does.
    shape = (plan.ep_size, plan.slots_per_rank)
    weights = old_row.reshape(shape)[:, :, None, None] * 10.0 + np.arange(6.0).reshape(2, 3)
    expected = new_row.reshape(shape)[:, :, None, None] * 10.0 + np.arange(6.0).reshape(2, 3)
    # The plan records both rows; its executor needs the placement the weights hold (any valid
    # row holds every expert 0..max, and only row plan.layer is compared).
    np.testing.assert_array_equal(plan.old_physical_to_logical, old_row)
    np.testing.assert_array_equal(plan.new_physical_to_logical, new_row)
    holding = ExpertLocation(
        np.tile(old_row, (plan.layer + 1, 1)), int(old_row.max()) + 1, plan.ep_size
    )
    result = apply_weight_moves(plan, weights, location=holding)
    np.testing.assert_array_equal(result, expected)
    assert result.dtype == weights.dtype
    np.testing.assert_array_equal(weights[:, :, 0, 0], old_row.reshape(shape) * 10.0)  # untouched


# ---------------------------------------------------------------------------------------------
# Random placements
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_random_placements(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(50):
        old, new, experts, ep_size, nodes = random_case(rng)
        old_loc = ExpertLocation(old, experts, ep_size, nodes)
        new_loc = ExpertLocation(new, experts, ep_size, nodes)
        for layer in range(old.shape[0]):
            plan = plan_weight_moves(old_loc, new_loc, layer)
            assert (plan.layer, plan.ep_size) == (layer, ep_size)
            assert plan.slots_per_rank == old.shape[1] // ep_size
            check_plan(plan, old[layer], new[layer], nodes)
            check_execution(plan, old[layer], new[layer])


# SGLang's grid (test_expert_location_updater.py): nnodes in {1, 2, 4}, E in {2, 5, 20, 256},
# P in {8, 16, 256, 288}, on 8 to 144 ranks.
GRID = [
    (8, nodes, experts, slots)
    for nodes in (1, 2, 4)
    for experts, slots in ((2, 8), (5, 16), (20, 256), (256, 256), (256, 288))
] + [(32, 4, 256, 288), (144, 8, 256, 288), (16, 16, 20, 32)]


@pytest.mark.parametrize(("ep_size", "nodes", "experts", "slots"), GRID)
def test_sglang_grid(ep_size: int, nodes: int, experts: int, slots: int) -> None:
    rng = np.random.default_rng(ep_size * 1000 + nodes * 100 + experts + slots)
    transitions = 6 if ep_size < 100 else 2
    rows = [random_row(rng, experts, slots) for _ in range(transitions + 1)]
    locations = [ExpertLocation(row[None], experts, ep_size, nodes) for row in rows]
    for old, new, old_row, new_row in zip(
        locations[:-1], locations[1:], rows[:-1], rows[1:], strict=True
    ):
        plan = plan_weight_moves(old, new, 0)
        check_plan(plan, old_row, new_row, nodes)
        check_execution(plan, old_row, new_row)


def test_senders_share_the_work_evenly_on_one_node() -> None:
    """With one node, the ranks needing an expert are split over its holders in near-equal
    runs: each holder sends that expert to the same number of ranks, give or take one."""
    rng = np.random.default_rng(20)
    for _ in range(40):
        ep_size, experts = 16, int(rng.integers(2, 8))
        slots = ep_size * 2
        old_row, new_row = random_row(rng, experts, slots), random_row(rng, experts, slots)
        old = ExpertLocation(old_row[None], experts, ep_size)
        plan = plan_weight_moves(old, ExpertLocation(new_row[None], experts, ep_size), 0)
        check_plan(plan, old_row, new_row, 1)
        for expert in range(experts):
            holders = np.unique(np.flatnonzero(old_row == expert) // 2)
            sent = Counter(
                rank
                for rank in range(ep_size)
                for k, e, *_ in plan.ops(rank)
                if k == "send" and e == expert
            )
            per_holder = [sent[int(h)] for h in holders]
            if sum(per_holder):
                assert max(per_holder) - min(per_holder) <= 1, (expert, per_holder)


def test_cross_node_only_when_the_node_lacks_the_expert() -> None:
    # 2 nodes x 2 ranks x 2 slots. Expert 3 lives only on node 1; ranks 0 and 1 (node 0) need it
    # and must fetch it across; expert 0 lives on node 0 and rank 1 takes it from rank 0.
    old = np.array([0, 1, 2, 1, 3, 2, 3, 1])
    new = np.array([0, 3, 0, 3, 3, 2, 1, 2])
    old_loc = ExpertLocation(old[None], 4, 4, 2)
    plan = plan_weight_moves(old_loc, ExpertLocation(new[None], 4, 4, 2), 0)
    check_plan(plan, old, new, 2)
    check_execution(plan, old, new)
    assert plan.inter_node_transfers == 2  # expert 3 to ranks 0 and 1
    assert plan.intra_node_transfers == 2  # expert 0 to rank 1, expert 2 to rank 3
    assert ("recv", 0, -1, 0, 0) in plan.ops(1)
    assert ("recv", 2, -1, 1, 2) in plan.ops(3)
    # Bytes, for an expert of 44 MiB (DeepSeek-V3's FP8 w1, w3, w2).
    expert = 3 * 7168 * 2048
    assert plan.moved_bytes(expert) == {
        "intra_node": 2 * expert,
        "inter_node": 2 * expert,
        "transferred": 4 * expert,
        "local": plan.local_copies * expert,
    }
    assert plan.moved_bytes(0)["transferred"] == 0
    with pytest.raises(moelb.InvalidArgumentError, match="expert_bytes must be non-negative"):
        plan.moved_bytes(-1)
    with pytest.raises(moelb.InvalidArgumentError, match="overflows a 64-bit byte count"):
        plan.moved_bytes(2**62)
    # 4 transfers: each product fits, their sum must too.
    with pytest.raises(moelb.InvalidArgumentError, match="overflows a 64-bit byte count"):
        plan.moved_bytes((2**63 - 1) // 3)
    assert plan.moved_bytes((2**63 - 1) // 4)["transferred"] > 0
    # The two cross-node receivers are spread over the two holders of expert 3.
    assert {op[4] for r in (0, 1) for op in plan.ops(r) if op[0] == "recv" and op[1] == 3} == {2, 3}


def test_redundant_copies_on_one_rank_arrive_once_and_fan_out() -> None:
    # 2 ranks x 4 slots. Every expert each rank needs is already local: copies only.
    old = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    new = np.array([3, 3, 3, 0, 1, 2, 0, 1])
    plan = plan_weight_moves(ExpertLocation(old[None], 4, 2), ExpertLocation(new[None], 4, 2), 0)
    check_plan(plan, old, new, 1)
    check_execution(plan, old, new)
    assert plan.transfers == 0 and plan.local_copies == 8
    # Rank 1 lacks expert 3 and wants it in three slots: one receive, two fan-outs.
    old = np.array([0, 1, 2, 3, 0, 1, 2, 2])
    new = np.array([0, 1, 2, 3, 3, 3, 3, 2])
    plan = plan_weight_moves(ExpertLocation(old[None], 4, 2), ExpertLocation(new[None], 4, 2), 0)
    check_plan(plan, old, new, 1)
    check_execution(plan, old, new)
    assert plan.ops(1) == [("recv", 3, -1, 0, 0), ("fanout", 3, 0, 1, -1), ("fanout", 3, 0, 2, -1)]
    assert plan.ops(0) == [("send", 3, 3, -1, 1)]
    assert (plan.transfers, plan.local_copies, plan.unchanged_slots) == (1, 2, 5)


def test_no_change_plan_has_no_operations() -> None:
    rng = np.random.default_rng(21)
    for ep_size, nodes, experts, slots in [(8, 2, 12, 16), (4, 1, 4, 4), (16, 4, 20, 48)]:
        rows = np.stack([random_row(rng, experts, slots) for _ in range(3)])
        loc = ExpertLocation(rows, experts, ep_size, nodes)
        twin = ExpertLocation(rows.copy(), experts, ep_size, nodes)
        for layer in range(3):
            plan = plan_weight_moves(loc, twin, layer)
            assert all(plan.ops(rank) == [] for rank in range(ep_size))
            assert plan.transfers == plan.local_copies == 0
            assert plan.unchanged_slots == slots
            np.testing.assert_array_equal(plan.simulate(rows[layer].astype(np.int64)), rows[layer])


def test_moves_within_ranks_need_no_transfers() -> None:
    rng = np.random.default_rng(22)
    old = np.stack([random_row(rng, 10, 24) for _ in range(2)])
    new = old.reshape(2, 6, 4)[:, :, ::-1].reshape(2, 24)  # each rank reverses its slots
    plan = plan_weight_moves(ExpertLocation(old, 10, 6, 2), ExpertLocation(new, 10, 6, 2), 1)
    check_plan(plan, old[1], new[1], 2)
    check_execution(plan, old[1], new[1])
    assert plan.transfers == 0
    assert all(op[0] == "copy" for rank in range(6) for op in plan.ops(rank))


def test_plans_between_planner_placements() -> None:
    rng = np.random.default_rng(23)
    load = rng.lognormal(3, 1, (4, 64))
    trivial = ExpertLocation.trivial(4, 64, 80, 16, 2)
    first = moelb.rebalance(load, 80, 8, 2, 16, previous=trivial).location
    second = moelb.rebalance(load * rng.uniform(0.5, 1.5, load.shape), 80, 8, 2, 16).location
    for old, new in [(trivial, first), (first, second), (second, trivial)]:
        for layer in range(4):
            plan = plan_weight_moves(old, new, layer)
            old_row = old.physical_to_logical[layer]
            new_row = new.physical_to_logical[layer]
            check_plan(plan, old_row, new_row, 2)
            check_execution(plan, old_row, new_row)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

BASE = ExpertLocation.trivial(2, 8, 16, 4, 2)


@pytest.mark.parametrize(
    "other",
    [
        ExpertLocation.trivial(3, 8, 16, 4, 2),  # layers
        ExpertLocation.trivial(2, 8, 24, 4, 2),  # physical experts
        ExpertLocation.trivial(2, 8, 16, 8, 2),  # ep_size
        ExpertLocation.trivial(2, 8, 16, 4, 1),  # nodes
        ExpertLocation.trivial(2, 6, 16, 4, 2),  # logical experts
    ],
)
def test_locations_of_different_shapes(other: ExpertLocation) -> None:
    with pytest.raises(InvalidArgumentError, match="old and new locations differ in shape"):
        plan_weight_moves(BASE, other, 0)
    with pytest.raises(InvalidArgumentError, match="old and new locations differ in shape"):
        plan_weight_moves(other, BASE, 0)


@pytest.mark.parametrize(
    ("layer", "match"),
    [
        (-1, r"layer=-1 is outside \[0, num_layers=2\)"),
        (2, r"layer=2 is outside \[0, num_layers=2\)"),
        (2**40, r"layer=1099511627776 does not fit"),
    ],
)
def test_layer_out_of_range(layer: int, match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        plan_weight_moves(BASE, BASE, layer)


@pytest.mark.parametrize("shape", [(16,), (4, 5, 3), (2, 4, 3), (4,), (8, 2)])
def test_weights_of_the_wrong_shape(shape: tuple[int, ...]) -> None:
    plan = plan_weight_moves(BASE, ExpertLocation.trivial(2, 8, 16, 4, 2), 0)
    with pytest.raises(InvalidArgumentError, match=r"weights has shape .* \[4, 4, \.\.\.\]"):
        apply_weight_moves(plan, np.zeros(shape), location=BASE)


@pytest.mark.parametrize(
    ("contents", "error", "match"),
    [
        (np.zeros(15, dtype=np.int64), InvalidArgumentError, r"contents has 15 slots .* 16"),
        (np.zeros(17, dtype=np.int64), InvalidArgumentError, r"contents has 17 slots"),
        (np.zeros(16), moelb.InvalidDTypeError, r"contents must hold integers"),
    ],
)
def test_simulate_rejects_bad_contents(contents: Any, error: type, match: str) -> None:
    plan = plan_weight_moves(BASE, BASE, 1)
    with pytest.raises(error, match=match):
        plan.simulate(contents)


def test_ops_rank_out_of_range() -> None:
    plan = plan_weight_moves(BASE, BASE, 0)
    for rank in (-1, 4):
        with pytest.raises(
            InvalidArgumentError, match=rf"ep_rank={rank} is outside \[0, ep_size=4\)"
        ):
            plan.ops(rank)


# ---------------------------------------------------------------------------------------------
# A plan applies only to the placement it was made from
# ---------------------------------------------------------------------------------------------


SHUFFLED = ExpertLocation(
    np.stack([np.roll(np.arange(16) % 8, 5), np.arange(16)[::-1] % 8]).astype(np.int32), 8, 4, 2
)


def test_plan_records_what_it_moves_from_and_to() -> None:
    plan = plan_weight_moves(BASE, SHUFFLED, 0)
    np.testing.assert_array_equal(plan.old_physical_to_logical, BASE.physical_to_logical[0])
    np.testing.assert_array_equal(plan.new_physical_to_logical, SHUFFLED.physical_to_logical[0])
    assert plan.old_physical_to_logical.dtype == np.int32
    with pytest.raises(ValueError, match="read-only"):
        plan.old_physical_to_logical[0] = 1
    # The fingerprint tells transitions apart and is the same for the same transition.
    assert plan.fingerprint == plan_weight_moves(BASE, SHUFFLED, 0).fingerprint
    others = [
        plan_weight_moves(SHUFFLED, BASE, 0),
        plan_weight_moves(BASE, SHUFFLED, 1),
        plan_weight_moves(BASE, BASE, 0),
    ]
    assert len({plan.fingerprint, *(other.fingerprint for other in others)}) == 4
    plan.check_source(BASE)
    plan.check_target(SHUFFLED)
    with pytest.raises(
        InvalidArgumentError, match=r"^old is not the placement the plan moves from"
    ):
        plan.check_source(SHUFFLED, "old")
    with pytest.raises(
        InvalidArgumentError, match=r"^location is not the placement the plan moves to"
    ):
        plan.check_target(BASE)


def test_apply_needs_the_placement_the_weights_hold() -> None:
    plan = plan_weight_moves(BASE, SHUFFLED, 0)
    weights = BASE.physical_to_logical[0].reshape(4, 4).astype(np.float64)
    held = weights.copy()
    with pytest.raises(TypeError, match="location"):
        apply_weight_moves(plan, weights)  # type: ignore[call-arg]
    moved = apply_weight_moves(plan, weights, location=BASE)
    np.testing.assert_array_equal(moved.reshape(-1), SHUFFLED.physical_to_logical[0])
    np.testing.assert_array_equal(weights, held)
    # A plan applied to weights that hold another placement (here: the moved weights, i.e. the
    # same plan twice) is refused before anything is computed.
    with pytest.raises(
        InvalidArgumentError,
        match=r"location is not the placement the plan moves from: in layer 0 slot 0 \(rank 0\) "
        r"holds expert 3 where the plan has expert 0 \(a stale plan, or weights that were "
        r"already moved\)",
    ):
        apply_weight_moves(plan, moved, location=SHUFFLED)
    stale = plan_weight_moves(SHUFFLED, BASE, 1)  # made from SHUFFLED, applied to BASE
    with pytest.raises(InvalidArgumentError, match=r"in layer 1 slot 0 .* expert 0 where .* 7"):
        apply_weight_moves(stale, weights, location=BASE)
    with pytest.raises(TypeError, match="location must be an ExpertLocation"):
        apply_weight_moves(plan, weights, location=BASE.physical_to_logical[0])


@pytest.mark.parametrize(
    "other",
    [
        ExpertLocation.trivial(1, 8, 16, 4, 2),  # no layer 1
        ExpertLocation.trivial(2, 8, 24, 4, 2),  # physical experts
        ExpertLocation.trivial(2, 8, 16, 8, 2),  # ep_size
    ],
)
def test_apply_to_a_placement_of_another_shape(other: ExpertLocation) -> None:
    plan = plan_weight_moves(BASE, SHUFFLED, 1)
    with pytest.raises(InvalidArgumentError, match=r"location has .* but the plan moves layer 1"):
        apply_weight_moves(plan, np.zeros((4, 4)), location=other)


def test_apply_weight_moves_reads_torch_weights_or_says_why() -> None:
    """A requires_grad CPU tensor is read (the result is a new array); a bf16 tensor is a typed
    error naming weights (before: torch's RuntimeError / TypeError)."""
    torch = pytest.importorskip("torch")
    old = moelb.ExpertLocation(np.array([[0, 1, 2, 3]], np.int32), 4, 2)
    new = moelb.ExpertLocation(np.array([[2, 1, 0, 3]], np.int32), 4, 2)
    plan = moelb.plan_weight_moves(old, new, 0)
    weights = torch.arange(12, dtype=torch.float32).reshape(2, 2, 3).requires_grad_()
    moved = moelb.apply_weight_moves(plan, weights, location=old)
    want = moelb.apply_weight_moves(plan, weights.detach().numpy().copy(), location=old)
    np.testing.assert_array_equal(moved, want)
    with pytest.raises(moelb.InvalidDTypeError, match=r"weights has dtype torch\.bfloat16"):
        moelb.apply_weight_moves(plan, weights.detach().bfloat16(), location=old)
