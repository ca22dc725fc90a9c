"""The cluster simulator: what EPLB and Waterfill buy on a DeepSeek-scale EP deployment.

    result = moelb.simulate(moelb.SimulationConfig(model="deepseek-v3", ep_size=32, num_nodes=4))
    result.algorithms["moelb"].predictive      # balancedness of the placement actually deployed

Traffic is either synthetic or replayed. Synthetic: per step and MoE layer, ``num_tokens`` router
logits (seeded noise plus a Zipf-like per-expert popularity of exponent ``skew`` whose hot experts
move over time at rate ``drift``) go through the real routers (``select_experts`` with the model's
V3/V4 config; ``HashRouter`` on V4 hash layers, fed token ids drawn from a Zipf law) into an
``ExpertDistributionRecorder``. Replayed: per-step logical counts from a recorder dump (SGLang's
``.pt``, or ``.json`` / ``.npz``).

Every ``rebalance_period`` steps (a window) the recorder's counts are planned with each algorithm
(``rebalance`` with ``previous`` = the placement in service, so moved experts are counted) and the
new placement serves the next window; window 0 runs the trivial placement. Scores, per step and
layer (SGLang's rate (mean + 1e-5) / (max + 1e-5) of the per-GPU loads, averaged over the
simulated MoE layers and the steps -- the mean over active layers: SGLang's logged balancedness
would also count the model's dense layers as 1.0):

- ``in_window``: the placement planned on window i, scored on window i (hindsight);
- ``predictive``: the placement planned on window i, scored on window i + 1 (what serving sees);
- ``bound_*``: mean / the flat lower bound of the max GPU load of any placement, per step: no
  placement scores higher;
- ``realised``, synthetic traffic only, token level, on the placements in service (windows >= 1):
  for each dispatch model of ``config.dispatch``, each source rank's tokens are dispatched as that
  model does, and ``waterfill_rank_loads`` adds the shared expert, computed on the token's own
  rank (``shared_local``) or where Waterfill sends it (``waterfill``). Replayed counts carry no
  tokens or source ranks, so ``realised`` is empty there.

The dispatch models (``SIMULATOR_DISPATCH``): the engines' models and moelb's table of
``moelb.DISPATCH_ALGORITHMS`` (``moelb.dispatch``); moelb's per-step dispatch, ours
(``BALANCED_DISPATCH``, DESIGN section 9): ``balanced`` (exact: the step's per-source counts
all-gathered, ``balanced_assignment``, each rank's tokens by ``dispatch_by_assignment``; the
optimal largest rank load of every step and layer), ``balanced_prob`` (the step's global counts,
``balanced_fractions``, seeded per-token picks), ``balanced_offline`` (the fractions of the counts
the placement in service was planned from, no per-step collective), ``balanced_joint`` (routed
replicas and the shared expert balanced in one flow; its ``waterfill`` figure is that joint
placement's, in place of Waterfill); and ``sglang_lp`` (``REFERENCE_DISPATCH``), a reference model
of SGLang's ``--ep-dispatch-algorithm lp`` reproduced on the CPU for measurement only
(``moelb.reference_dispatch``; SGLang serves it on Hopper for whitelisted models, not
DeepSeek-V4). ``moelb.simulation.token_level`` documents each.

Balancedness from counts splits each expert's load equally over its replicas (what EPLB plans
for); the realised figures come from the dispatched tokens, which the engines do not split
equally. Source ranks hold consecutive blocks of the step's tokens; the row-based models
(``vllm_hash``, ``round_robin``, ``sglang_dynamic_rank_invariant``) pick by token row, so with
very few tokens per rank they put most tokens on an expert's first replicas (as the engines do).

This module is the simulator's public face (DESIGN section 7); its parts live in
``moelb.simulation``, one concern per module: model presets, the config, synthetic and replayed
traffic, scoring, the placement policies, token-level dispatch, the results and the driver.
"""

from __future__ import annotations

from .simulation.config import (
    BALANCED_DISPATCH,
    LOCALITIES,
    REFERENCE_DISPATCH,
    SIMULATOR_DISPATCH,
    SimulationConfig,
    parse_algorithm,
)
from .simulation.driver import Progress as Progress
from .simulation.driver import simulate
from .simulation.presets import MODEL_PRESETS, ModelPreset
from .simulation.results import AlgorithmResult, DispatchResult, SimulationResult
from .simulation.scoring import score_steps, step_lower_bounds
from .simulation.traffic import BURST_TOPICS as BURST_TOPICS

__all__ = [
    "BALANCED_DISPATCH",
    "LOCALITIES",
    "MODEL_PRESETS",
    "REFERENCE_DISPATCH",
    "SIMULATOR_DISPATCH",
    "AlgorithmResult",
    "DispatchResult",
    "ModelPreset",
    "SimulationConfig",
    "SimulationResult",
    "parse_algorithm",
    "score_steps",
    "simulate",
    "step_lower_bounds",
]
