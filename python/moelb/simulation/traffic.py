"""Synthetic traffic of the simulator: router logits with a Zipf-like expert popularity whose hot
experts drift (and co-activated bursts), token ids for hash layers, and the model's real routers
that turn them, step by step, into routed expert ids counted by an ``ExpertDistributionRecorder``.
DESIGN sections 1 and 3 (routers, recorder) as used by the simulator (section 7)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from ..recorder import ExpertDistributionRecorder
from ..routing import HashRouter, select_experts
from .config import SimulationConfig
from .presets import ModelPreset

__all__ = ["BURST_TOPICS", "SyntheticRouting", "SyntheticTraffic"]

BURST_TOPICS = 16  # co-activated expert sets per layer (SimulationConfig.bursts)


class SyntheticTraffic:
    """Router inputs with Zipf-like expert popularity whose hot experts drift.

    Layer l's expert e has log-popularity shift z[rank] with z = log(1 / rank^skew) centred, and
    its rank in a random permutation per (layer, phase); at step t the phase is drift * t and the
    shift is blended linearly between consecutive phases' permutations. Logits = noise + shift,
    noise standard normal (rows of a seeded bank at random offsets, its columns rotated by a random
    offset per step: cheap, and no two steps share an expert's noise). With
    bursts > 0, step t's topic (seeded by layer and step) among the layer's BURST_TOPICS fixed
    expert sets gets + bursts on its experts' logits. Token ids (hash layers) are drawn from a Zipf
    law of exponent 1 over the vocabulary (natural text).
    """

    def __init__(self, preset: ModelPreset, num_layers: int, config: SimulationConfig) -> None:
        self.num_experts = preset.num_experts
        self.num_tokens = config.num_tokens
        self.skew, self.drift, self.seed = config.skew, config.drift, config.seed
        self.bursts = config.bursts
        self.num_layers = num_layers
        self.rng = np.random.default_rng([config.seed, 1])
        z = -config.skew * np.log(np.arange(1, self.num_experts + 1, dtype=np.float64))
        self.z = z - z.mean()
        bank_rows = max(4 * config.num_tokens, 8192)
        self.bank = self.rng.standard_normal((bank_rows, self.num_experts), dtype=np.float32)
        self._phases: dict[tuple[int, int], npt.NDArray[np.float64]] = {}
        ranks = np.arange(1, preset.vocab_size + 1, dtype=np.float64)
        cdf = np.cumsum(1.0 / ranks)
        self.token_cdf = cdf / cdf[-1]
        self.token_perm = np.random.default_rng([config.seed, 2]).permutation(preset.vocab_size)

    def _phase_shift(self, layer: int, phase: int) -> npt.NDArray[np.float64]:
        key = (layer, phase)
        if key not in self._phases:
            perm = np.random.default_rng([self.seed, 3, layer, phase]).permutation(self.num_experts)
            shift = np.empty(self.num_experts)
            shift[perm] = self.z
            if len(self._phases) > 4 * self.num_layers:  # keep the recent phases only
                self._phases.pop(next(iter(self._phases)))
            self._phases[key] = shift
        return self._phases[key]

    def shift(self, layer: int, step: int) -> npt.NDArray[np.float32]:
        position = self.drift * step
        phase = int(position)
        frac = position - phase
        shift = self._phase_shift(layer, phase)
        if frac > 0:
            shift = (1 - frac) * shift + frac * self._phase_shift(layer, phase + 1)
        if self.bursts > 0:
            topics = np.random.default_rng([self.seed, 5, layer]).permutation(self.num_experts)
            size = max(1, self.num_experts // BURST_TOPICS)
            topic = int(np.random.default_rng([self.seed, 6, layer, step]).integers(BURST_TOPICS))
            shift = shift.copy()
            shift[topics[topic * size : (topic + 1) * size]] += self.bursts
        return shift.astype(np.float32)

    def logits(self, layer: int, step: int) -> npt.NDArray[np.float32]:
        start = int(self.rng.integers(0, self.bank.shape[0] - self.num_tokens + 1))
        # The bank's columns rotated by a random offset: two steps drawing overlapping rows would
        # otherwise give every expert the same noise in both, a step-to-step correlation that
        # real traffic does not have (and that a planner could learn from one window to the next).
        rotation = int(self.rng.integers(0, self.num_experts))
        rows = self.bank[start : start + self.num_tokens]
        # np.roll(rows, rotation, axis=1) + shift, with one copy instead of two.
        out = np.empty_like(rows)
        E = self.num_experts
        out[:, rotation:] = rows[:, : E - rotation]
        out[:, :rotation] = rows[:, E - rotation :]
        out += self.shift(layer, step)
        return out

    def input_ids(self) -> npt.NDArray[np.int64]:
        ranks = np.searchsorted(self.token_cdf, self.rng.random(self.num_tokens))
        return self.token_perm[np.minimum(ranks, len(self.token_perm) - 1)].astype(np.int64)


class SyntheticRouting:
    """Synthetic steps through the model's routers into a recorder: ``route(step)`` routes one
    step's tokens in every simulated layer (``select_experts`` with the model's V3/V4 config,
    ``HashRouter`` on V4 hash layers, whose ``tid2eid`` is seeded per layer), and
    ``window_counts()`` returns the logical counts recorded since the last call."""

    def __init__(
        self, preset: ModelPreset, layer_ids: npt.NDArray[np.int64], config: SimulationConfig
    ) -> None:
        num_layers = len(layer_ids)
        self.traffic = SyntheticTraffic(preset, num_layers, config)
        self.recorder = ExpertDistributionRecorder(
            (num_layers, preset.num_experts), buffer_size=config.rebalance_period
        )
        self.recorder.start()
        self.routers = _routers(preset, layer_ids, config.seed)

    def route(self, step: int) -> list[npt.NDArray[np.int32]]:
        """Routes step ``step``; returns the routed (recorder) expert ids [T, K] of each layer."""
        routed: list[npt.NDArray[np.int32]] = []
        recorder = self.recorder
        with recorder.forward_pass(step):
            ids = self.traffic.input_ids()
            for index, router in enumerate(self.routers):
                logits = self.traffic.logits(index, step)
                with recorder.layer(index):
                    if isinstance(router, HashRouter):
                        out = router.select(logits, ids, recorder=recorder, layer=index)
                    else:
                        out = select_experts(logits, router, recorder=recorder, layer=index)
                routed.append(out.recorder_topk_ids)
        return routed

    def window_counts(self) -> npt.NDArray[np.int32]:
        """[T_w, L, E] int32 logical counts of the steps routed since the last call."""
        counts = np.ascontiguousarray(self.recorder.dump()["logical_count"], dtype=np.int32)
        self.recorder.clear()
        return counts


def _routers(preset: ModelPreset, layer_ids: npt.NDArray[np.int64], seed: int) -> list[Any]:
    """Per simulated layer: a ``HashRouter`` (V4 hash layers) or the model's ``TopKConfig``."""
    routers: list[Any] = []
    topk = preset.topk_config()
    for layer in layer_ids:
        if layer < preset.num_hash_layers:
            tid2eid = np.random.default_rng([seed, 4, int(layer)]).integers(
                0, preset.num_experts, (preset.vocab_size, topk.top_k), dtype=np.int32
            )
            routers.append(
                HashRouter(
                    tid2eid,
                    scoring=topk.scoring,
                    routed_scaling_factor=topk.routed_scaling_factor,
                )
            )
        else:
            routers.append(topk)
    return routers
