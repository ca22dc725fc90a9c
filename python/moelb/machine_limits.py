"""What this machine can do, measured: the yardsticks of the MoE layer's kernels.

``measure_machine_limits(threads)`` runs three microbenchmarks on ``threads`` threads together
(C++: ``moelb/machine_limits.hpp``; the loops are kernels of the ISA path in use, ``cpu_isa()``),
each the best of ``passes`` passes:

- ``read_bandwidth_gbs``: a STREAM-like read bandwidth (1e9 bytes/s): a buffer much larger than the
  last-level cache (``buffer_bytes``, 256 MiB by default: 8x the development machine's 32 MiB
  L3; 1 GiB read about 20% slower there, its page tables no longer cached, and the kernels
  stream faster than that) summed with vector loads, each thread its contiguous share (as 8
  streams in lockstep on the AVX paths, as the GEMV kernels read weight rows);
- ``fma_peak_gflops``: float32 FMAs on independent chains, 2 flops per lane;
- ``bf16_dot_peak_gflops``: bf16 x bf16 -> float32 products, 2 flops each, as this path does them
  on this CPU (``bf16_dot_method``): ``vdpbf16ps`` on the avx512_bf16 path,
  else one bf16 operand read from L1 and widened to float32 in registers, times a float32 one with
  FMA (a bf16-weight GEMM's inner loop).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from . import _core


@dataclass(frozen=True)
class MachineLimits:
    threads: int
    cpu_isa: str
    read_bandwidth_gbs: float
    fma_peak_gflops: float
    bf16_dot_peak_gflops: float
    bf16_dot_method: str
    buffer_bytes: int
    passes: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_machine_limits(
    threads: int = 1, *, buffer_bytes: int = 256 << 20, passes: int = 5, seconds: float = 0.1
) -> MachineLimits:
    """Measures the read bandwidth, FMA peak and bf16-dot peak on ``threads`` threads together.

    ``threads``: >= 1 and at most ``get_num_threads()``; ``buffer_bytes``: the bandwidth buffer
    (>= 1 MiB; keep it far above the last-level cache); ``passes``: each figure is the best of
    this many; ``seconds``: one FMA or bf16 pass. Takes about ``passes * (2 * seconds +
    buffer_bytes / bandwidth)`` plus writing the buffer once. Bad options raise
    ``InvalidArgumentError`` naming them.
    """
    return MachineLimits(**_core.measure_machine_limits(threads, buffer_bytes, passes, seconds))
