"""How often SGLang's own DeepSeek algorithm and moelb's port place replicas differently on float
loads (SGLang's copy sums pack loads as float64 Python floats, DeepSeek's eplb.py and moelb's
port in float32; docs/engines/sglang.md). Needs SGLang (install_real_engines.sh).

    python tests/integrations/sglang_deepseek_precision.py [--layers 64] [--seed 0]

DeepSeek-V3 shape: 256 experts, 288 slots on 32 GPUs (9 per GPU), 8 groups, 4 nodes.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import sys
import types

import numpy as np
import torch
import torch._dynamo  # PyTorch probes for triton now, before the stub below


def import_sglang_algorithms() -> types.ModuleType:
    """sglang.srt.eplb.eplb_algorithms, with a triton stub while it imports where triton is not
    installed (SGLang's package imports it; nothing here uses it)."""
    stub = None
    if importlib.util.find_spec("triton") is None:
        stub = types.ModuleType("triton")
        stub.__spec__ = importlib.machinery.ModuleSpec("triton", None)
        sys.modules["triton"] = stub
    try:
        return importlib.import_module("sglang.srt.eplb.eplb_algorithms")
    finally:
        if stub is not None:
            del sys.modules["triton"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    algorithms = import_sglang_algorithms()
    from moelb.integrations import sglang as adapter

    rng = np.random.default_rng(args.seed)
    shape = (1, args.layers, 256)
    popularity = rng.permutation(1.0 / np.arange(1, 257) ** 0.9)
    inputs = {
        "uniform [1, 2)": rng.uniform(1.0, 2.0, size=shape),
        "zipf 0.9": popularity * rng.uniform(0.5, 1.5, size=shape) * 1e5,
    }
    for label, loads in inputs.items():
        counts = torch.from_numpy(loads.astype(np.float32))
        weight = counts.sum(0).double()
        for name in ("deepseek", "deepseek_hierarchical"):
            member = algorithms.EplbAlgorithm[name]
            theirs = algorithms.rebalance_experts(counts, 288, 9, 8, 4, member)
            ours = adapter.rebalance_experts(counts, 288, 9, 8, 4, name)
            differ = (theirs[0] != ours[0]).any(dim=1)
            worst = 0.0
            for layer in torch.nonzero(differ).flatten().tolist():
                gpu_loads = [
                    (weight[layer, m[layer]] / n[layer, m[layer]]).reshape(32, 9).sum(1).sort()[0]
                    for m, n in (theirs[:3:2], ours[:3:2])
                ]
                gap = ((gpu_loads[0] - gpu_loads[1]).abs() / gpu_loads[0]).max()
                worst = max(worst, float(gap))
            print(
                f"{label:15} {name:22} layers differing {int(differ.sum())}/{args.layers}, "
                f"replica counts equal {bool(torch.equal(theirs[2], ours[2]))}, "
                f"largest relative GPU-load gap {worst:.1e}"
            )


if __name__ == "__main__":
    main()
