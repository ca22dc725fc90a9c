"""Token-level realisation of the simulator: each step's routed tokens, held by source ranks in
consecutive blocks, dispatched to physical slots as each engine's dispatch model does
(``moelb.dispatch``), then the shared expert on each token's own rank or placed by Waterfill;
SGLang's balancedness of the resulting per-GPU loads. DESIGN sections 2 and 9 (dispatch), 5
(Waterfill) and 7 (what the simulator reports)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .._core import ExpertLocation
from ..balancedness import utilization_rate
from ..dispatch import TABLE_DISPATCH, dispatch_tables, dispatch_tokens
from ..waterfill import waterfill_rank_loads
from .config import SimulationConfig
from .policies import Policy

__all__ = ["TokenLevel"]

#: Per step: (routed, +shared local, +Waterfill) balancedness (NaN: what cannot be placed).
Scores = tuple[float, float, float]


class TokenLevel:
    """Realises steps at token level for ``config``: source rank r holds tokens
    ``bounds_tokens[r]:bounds_tokens[r + 1]`` of every step."""

    def __init__(self, config: SimulationConfig, num_physical_experts: int) -> None:
        W = config.ep_size
        self.config = config
        self.num_physical_experts = num_physical_experts
        self.bounds_tokens = np.linspace(0, config.num_tokens, W + 1).astype(np.int64)
        self.source_rank = np.repeat(np.arange(W), np.diff(self.bounds_tokens))
        self.tokens_per_rank = np.diff(self.bounds_tokens).astype(np.float64)

    def realise(
        self, policies: Sequence[Policy], routed: Sequence[npt.NDArray[np.int32]], step: int
    ) -> None:
        """Appends to each policy's ``token``, per dispatch model of the config, the step's
        scores of its placement in service; ``routed``: the step's expert ids [T, K] per layer."""
        step_seed = _step_seed(self.config.seed, step)  # one stream per step, for every layer
        for policy in policies:
            for name in self.config.dispatch:
                policy.token.setdefault(name, []).append(
                    self._step(policy, name, routed, step_seed)
                )

    def _step(
        self,
        policy: Policy,
        dispatch: str,
        routed: Sequence[npt.NDArray[np.int32]],
        step_seed: int,
    ) -> Scores:
        """Mean over layers of the scores for one step, the tokens of every source rank
        dispatched by ``dispatch``."""
        location = policy.current
        if dispatch in TABLE_DISPATCH and dispatch not in policy.tables:
            policy.tables[dispatch] = dispatch_tables(location, dispatch, seed=self.config.seed)
        totals = np.zeros(3)
        for layer, ids in enumerate(routed):
            if dispatch == "equal_split":
                totals += self._equal_split(location, layer, ids)
                continue
            if dispatch in TABLE_DISPATCH:
                physical = policy.tables[dispatch][self.source_rank[:, None], layer, ids]
            else:
                physical = dispatch_tokens(
                    ids,
                    location,
                    layer,
                    dispatch,
                    rank_offsets=self.bounds_tokens,
                    seed=step_seed,
                )
            totals += self._dispatched(physical)
        return tuple(totals / len(routed))  # type: ignore[return-value]

    def _equal_split(
        self, location: ExpertLocation, layer: int, ids: npt.NDArray[np.int32]
    ) -> Scores:
        """Every (token, expert) split equally over the expert's replicas: fractional loads,
        which Waterfill cannot place."""
        W = self.config.ep_size
        S = self.num_physical_experts // W
        counts = np.bincount(ids.ravel(), minlength=location.num_logical_experts)
        p2l = location.physical_to_logical[layer]
        share = counts[p2l] / location.logical_count[layer][p2l]
        routed_load = share.reshape(W, S).sum(axis=1)
        return (
            _mean_over_max(routed_load),
            _mean_over_max(routed_load + self.tokens_per_rank),
            np.nan,
        )

    def _dispatched(self, physical: npt.NDArray[Any]) -> Scores:
        """Scores of one layer's tokens dispatched to the physical slots ``physical`` [T, K]."""
        W = self.config.ep_size
        S = self.num_physical_experts // W
        routed_load = np.bincount(physical.ravel() // S, minlength=W)
        if self.config.waterfill is None:
            local = _mean_over_max(routed_load + self.tokens_per_rank)
            return (_mean_over_max(routed_load), local, np.nan)
        bounds = self.bounds_tokens
        batches = [physical[bounds[r] : bounds[r + 1]] for r in range(W)]
        loads = waterfill_rank_loads(batches, self.num_physical_experts, mode=self.config.waterfill)
        return (
            _mean_over_max(routed_load),
            loads.balancedness_local,
            loads.balancedness_waterfill,
        )


def _mean_over_max(loads: npt.NDArray[Any]) -> float:
    """SGLang's utilization rate of one layer's per-GPU loads."""
    return float(utilization_rate(float(loads.mean()), float(loads.max())))


def _step_seed(seed: int, step: int) -> int:
    """The per-step seed of the per-token dispatch draws (a fresh stream every step)."""
    return int(np.random.default_rng([seed, 7, step]).integers(0, 2**62))
