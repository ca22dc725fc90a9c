"""PyTorch tensors as inputs (README "Arrays"): CPU tensors are read in place, including
``requires_grad`` ones and parameters (detach is free); dtypes NumPy cannot hold (bfloat16) or
other than the one asked (float16 logits) and tensors off the CPU raise ``InvalidDTypeError``
naming the parameter and the dtype, never "must be an array" and never a silent copy."""

from __future__ import annotations

import moelb
import numpy as np
import pytest

torch = pytest.importorskip("torch")

CONFIG = moelb.TopKConfig(top_k=4, scoring="sigmoid")


def logits_tensor(requires_grad: bool = False):
    logits = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    return logits.requires_grad_(requires_grad)


def test_requires_grad_logits_are_read_in_place() -> None:
    logits = logits_tensor(requires_grad=True)
    out = moelb.select_experts(logits, CONFIG)
    expected = moelb.select_experts(logits.detach().numpy(), CONFIG)
    np.testing.assert_array_equal(out.topk_ids, expected.topk_ids)
    np.testing.assert_array_equal(out.topk_weights, expected.topk_weights)
    # A parameter (what a router's weight-tied logits or bias can be) too.
    param = torch.nn.Parameter(logits.detach().clone())
    np.testing.assert_array_equal(moelb.select_experts(param, CONFIG).topk_ids, expected.topk_ids)


def test_requires_grad_tensor_is_not_copied() -> None:
    """The core reads the tensor's own memory: a NaN written through the tensor is seen."""
    logits = logits_tensor(requires_grad=True)
    with torch.no_grad():
        logits[0] = float("-inf")
        logits[0, 5] = 1.0
    ids = moelb.select_experts(logits, moelb.TopKConfig(top_k=1)).topk_ids
    assert ids[0, 0] == 5


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
def test_other_logit_dtypes_raise_invalid_dtype(dtype: str) -> None:
    logits = logits_tensor().to(getattr(torch, dtype)).requires_grad_(True)
    with pytest.raises(
        moelb.InvalidDTypeError, match=rf"router_logits must have dtype float32.*{dtype}"
    ):
        moelb.select_experts(logits, CONFIG)
    router = moelb.HashRouter(np.arange(64 * 4, dtype=np.int32).reshape(64, 4) % 32)
    with pytest.raises(moelb.InvalidDTypeError, match=rf"router_logits.*{dtype}"):
        router.select(logits, torch.arange(64))


def test_meta_tensor_is_refused_with_its_device() -> None:
    """A tensor off the CPU (meta stands in for CUDA on a machine without GPUs)."""
    logits = torch.empty(64, 32, device="meta")
    with pytest.raises(
        moelb.InvalidDTypeError, match=r"router_logits is a torch\.float32 tensor on device 'meta'"
    ):
        moelb.select_experts(logits, CONFIG)


def test_hash_router_and_recorder_hooks_take_torch_tensors() -> None:
    tid2eid = (np.arange(100 * 4, dtype=np.int32).reshape(100, 4) * 7) % 32
    router = moelb.HashRouter(tid2eid)
    logits = logits_tensor(requires_grad=True)
    input_ids = torch.arange(64) + 3
    out = router.select(logits, input_ids)
    expected = router.select(logits.detach().numpy(), input_ids.numpy())
    np.testing.assert_array_equal(out.topk_ids, expected.topk_ids)

    rec = moelb.ExpertDistributionRecorder((1, 32))
    rec.start()
    with rec.forward_pass(), rec.layer(0):
        rec.on_select_experts(torch.from_numpy(expected.recorder_topk_ids))
        rec.on_dispatch_counts(torch.ones(32, dtype=torch.int64), 0)
    counts = np.bincount(expected.recorder_topk_ids.ravel(), minlength=32) + 1
    np.testing.assert_array_equal(rec.physical_count()[0, 0], counts)
    with pytest.raises(moelb.InvalidDTypeError, match=r"topk_ids must have dtype int32, got int64"):
        with rec.forward_pass(), rec.layer(0):
            rec.on_select_experts(torch.from_numpy(expected.recorder_topk_ids).long())


def test_bfloat16_correction_bias_is_converted() -> None:
    """correction_bias is config-sized [E]: converted (a small copy) rather than refused."""
    logits = logits_tensor()
    bias = torch.linspace(-1, 1, 32).to(torch.bfloat16).requires_grad_(True)
    config = moelb.TopKConfig(top_k=4, scoring="sigmoid", num_groups=4, topk_group=2)
    out = moelb.select_experts(logits, config, bias)
    expected = moelb.select_experts(logits, config, bias.detach().float().numpy())
    np.testing.assert_array_equal(out.topk_ids, expected.topk_ids)


def test_waterfill_expand_takes_requires_grad_weights() -> None:
    balancer = moelb.WaterfillBalancer(32, ep_size=4, ep_rank=1, routed_scaling_factor=1.0)
    routed = moelb.select_experts(logits_tensor(), CONFIG)
    weights = torch.from_numpy(routed.topk_weights.copy()).requires_grad_(True)
    ids, out = balancer.expand(torch.from_numpy(routed.topk_ids), weights)
    ids_np, out_np = balancer.expand(routed.topk_ids, routed.topk_weights)
    np.testing.assert_array_equal(ids, ids_np)
    np.testing.assert_array_equal(out, out_np)
    with pytest.raises(moelb.InvalidDTypeError, match=r"topk_weights.*bfloat16"):
        balancer.expand(routed.topk_ids, weights.to(torch.bfloat16))


def test_inplace_kernel_refuses_a_tensor_that_requires_grad() -> None:
    """moelb would overwrite the leaf behind autograd's back (its gradients silently wrong)."""
    config = moelb.DeepSeekMoEConfig.deepseek_v3().replace(
        hidden_size=64, intermediate_size=32, num_experts=16, top_k=4, num_groups=4,
        topk_group=2, kernel="inplace",
    )  # fmt: skip
    layer = moelb.DeepSeekMoE(config, seed=1)
    x = torch.randn(8, 64, requires_grad=True)
    before = x.detach().clone()
    with pytest.raises(moelb.InvalidArgumentError, match="requires grad"):
        layer(x)
    assert torch.equal(x.detach(), before)
    out = layer(x.detach().clone())  # a detached copy is fine
    assert out.shape == (8, 64)
