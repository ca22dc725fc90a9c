"""Token-level realisation of the simulator: each step's routed tokens, held by source ranks in
consecutive blocks, dispatched to physical slots as each dispatch model does, then the shared
expert on each token's own rank or placed by Waterfill; SGLang's balancedness of the resulting
per-GPU loads. DESIGN sections 2 and 9 (dispatch), 5 (Waterfill) and 7 (what the simulator
reports).

The models (``SIMULATOR_DISPATCH``):

- the engines' and moelb's table models of ``moelb.DISPATCH_ALGORITHMS`` (``moelb.dispatch``);
- moelb's per-step dispatch (ours, DESIGN section 9): ``balanced``, every source rank's counts of
  the step (one all-gather) -> ``balanced_assignment`` -> each rank's tokens by
  ``dispatch_by_assignment`` (the optimum ``ceil(T*)`` at token level); ``balanced_prob``, the
  step's global counts (one all-reduce) -> ``balanced_fractions`` -> ``dispatch_by_fractions``
  with the step's seed; ``balanced_offline``, the fractions of the counts of the window the
  placement in service was planned from (no per-step collective) -> ``dispatch_by_fractions``;
  ``balanced_joint``, the routed replicas and the shared expert in one flow (below);
- ``sglang_lp``: a reference model of SGLang's ``--ep-dispatch-algorithm lp``, for measurement
  only (``moelb.reference_dispatch``: its LP of the step's global counts, 5 float32 iterations,
  the 0.5 fallback, seeded per-token picks).

Waterfill then places the shared expert from each rank's routed physical ids, as for every model,
except under ``balanced_joint``: there the shared expert is a virtual logical expert E with one
replica in a shared slot on every rank (the per-rank shared-slot layout, S + 1 slots per rank,
``moelb.per_rank_shared_location``), each source rank adds one (token, E) pair per token with a
valid id to its counts, and ``balanced_assignment`` places routed and shared pairs together at
the optimal largest rank load of routed + shared work, with the fewest pairs leaving their rank,
then node -- what an engine runs with ``moelb.dispatch_balanced_joint``. Its third score is that
joint placement's, not Waterfill's; its routed-only score is the routed part of the joint
solution, which leaves room for the shared expert on purpose.

The "+shared local" score of every model puts one shared-expert token on its source rank per
token with a valid id (a row whose ids are all -1 carries none), as ``waterfill_rank_loads``'s
``shared_local`` and the joint flow's counts do.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .._core import ExpertLocation
from ..balancedness import utilization_rate
from ..dispatch import (
    TABLE_DISPATCH,
    _with_shared_expert_column,
    balanced_assignment,
    balanced_fractions,
    dispatch_by_assignment,
    dispatch_by_fractions,
    dispatch_tables,
    dispatch_tokens,
    per_rank_shared_location,
)
from ..reference_dispatch import sglang_lp_fractions, sglang_lp_sample
from ..step_time import LinkCopies, StepTimeModel
from ..waterfill import waterfill_rank_loads
from .config import SimulationConfig
from .policies import Policy
from .timing import StepTimer

__all__ = ["TokenLevel"]

#: Per step: (routed, +shared local, +Waterfill) balancedness (NaN: what cannot be placed);
#: balanced_joint: (routed, +shared local, +shared placed by the joint flow).
Scores = tuple[float, float, float]

#: The models that need the step's per-source counts.
_COUNTED = ("balanced", "balanced_prob", "balanced_joint", "sglang_lp")


class TokenLevel:
    """Realises steps at token level for ``config``: source rank r holds tokens
    ``bounds_tokens[r]:bounds_tokens[r + 1]`` of every step."""

    def __init__(
        self,
        config: SimulationConfig,
        num_physical_experts: int,
        time_model: StepTimeModel | None = None,
    ) -> None:
        W = config.ep_size
        self.config = config
        self.num_physical_experts = num_physical_experts
        self.num_logical_experts = config.preset().num_experts
        self.bounds_tokens = np.linspace(0, config.num_tokens, W + 1).astype(np.int64)
        self.source_rank = np.repeat(np.arange(W), np.diff(self.bounds_tokens))
        #: Times every realised step (``moelb.simulation.timing``); None: no time figures.
        self.timer = (
            None
            if time_model is None
            else StepTimer(time_model, config, num_physical_experts, self.source_rank)
        )
        #: sglang_lp per placement policy: [LP solves, solves that fell back to 0.5].
        self.lp_solves: dict[str, list[int]] = {}

    def realise(
        self, policies: Sequence[Policy], routed: Sequence[npt.NDArray[np.int32]], step: int
    ) -> None:
        """Appends to each policy's ``token``, per dispatch model of the config, the step's
        scores of its placement in service; ``routed``: the step's expert ids [T, K] per layer."""
        step_seed = _step_seed(self.config.seed, step)  # one stream per step, for every layer
        counted = any(name in _COUNTED for name in self.config.dispatch)
        source = self.source_counts(routed) if counted else None
        for policy in policies:
            for name in self.config.dispatch:
                policy.token.setdefault(name, []).append(
                    self._step(policy, name, routed, step_seed, source, step)
                )

    def dispatch(
        self, policy: Policy, dispatch: str, routed: Sequence[npt.NDArray[np.int32]], step: int
    ) -> list[npt.NDArray[np.int32]]:
        """Per layer, where ``dispatch`` sends step ``step``'s tokens on ``policy``'s placement
        in service: the physical ids [T, K] of every (token, column), rows in source-rank order;
        ``balanced_joint``: [T, K + 1] in ``moelb.per_rank_shared_location``'s layout, the last
        column the shared expert's slot (-1 for a token without a valid id). Not
        ``equal_split``."""
        step_seed = _step_seed(self.config.seed, step)
        return list(self._dispatch(policy, dispatch, routed, step_seed, self.source_counts(routed)))

    def source_counts(self, routed: Sequence[npt.NDArray[np.int32]]) -> npt.NDArray[np.int64]:
        """[L, W, E] int64: the tokens each source rank routed to each logical expert, per
        layer (what ``balanced``'s all-gather collects; summed over W, the all-reduced counts)."""
        W, E = self.config.ep_size, self.num_logical_experts
        out = np.empty((len(routed), W, E), dtype=np.int64)
        for layer, ids in enumerate(routed):
            key = self.source_rank[:, None] * E + ids
            out[layer] = np.bincount(key[ids >= 0], minlength=W * E).reshape(W, E)
        return out

    def _step(
        self,
        policy: Policy,
        dispatch: str,
        routed: Sequence[npt.NDArray[np.int32]],
        step_seed: int,
        source: npt.NDArray[np.int64] | None,
        step: int,
    ) -> Scores:
        """Mean over layers of the scores for one step, the tokens of every source rank
        dispatched by ``dispatch``; the step timed when the run has a time model."""
        totals = np.zeros(3)
        slots: list[npt.NDArray[Any]] = []  # per layer, for the timer
        copies: list[LinkCopies] = []
        timer = self.timer
        if dispatch == "equal_split":
            for layer, ids in enumerate(routed):
                totals += self._equal_split(policy.current, layer, ids)
                if timer is not None:
                    slots.append(self._equal_split_slots(policy.current, layer, ids))
            if timer is not None:
                # The copies of the same tokens dealt over each expert's replicas in turn
                # (round_robin: the equal split within one token per replica), from their real
                # source ranks, so DeepEP's per-(token, GPU) and per-(token, node) deduplication
                # is exact; fractional loads have no tokens to deduplicate.
                for physical in self._dispatch(policy, "round_robin", routed, step_seed, source):
                    copies.append(timer.slot_tokens_and_copies(physical)[1])
        elif dispatch == "balanced_joint":
            S = self.num_physical_experts // self.config.ep_size
            for physical in self._dispatch(policy, dispatch, routed, step_seed, source):
                totals += self._joint(physical)
                if timer is not None:
                    # The routed columns in the plain slot numbering (the shared one not timed).
                    routed_ids = physical[:, :-1]
                    plain = routed_ids // (S + 1) * S + routed_ids % (S + 1)
                    self._add_timed(np.where(routed_ids >= 0, plain, -1), slots, copies)
        else:
            for physical in self._dispatch(policy, dispatch, routed, step_seed, source):
                totals += self._dispatched(physical)
                if timer is not None:
                    self._add_timed(physical, slots, copies)
        if timer is not None:
            timer.add(policy.name, dispatch, step, np.stack(slots), LinkCopies.stack(copies))
        return tuple(totals / len(routed))  # type: ignore[return-value]

    def _add_timed(
        self,
        physical: npt.NDArray[Any],
        slots: list[npt.NDArray[Any]],
        copies: list[LinkCopies],
    ) -> None:
        """Appends one layer's slot loads and dispatch copies (its routed physical ids)."""
        assert self.timer is not None
        layer_slots, layer_copies = self.timer.slot_tokens_and_copies(physical)
        slots.append(layer_slots)
        copies.append(layer_copies)

    def _dispatch(
        self,
        policy: Policy,
        dispatch: str,
        routed: Sequence[npt.NDArray[np.int32]],
        step_seed: int,
        source: npt.NDArray[np.int64] | None,
    ) -> Iterator[npt.NDArray[np.int32]]:
        """Yields, per layer, the physical ids of the step's tokens under ``dispatch``."""
        location = policy.current
        if dispatch in TABLE_DISPATCH:
            if dispatch not in policy.tables:
                policy.tables[dispatch] = dispatch_tables(location, dispatch, seed=self.config.seed)
            for layer, ids in enumerate(routed):
                slots = policy.tables[dispatch][self.source_rank[:, None], layer, ids]
                yield np.where(ids >= 0, slots, -1)  # -1 (padding) stays -1
        elif dispatch == "balanced":
            assert source is not None
            assignment = balanced_assignment(source, location)  # [L, W, P], all layers at once
            for layer, ids in enumerate(routed):
                yield self._by_assignment(ids, location, layer, assignment[layer])
        elif dispatch in ("balanced_prob", "balanced_offline"):
            if dispatch == "balanced_prob":
                assert source is not None
                fractions = balanced_fractions(source.sum(axis=1), location, shares="any")
            else:
                fractions = self._offline_fractions(policy)
            for layer, ids in enumerate(routed):
                yield dispatch_by_fractions(ids, location, layer, fractions[layer], seed=step_seed)
        elif dispatch == "balanced_joint":
            assert source is not None
            if policy.joint_location is None:
                policy.joint_location = per_rank_shared_location(location)
            joint = policy.joint_location
            shared = np.stack([self._shared_local(ids) for ids in routed])  # [L, W]
            counts = np.concatenate([source, shared[:, :, None]], axis=2)  # [L, W, E + 1]
            assignment = balanced_assignment(counts, joint)  # [L, W, W * (S + 1)]
            for layer, ids in enumerate(routed):
                joint_ids = _with_shared_expert_column(ids, self.num_logical_experts)
                yield self._by_assignment(joint_ids, joint, layer, assignment[layer])
        elif dispatch == "sglang_lp":
            assert source is not None
            counts = source.sum(axis=1)
            tally = self.lp_solves.setdefault(policy.name, [0, 0])
            for layer, ids in enumerate(routed):
                lp = sglang_lp_fractions(counts[layer], location, layer)
                tally[0] += 1
                tally[1] += not lp.converged
                seed = _layer_seed(step_seed, layer)
                yield sglang_lp_sample(ids, lp.log2phy_prob, location, layer, seed)
        else:
            for layer, ids in enumerate(routed):
                yield dispatch_tokens(
                    ids,
                    location,
                    layer,
                    dispatch,
                    rank_offsets=self.bounds_tokens,
                    seed=step_seed,
                )

    def _by_assignment(
        self,
        ids: npt.NDArray[np.int32],
        location: ExpertLocation,
        layer: int,
        assignment: npt.NDArray[np.int64],
    ) -> npt.NDArray[np.int32]:
        """Each source rank's rows of ``ids`` dispatched by its row of ``assignment`` [W, P]."""
        bounds = self.bounds_tokens
        return np.concatenate(
            [
                dispatch_by_assignment(ids[bounds[r] : bounds[r + 1]], location, layer, row)
                for r, row in enumerate(assignment)
            ]
        )

    def _offline_fractions(self, policy: Policy) -> npt.NDArray[np.float64]:
        """balanced_offline's fractions [L, E, X] for the placement in service: the exact split
        of the counts of the window it was planned from (computed once per window)."""
        if policy.offline_fractions is None:
            assert policy.planned_from is not None, "token level runs from window 1 on"
            policy.offline_fractions = balanced_fractions(policy.planned_from, policy.current)
        return policy.offline_fractions

    def notes(self) -> list[str]:
        """What the run's reference models did that the figures alone do not say."""
        out = []
        for name, (solves, fallbacks) in self.lp_solves.items():
            if fallbacks:
                out.append(
                    f"sglang_lp (reference model) on {name}: the LP did not converge in "
                    f"{fallbacks:,} of {solves:,} (step, layer) solves; those used SGLang's "
                    "fallback (every copy's share 0.5)"
                )
        return out

    def _equal_split(
        self, location: ExpertLocation, layer: int, ids: npt.NDArray[np.int32]
    ) -> Scores:
        """Every (token, expert) split equally over the expert's replicas: fractional loads,
        which Waterfill cannot place."""
        W = self.config.ep_size
        S = self.num_physical_experts // W
        share = self._equal_split_slots(location, layer, ids)
        routed_load = share.reshape(W, S).sum(axis=1)
        return (
            _mean_over_max(routed_load),
            _mean_over_max(routed_load + self._shared_local(ids)),
            np.nan,
        )

    @staticmethod
    def _equal_split_slots(
        location: ExpertLocation, layer: int, ids: npt.NDArray[np.int32]
    ) -> npt.NDArray[np.float64]:
        """[P]: each slot's share of the layer's (token, expert) pairs when every expert's are
        split equally over its replicas."""
        counts = np.bincount(ids[ids >= 0], minlength=location.num_logical_experts)
        p2l = location.physical_to_logical[layer]
        return counts[p2l] / location.logical_count[layer][p2l]

    def _shared_local(self, ids: npt.NDArray[np.int32]) -> npt.NDArray[np.int64]:
        """[W]: the shared-expert tokens each source rank computes itself: its rows of ``ids``
        [T, C] (logical or physical) with a valid id; a row of -1 only carries none."""
        valid_rows = (ids >= 0).any(axis=1)
        return np.bincount(self.source_rank[valid_rows], minlength=self.config.ep_size)

    def _dispatched(self, physical: npt.NDArray[Any]) -> Scores:
        """Scores of one layer's tokens dispatched to the physical slots ``physical`` [T, K]."""
        W = self.config.ep_size
        S = self.num_physical_experts // W
        routed_load = np.bincount(physical[physical >= 0] // S, minlength=W)
        if self.config.waterfill is None:
            local = _mean_over_max(routed_load + self._shared_local(physical))
            return (_mean_over_max(routed_load), local, np.nan)
        bounds = self.bounds_tokens
        batches = [physical[bounds[r] : bounds[r + 1]] for r in range(W)]
        loads = waterfill_rank_loads(batches, self.num_physical_experts, mode=self.config.waterfill)
        return (
            _mean_over_max(routed_load),
            loads.balancedness_local,
            loads.balancedness_waterfill,
        )

    def _joint(self, physical: npt.NDArray[np.int32]) -> Scores:
        """Scores of one layer under ``balanced_joint``: ``physical`` [T, K + 1] in the per-rank
        shared-slot layout, the last column the shared expert's slot."""
        W = self.config.ep_size
        rank = physical // (self.num_physical_experts // W + 1)
        valid = physical >= 0
        routed_load = np.bincount(rank[:, :-1][valid[:, :-1]], minlength=W)
        shared_load = np.bincount(rank[:, -1][valid[:, -1]], minlength=W)
        return (
            _mean_over_max(routed_load),
            _mean_over_max(routed_load + self._shared_local(physical[:, :-1])),
            _mean_over_max(routed_load + shared_load),
        )


def _mean_over_max(loads: npt.NDArray[Any]) -> float:
    """SGLang's utilization rate of one layer's per-GPU loads."""
    return float(utilization_rate(float(loads.mean()), float(loads.max())))


def _step_seed(seed: int, step: int) -> int:
    """The per-step seed of the per-token dispatch draws (a fresh stream every step)."""
    return int(np.random.default_rng([seed, 7, step]).integers(0, 2**62))


def _layer_seed(step_seed: int, layer: int) -> int:
    """The seed of one layer's per-token draws within a step (sglang_lp's sampler takes one
    seed per call)."""
    return int(np.random.default_rng([step_seed, layer]).integers(0, 2**62))
