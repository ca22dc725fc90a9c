"""The deferred-shared peak, derived independently of the library's ``expected_peak_bytes``.

reference/moe_layer.md §13 models the live bytes of one MoE layer call: the old order (shared
expert first) peaks at X + max(P_sh, S + L + TK + W_r + O), the deferred order at
X + L + TK + O + max(W_r, P_sh), so deferring saves exactly one [T, H] activation (S) whenever the
routed workspace W_r is at least the shared transient beyond S (P_sh - S), and less otherwise.
This file writes that model down (checked against §13.4's worked numbers), applies it to
DeepSeek-V3's shape, and checks the consequences on peaks the layer measures (its byte-counting
workspace), never on the library's own formula.
"""

from __future__ import annotations

import moelb
import numpy as np
import pytest

MIB = 2**20


def section_13_peaks(
    T: int, H: int, inter: int, K: int, E: int, num_shared: int, b: int
) -> tuple[float, float]:
    """(Peak_old, Peak_new) in bytes, X excluded: §13.2's buffers with the Triton routed workspace
    (a [T_c * K, max(2 inter, H)] cache plus a [T_c * K, inter] one, T_c = min(T, 65536))."""
    Is = num_shared * inter
    L = T * E * 4  # fp32 router logits
    TK = 8 * T * K  # top-k ids and weights
    P_sh = T * (3 * Is + H) * b  # gate_up + act + shared output
    S = out = T * H * b
    W_r = min(T, 65536) * K * (max(2 * inter, H) + inter) * b
    return max(P_sh, S + L + TK + W_r + out), L + TK + out + max(W_r, P_sh)


@pytest.mark.parametrize(
    ("name", "shape", "old_mib", "new_mib"),
    [
        ("V3, 8192", (8192, 7168, 2048, 8, 256, 1), 1384.5, 1272.5),
        ("V3, 32768", (32768, 7168, 2048, 8, 256, 1), 5538, 5090),
        ("V4-Pro, 8192", (8192, 7168, 3072, 6, 384, 1), 1196.4, 1084.4),
    ],
)
def test_the_model_reproduces_the_worked_numbers(
    name: str, shape: tuple[int, ...], old_mib: float, new_mib: float
) -> None:
    old, new = section_13_peaks(*shape, b=2)
    assert old / MIB == pytest.approx(old_mib, abs=0.1), name
    assert new / MIB == pytest.approx(new_mib, abs=0.1), name
    T, H = shape[0], shape[1]
    assert old - new == T * H * 2  # one bf16 [T, H] activation


@pytest.mark.parametrize("tokens", [1, 64, 4096, 8192])
def test_deepseek_v3_saves_one_activation(tokens: int) -> None:
    """At DeepSeek-V3's shape the routed workspace dwarfs the shared transient at any T, so §13
    says deferral saves exactly S = T * H * b; moelb (float32, b = 4) must save that much."""
    old, new = section_13_peaks(tokens, 7168, 2048, 8, 256, 1, b=4)
    assert old - new == tokens * 7168 * 4
    v3 = moelb.DeepSeekMoEConfig.deepseek_v3()
    lanes = 2
    deferred = v3.expected_peak_bytes(tokens, 256, lanes, lanes)
    eager = v3.replace(defer_shared=False).expected_peak_bytes(tokens, 256, lanes, lanes)
    assert eager - deferred == old - new


def measured_peaks(config: moelb.DeepSeekMoEConfig, tokens: int) -> tuple[int, int]:
    """(eager peak, deferred peak) as the layer's workspace counted them, same weights."""
    weights = moelb.random_moe_weights(config, 5)
    x = np.random.default_rng(1).standard_normal((tokens, config.hidden_size)).astype(np.float32)
    peaks = []
    for defer in (False, True):
        layer = moelb.DeepSeekMoE(
            config.replace(kernel="out_of_place", defer_shared=defer), weights
        )
        layer(x.copy())
        peaks.append(layer.last_stats()["peak_bytes"])
    return peaks[0], peaks[1]


def test_measured_saving_is_one_activation_when_the_routed_workspace_dominates() -> None:
    config = moelb.DeepSeekMoEConfig.deepseek_v3().replace(
        hidden_size=64, intermediate_size=32, num_experts=16, top_k=4, num_groups=4, topk_group=2
    )
    tokens = 300
    eager, deferred = measured_peaks(config, tokens)
    assert eager - deferred == tokens * 64 * 4


def test_measured_saving_is_smaller_when_the_shared_transient_dominates() -> None:
    """§13.3: with a routed workspace below the shared transient (top-1 routing of a narrow
    expert, 64 shared experts) deferral cannot save a whole activation."""
    config = moelb.DeepSeekMoEConfig.deepseek_v3().replace(
        hidden_size=32,
        intermediate_size=8,
        num_experts=8,
        top_k=1,
        num_groups=None,
        topk_group=None,
        num_shared_experts=64,
    )
    tokens = 8
    eager, deferred = measured_peaks(config, tokens)
    assert eager - deferred < tokens * 32 * 4
    assert deferred > eager  # here it even raises the peak, as §13.3 predicts
