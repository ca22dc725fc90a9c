"""The kernels' ISA paths from Python: moelb.cpu_isa / available_cpu_isas / compiled_cpu_isas /
set_cpu_isa, the MOELB_ISA override (read at import), and every available path against the
float64 NumPy routing reference and the other paths."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import moelb
import numpy as np
import pytest
from routing_reference import make_tie_free_logits, reference_epilogue, reference_topk

ALL_PATHS = ("baseline", "avx2", "avx512", "avx512_bf16", "native")
AVAILABLE = moelb.available_cpu_isas()


@pytest.fixture(autouse=True)
def restore_path() -> Iterator[None]:
    saved = moelb.cpu_isa()
    yield
    moelb.set_cpu_isa(saved)


def import_with(isa: str) -> subprocess.CompletedProcess[str]:
    """Imports moelb in a fresh interpreter with MOELB_ISA=isa and prints its path."""
    env = dict(os.environ, MOELB_ISA=isa)
    return subprocess.run(
        [sys.executable, "-c", "import moelb; print(moelb.cpu_isa())"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_paths_are_listed_narrowest_first() -> None:
    compiled = moelb.compiled_cpu_isas()
    assert AVAILABLE and set(AVAILABLE) <= set(compiled) <= set(ALL_PATHS)
    assert compiled == sorted(compiled, key=ALL_PATHS.index)
    assert AVAILABLE == [p for p in compiled if p in AVAILABLE]
    assert AVAILABLE[0] in ("baseline", "native")
    assert moelb.cpu_isa() in AVAILABLE
    # a MOELB_NATIVE=ON build has the one path "native"; a portable one never has it
    assert ("native" in compiled) == (compiled == ["native"])


def test_default_is_the_widest_available_path() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MOELB_ISA"}
    proc = subprocess.run(
        [sys.executable, "-c", "import moelb; print(moelb.cpu_isa())"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == AVAILABLE[-1]


@pytest.mark.parametrize("isa", AVAILABLE)
def test_set_cpu_isa_switches(isa: str) -> None:
    moelb.set_cpu_isa(isa)
    assert moelb.cpu_isa() == isa


@pytest.mark.parametrize("isa", [p for p in ALL_PATHS if p not in AVAILABLE])
def test_set_cpu_isa_refuses_missing_paths(isa: str) -> None:
    before = moelb.cpu_isa()
    reason = "this build has no" if isa not in moelb.compiled_cpu_isas() else "it lacks"
    with pytest.raises(moelb.InvalidArgumentError, match=rf"set_cpu_isa\('{isa}'\).*{reason}"):
        moelb.set_cpu_isa(isa)
    assert moelb.cpu_isa() == before


def test_set_cpu_isa_rejects_unknown_names() -> None:
    with pytest.raises(moelb.InvalidArgumentError, match="name='sse9' is not an ISA path"):
        moelb.set_cpu_isa("sse9")


@pytest.mark.parametrize("isa", AVAILABLE)
def test_moelb_isa_selects_the_path(isa: str) -> None:
    proc = import_with(isa)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == isa


@pytest.mark.parametrize("isa", ["auto", ""])
def test_moelb_isa_auto_is_the_default(isa: str) -> None:
    proc = import_with(isa)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == AVAILABLE[-1]


@pytest.mark.parametrize(
    ("isa", "message"),
    [
        ("sse9", "MOELB_ISA='sse9' is not an ISA path; expected 'baseline', 'avx2', 'avx512', 'avx512_bf16' or"),
        *[
            (p, f"MOELB_ISA={p}: this build has no {p} path")
            for p in ALL_PATHS
            if p not in moelb.compiled_cpu_isas()
        ],
        *[
            (p, f"MOELB_ISA={p}: this CPU cannot run the {p} path; it lacks")
            for p in moelb.compiled_cpu_isas()
            if p not in AVAILABLE
        ],
    ],
)
def test_moelb_isa_refusals_fail_the_import(isa: str, message: str) -> None:
    proc = import_with(isa)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


@pytest.mark.parametrize("isa", AVAILABLE)
@pytest.mark.parametrize(
    ("scoring", "groups"),
    [("sigmoid", (8, 4)), ("sqrtsoftplus", None), ("softmax", (4, 2))],
    ids=["sigmoid-grouped", "sqrtsoftplus", "softmax-grouped"],
)
def test_every_path_matches_the_reference(
    isa: str, scoring: str, groups: tuple[int, int] | None
) -> None:
    num_experts, top_k = 64, 6
    group_kwargs = {} if groups is None else {"num_groups": groups[0], "topk_group": groups[1]}
    rng = np.random.default_rng(5)
    bias = (0.05 * rng.standard_normal(num_experts)).astype(np.float32)
    config = dict(top_k=top_k, scoring=scoring, correction_bias=bias, **group_kwargs)
    logits = make_tie_free_logits(rng, 2000, num_experts, **config)
    ref_ids, ref_scores, _ = reference_topk(logits, **config)
    expected_ids, expected_weights = reference_epilogue(
        ref_ids,
        ref_scores,
        shared_id=num_experts,
        renormalize=True,
        routed_scaling_factor=2.5,
        apply_routed_scaling_factor_on_output=False,
        num_fused_shared_experts=0,
        num_token_non_padded=None,
    )
    moelb.set_cpu_isa(isa)
    out = moelb.select_experts(
        logits,
        moelb.TopKConfig(
            top_k=top_k,
            scoring=scoring,
            renormalize=True,
            routed_scaling_factor=2.5,
            **group_kwargs,
        ),
        bias,
    )
    np.testing.assert_array_equal(out.topk_ids, expected_ids)
    np.testing.assert_allclose(out.topk_weights, expected_weights, rtol=1e-6, atol=1e-7)


def test_paths_agree_on_the_moe_layer() -> None:
    # every token takes every expert, so float rounding cannot flip a selection; the V4 clamp acts
    config = moelb.DeepSeekMoEConfig.deepseek_v4_flash().replace(
        hidden_size=48, intermediate_size=32, num_experts=8, top_k=8
    )
    layer = moelb.DeepSeekMoE(config, moelb.random_moe_weights(config, seed=2))
    hidden = 4 * np.random.default_rng(1).standard_normal((200, 48)).astype(np.float32)
    outputs = {}
    for isa in AVAILABLE:
        moelb.set_cpu_isa(isa)
        outputs[isa] = layer.forward(hidden)
    first = outputs[AVAILABLE[0]]
    for isa, out in outputs.items():
        np.testing.assert_allclose(out, first, rtol=0, atol=1e-5 * np.abs(first).max(), err_msg=isa)
