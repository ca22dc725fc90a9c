"""moelb: expert-parallel load balancing for DeepSeek-style Mixture-of-Experts inference.

Routers (``select_experts``, ``HashRouter``), placement maps with logical->physical dispatch
(``ExpertLocation``), SGLang placement files (``load_placement`` / ``save_placement``) and the
expert distribution recorder (``ExpertDistributionRecorder``, ``load_expert_distribution``), the
EPLB planner (``rebalance``, ``plan_weight_moves``) and the Waterfill shared-expert balancer
(``WaterfillBalancer``, ``waterfill_rank_loads``), moelb's exact per-step dispatch
(``balanced_split``, ``balanced_assignment``; in an engine ``select_experts(...,
dispatch="balanced" | "balanced_prob")`` with one collective per layer, or offline fractions), their
``torch.distributed`` side (``ExpertDistributionRecorder.all_reduce``, ``execute_weight_moves``,
``torch_all_gather``, ``torch_all_reduce``; ``moelb.distributed``), the
DeepSeek MoE layer on CPU (``DeepSeekMoE``, ``DeepSeekMoEConfig``), the cluster simulator
(``simulate``, ``SimulationConfig``) behind the ``moelb`` command, and its step-time model from
measured GPU calibrations (``StepTimeModel``, ``load_gpu_calibration``).
Arrays are NumPy (CPU torch tensors convert without copies): float32 logits and weights, int32 ids,
row-major. Bad input raises ``InvalidArgumentError`` (a ``ValueError``; a wrong dtype is an
``InvalidDTypeError``, also a ``TypeError``); a broken internal invariant raises ``Error``. The hot
kernels run on the widest vector ISA path this CPU offers (``cpu_isa()``, ``available_cpu_isas()``,
``set_cpu_isa()``, the environment variable ``MOELB_ISA``).
"""

from ._core import (
    Error,
    ExpertLocation,
    InvalidArgumentError,
    InvalidDTypeError,
    TopKConfig,
    __version__,
    available_cpu_isas,
    compiled_cpu_isas,
    cpu_isa,
    get_num_threads,
    set_cpu_isa,
    set_num_threads,
)
from .balancedness import BALANCEDNESS_EPSILON, balancedness, pass_balancedness, utilization_rate
from .dispatch import (
    COLLECTIVE_DISPATCH,
    DISPATCH_ALGORITHMS,
    ENGINE_DISPATCH,
    MOELB_DISPATCH,
    balanced_assignment,
    balanced_fractions,
    balanced_split,
    dispatch_balanced,
    dispatch_balanced_joint,
    dispatch_by_assignment,
    dispatch_by_fractions,
    dispatch_table,
    dispatch_tables,
    dispatch_tokens,
    expected_rank_loads,
    per_rank_shared_location,
    sglang_replica_lists,
)
from .distributed import execute_weight_moves, torch_all_gather
from .eplb import Plan, PlanStats, evaluate_placement, rank_loads, rebalance, relabel_ranks
from .gpu_calibration import (
    DEFAULT_GPU,
    GemmTable,
    GpuCalibration,
    available_gpus,
    load_gpu_calibration,
)
from .io import (
    load_expert_distribution,
    load_placement,
    load_placement_fractions,
    save_expert_distribution,
    save_placement,
)
from .machine_limits import MachineLimits, measure_machine_limits
from .moe_layer import (
    DeepSeekMoE,
    DeepSeekMoEConfig,
    quantize_weights,
    random_moe_weights,
    stored_dtype,
)
from .recorder import ExpertDistributionRecorder
from .routing import (
    HashRouter,
    TopKOutput,
    remap_topk_for_per_rank_shared_slots,
    select_experts,
)
from .simulate import (
    MODEL_PRESETS,
    AlgorithmResult,
    ModelPreset,
    SimulationConfig,
    SimulationResult,
    score_steps,
    simulate,
    step_lower_bounds,
)
from .step_time import (
    DEEPEP_MODES,
    Interconnect,
    LinkCopies,
    StepTime,
    StepTimeModel,
    token_copies,
    uniform_copies,
)
from .waterfill import (
    RankLoads,
    WaterfillBalancer,
    WaterfillPlan,
    torch_all_reduce,
    waterfill_rank_loads,
)
from .weight_moves import WeightMovePlan, apply_weight_moves, plan_weight_moves

__all__ = [
    "BALANCEDNESS_EPSILON",
    "COLLECTIVE_DISPATCH",
    "DEEPEP_MODES",
    "DEFAULT_GPU",
    "DISPATCH_ALGORITHMS",
    "ENGINE_DISPATCH",
    "MODEL_PRESETS",
    "MOELB_DISPATCH",
    "AlgorithmResult",
    "DeepSeekMoE",
    "DeepSeekMoEConfig",
    "Error",
    "ExpertDistributionRecorder",
    "ExpertLocation",
    "GemmTable",
    "GpuCalibration",
    "HashRouter",
    "Interconnect",
    "InvalidArgumentError",
    "InvalidDTypeError",
    "LinkCopies",
    "MachineLimits",
    "ModelPreset",
    "Plan",
    "PlanStats",
    "RankLoads",
    "SimulationConfig",
    "SimulationResult",
    "StepTime",
    "StepTimeModel",
    "TopKConfig",
    "TopKOutput",
    "WaterfillBalancer",
    "WaterfillPlan",
    "WeightMovePlan",
    "__version__",
    "apply_weight_moves",
    "available_cpu_isas",
    "available_gpus",
    "balanced_assignment",
    "balanced_fractions",
    "balanced_split",
    "balancedness",
    "compiled_cpu_isas",
    "cpu_isa",
    "dispatch_balanced",
    "dispatch_balanced_joint",
    "dispatch_by_assignment",
    "dispatch_by_fractions",
    "dispatch_table",
    "dispatch_tables",
    "dispatch_tokens",
    "evaluate_placement",
    "execute_weight_moves",
    "expected_rank_loads",
    "get_num_threads",
    "load_expert_distribution",
    "load_gpu_calibration",
    "load_placement",
    "load_placement_fractions",
    "measure_machine_limits",
    "pass_balancedness",
    "per_rank_shared_location",
    "plan_weight_moves",
    "quantize_weights",
    "random_moe_weights",
    "rank_loads",
    "rebalance",
    "relabel_ranks",
    "remap_topk_for_per_rank_shared_slots",
    "save_expert_distribution",
    "save_placement",
    "score_steps",
    "select_experts",
    "set_cpu_isa",
    "set_num_threads",
    "sglang_replica_lists",
    "simulate",
    "step_lower_bounds",
    "stored_dtype",
    "token_copies",
    "torch_all_gather",
    "torch_all_reduce",
    "uniform_copies",
    "utilization_rate",
    "waterfill_rank_loads",
]
