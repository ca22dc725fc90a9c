"""Type stubs of moelb's compiled core (moelb._core). Use the public API in ``moelb``."""

from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str

class Error(RuntimeError): ...
class InvalidArgumentError(ValueError): ...
class InvalidDTypeError(InvalidArgumentError, TypeError): ...

def set_num_threads(num_threads: int) -> None: ...
def get_num_threads() -> int: ...
def cpu_isa() -> str: ...
def available_cpu_isas() -> list[str]: ...
def compiled_cpu_isas() -> list[str]: ...
def set_cpu_isa(name: str) -> None: ...

class ExpertLocation:
    def __init__(
        self,
        physical_to_logical: npt.ArrayLike,
        num_logical_experts: int,
        ep_size: int,
        num_nodes: int = 1,
    ) -> None: ...
    @staticmethod
    def trivial(
        num_layers: int,
        num_logical_experts: int,
        num_physical_experts: int,
        ep_size: int,
        num_nodes: int = 1,
    ) -> ExpertLocation: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def num_logical_experts(self) -> int: ...
    @property
    def num_physical_experts(self) -> int: ...
    @property
    def ep_size(self) -> int: ...
    @property
    def num_nodes(self) -> int: ...
    @property
    def num_local_physical_experts(self) -> int: ...
    @property
    def max_replicas(self) -> int: ...
    @property
    def physical_to_logical(self) -> npt.NDArray[np.int32]: ...
    @property
    def logical_to_physical(self) -> npt.NDArray[np.int32]: ...
    @property
    def logical_count(self) -> npt.NDArray[np.int32]: ...
    def __eq__(self, other: object) -> bool: ...

class TopKConfig:
    def __init__(
        self,
        *,
        top_k: int,
        scoring: str = "softmax",
        num_groups: int | None = None,
        topk_group: int | None = None,
        group_score: str = "top2_sum",
        renormalize: bool = True,
        routed_scaling_factor: float = 1.0,
        apply_routed_scaling_factor_on_output: bool = False,
        num_fused_shared_experts: int = 0,
    ) -> None: ...
    @staticmethod
    def deepseek_v3() -> TopKConfig: ...
    @staticmethod
    def deepseek_v4_flash() -> TopKConfig: ...
    @staticmethod
    def deepseek_v4_pro() -> TopKConfig: ...
    @property
    def top_k(self) -> int: ...
    @property
    def scoring(self) -> str: ...
    @property
    def num_groups(self) -> int | None: ...
    @property
    def topk_group(self) -> int | None: ...
    @property
    def group_score(self) -> str: ...
    @property
    def renormalize(self) -> bool: ...
    @property
    def routed_scaling_factor(self) -> float: ...
    @property
    def apply_routed_scaling_factor_on_output(self) -> bool: ...
    @property
    def num_fused_shared_experts(self) -> int: ...
    @property
    def output_columns(self) -> int: ...
    def __eq__(self, other: object) -> bool: ...

_TopKTuple = tuple[npt.NDArray[np.int32], npt.NDArray[np.float32], npt.NDArray[np.int32]]

def select_experts(
    router_logits: Any,
    config: TopKConfig,
    correction_bias: Any = None,
    num_token_non_padded: int | None = None,
    location: ExpertLocation | None = None,
    layer: int | None = None,
    ep_rank: int = 0,
    dispatch: str = "sglang_static",
    seed: int = 0,
) -> _TopKTuple: ...
def remap_topk_for_per_rank_shared_slots(
    topk_ids: Any,
    num_physical_experts: int,
    ep_size: int,
    ep_rank: int,
    num_fused_shared_experts: int = 1,
) -> npt.NDArray[np.int32]: ...

class HashRouter:
    def __init__(
        self,
        tid2eid: npt.ArrayLike,
        *,
        scoring: str = "sqrtsoftplus",
        routed_scaling_factor: float = 1.0,
        num_fused_shared_experts: int = 0,
        apply_routed_scaling_factor_on_output: bool = False,
        num_experts: int | None = None,
    ) -> None: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def top_k(self) -> int: ...
    @property
    def num_experts(self) -> int | None: ...
    @property
    def scoring(self) -> str: ...
    @property
    def routed_scaling_factor(self) -> float: ...
    @property
    def num_fused_shared_experts(self) -> int: ...
    @property
    def apply_routed_scaling_factor_on_output(self) -> bool: ...
    @property
    def renormalize(self) -> bool: ...
    @property
    def tid2eid(self) -> npt.NDArray[np.int32]: ...
    def select(
        self,
        router_logits: Any,
        input_ids: Any,
        num_token_non_padded: int | None = None,
        location: ExpertLocation | None = None,
        layer: int | None = None,
        ep_rank: int = 0,
        dispatch: str = "sglang_static",
        seed: int = 0,
    ) -> Any: ...

BALANCEDNESS_EPSILON: float

def utilization_rate(
    mean_rank_load: npt.NDArray[np.float64], max_rank_load: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """SGLang's per-layer rate (mean + 1e-5) / (max + 1e-5), elementwise (same shapes)."""

def balancedness(
    mean_rank_load: npt.NDArray[np.float64],
    max_rank_load: npt.NDArray[np.float64],
    layers: str = "all",
) -> npt.NDArray[np.float64]:
    """[..., L] -> [...]: the mean over the layers of utilization_rate; layers 'all' (SGLang:
    a layer without load counts 1.0) or 'active' (layers with load only; NaN when none)."""

def pass_balancedness(counts: npt.ArrayLike, ep_size: int, layers: str = "all") -> float:
    """SGLang's balancedness of one pass from its [L, P] slot counts (see balancedness)."""

class ExpertDistributionRecorder:
    def __init__(
        self,
        location: ExpertLocation,
        mode: str = "stat",
        buffer_size: int = 1000,
        ep_rank: int = 0,
    ) -> None: ...
    @property
    def mode(self) -> str: ...
    @property
    def buffer_size(self) -> int: ...
    @property
    def ep_rank(self) -> int: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def num_physical_experts(self) -> int: ...
    @property
    def location(self) -> ExpertLocation: ...
    def set_location(self, location: ExpertLocation) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    @property
    def recording(self) -> bool: ...
    def begin_forward_pass(self, forward_pass_id: int | None = None) -> None: ...
    def end_forward_pass(self) -> None: ...
    def abandon_forward_pass(self) -> None: ...
    def begin_layer(self, layer: int) -> None: ...
    def end_layer(self) -> None: ...
    @property
    def current_layer(self) -> int | None: ...
    def on_select_experts(self, topk_ids: Any, layer: int | None = None) -> None: ...
    def on_dispatch_counts(
        self, local_counts: npt.ArrayLike, ep_rank: int, num_trailing_shared_slots: int = 0
    ) -> None: ...
    def check_id_space(self, location: ExpertLocation | None, num_experts: int) -> None:
        """Raises InvalidArgumentError naming ``location`` unless ids routed with ``location``
        (equal to the recorder's placement) or without one (logical ids of ``num_experts``
        experts: the recorder's placement must be the identity, P == E) are its slots."""
    @property
    def num_passes(self) -> int: ...
    def logical_count(self) -> npt.NDArray[np.int32]: ...
    def physical_count(self) -> npt.NDArray[np.int32]: ...
    def forward_pass_ids(self) -> npt.NDArray[np.int64]: ...
    def num_passes_with_other_placement(self) -> int:
        """Passes of the window recorded with another placement than the current one."""
    def pass_placements(self) -> tuple[npt.NDArray[np.int64], list[npt.NDArray[np.int32]]]:
        """(index [T], maps): each pass's placement, -1 for the current one, else an index into
        maps (distinct earlier [L, P] physical_to_logical maps)."""
    def pass_balancedness(self) -> npt.NDArray[np.float64]:
        """[num_passes]: each recorded pass's SGLang balancedness (idle layers count 1.0)."""
    def token_ids(self, pass_index: int, layer: int) -> npt.NDArray[np.int32]: ...
    def average_balancedness(self, window: int) -> float | None:
        """The mean pass balancedness of the last ``window`` passes (idle ones count 1.0);
        None before the first pass. window=1000: average_utilization_rate_over_window."""
    def clear(self) -> None: ...
    def merge(self, other: ExpertDistributionRecorder) -> None: ...
    def packed_token_ids(self) -> npt.NDArray[np.int32]:
        """int32 [2 * T * L + ids]: top_k [T * L], ids per (pass, layer) [T * L], then the
        routed ids (per_token mode; zero headers otherwise), for a collective."""
    def merge_summed_counts(self, summed: Any, others: list[Any] = ...) -> None:
        """Sets each pass's counts to summed [T, L, P] (int32 or int64: every rank's counts
        summed pass by pass, this recorder's included) and appends the other ranks'
        packed_token_ids() (per_token), as merge() would; validates before changing anything."""

DEFAULT_MOVE_COST: float

def rebalance(
    load: npt.NDArray[np.float64] | npt.NDArray[np.int32],
    num_physical_experts: int,
    num_groups: int,
    num_nodes: int,
    ep_size: int,
    algorithm: str = "moelb",
    locality: str = "auto",
    previous: ExpertLocation | None = None,
    move_cost: float = 1e-4,
    max_moves: int | None = None,
    objective: str = "total",
    dispatch: str = "equal_split",
) -> tuple[ExpertLocation, dict[str, Any]]: ...
def evaluate_placement(
    load: npt.NDArray[np.float64] | npt.NDArray[np.int32],
    location: ExpertLocation,
    previous: ExpertLocation | None = None,
    dispatch: str = "equal_split",
) -> dict[str, Any]: ...
def relabel_ranks(
    location: ExpertLocation, previous: ExpertLocation, locality: str = "none"
) -> ExpertLocation: ...
def rank_loads(
    load: npt.NDArray[np.float64], location: ExpertLocation
) -> npt.NDArray[np.float64]: ...

class WeightMovePlan:
    @property
    def layer(self) -> int: ...
    @property
    def ep_size(self) -> int: ...
    @property
    def slots_per_rank(self) -> int: ...
    @property
    def local_copies(self) -> int: ...
    @property
    def intra_node_transfers(self) -> int: ...
    @property
    def inter_node_transfers(self) -> int: ...
    @property
    def unchanged_slots(self) -> int: ...
    @property
    def transfers(self) -> int: ...
    @property
    def old_physical_to_logical(self) -> npt.NDArray[np.int32]: ...
    @property
    def new_physical_to_logical(self) -> npt.NDArray[np.int32]: ...
    @property
    def fingerprint(self) -> int: ...
    def check_source(self, location: ExpertLocation, parameter: str = "location") -> None: ...
    def check_target(self, location: ExpertLocation, parameter: str = "location") -> None: ...
    def ops(self, ep_rank: int) -> list[tuple[str, int, int, int, int]]: ...
    def moved_bytes(self, expert_bytes: int) -> dict[str, int]: ...
    def simulate(self, contents: npt.ArrayLike) -> npt.NDArray[np.int64]: ...

def plan_weight_moves(old: ExpertLocation, new: ExpertLocation, layer: int) -> WeightMovePlan: ...

class WaterfillPlan:
    @property
    def kind(self) -> str: ...
    @property
    def rank_load(self) -> npt.NDArray[np.int64]: ...
    @property
    def target_total(self) -> int: ...
    @property
    def allow_all_ranks(self) -> bool: ...
    @property
    def destination(self) -> int | None: ...

class WaterfillBalancer:
    def __init__(
        self,
        num_physical_experts: int,
        ep_size: int,
        ep_rank: int,
        routed_scaling_factor: float = 1.0,
        mode: str = "static",
        *,
        apply_routed_scaling_factor_on_output: bool = False,
    ) -> None: ...
    @property
    def num_physical_experts(self) -> int: ...
    @property
    def ep_size(self) -> int: ...
    @property
    def ep_rank(self) -> int: ...
    @property
    def slots_per_rank(self) -> int: ...
    @property
    def routed_scaling_factor(self) -> float: ...
    @property
    def apply_routed_scaling_factor_on_output(self) -> bool: ...
    @property
    def mode(self) -> str: ...
    @property
    def shared_weight(self) -> float: ...
    def shared_slot(self, ep_rank: int) -> int: ...
    def exchange_size(self, is_decode: bool = False) -> int: ...
    def exchange_buffer(
        self, topk_ids: npt.ArrayLike, num_tokens: int | None = None, is_decode: bool = False
    ) -> npt.NDArray[np.int64]: ...
    def plan(
        self,
        topk_ids: npt.ArrayLike,
        num_tokens: int | None = None,
        is_decode: bool = False,
        reduced: npt.ArrayLike | None = None,
    ) -> WaterfillPlan: ...
    def expand_reduced(
        self,
        topk_ids: npt.ArrayLike,
        topk_weights: npt.ArrayLike,
        num_tokens: int | None = None,
        is_decode: bool = False,
        reduced: npt.ArrayLike | None = None,
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32], WaterfillPlan]: ...

def waterfill_rank_loads(
    batches: list[npt.ArrayLike],
    num_physical_experts: int,
    mode: str = "static",
    is_decode: bool = False,
    num_tokens: list[int] | None = None,
) -> dict[str, Any]: ...
def quantize_weights(
    array: npt.ArrayLike, weight_format: str, block_size: tuple[int, int]
) -> tuple[npt.NDArray[Any], npt.NDArray[np.float32] | None]: ...
def moe_config_preset(name: str, layer_id: int) -> dict[str, Any]: ...
def moe_config_validate(config: dict[str, Any]) -> None: ...
def moe_random_weights(config: dict[str, Any], seed: int) -> dict[str, Any]: ...
def moe_expected_peak_bytes(
    config: dict[str, Any],
    num_tokens: int,
    num_physical_experts: int,
    routed_lanes: int,
    shared_lanes: int,
    gate_lanes: int,
) -> int: ...
def moe_gemm_scratch_bytes(rows: int, k: int) -> int: ...

class DeepSeekMoE:
    def __init__(
        self,
        config: dict[str, Any],
        gate: npt.ArrayLike,
        correction_bias: npt.ArrayLike | None,
        w13: npt.ArrayLike,
        w2: npt.ArrayLike,
        shared_gate_up: npt.ArrayLike | None,
        shared_down: npt.ArrayLike | None,
        tid2eid: npt.ArrayLike | None,
        w13_scale_inv: npt.ArrayLike | None,
        w2_scale_inv: npt.ArrayLike | None,
        shared_gate_up_scale_inv: npt.ArrayLike | None,
        shared_down_scale_inv: npt.ArrayLike | None,
        location: ExpertLocation | None,
        layer: int,
        ep_rank: int,
    ) -> None: ...
    @property
    def num_physical_experts(self) -> int: ...
    @property
    def location(self) -> ExpertLocation: ...
    @property
    def layer(self) -> int: ...
    def config_dict(self) -> dict[str, Any]: ...
    def forward(
        self, hidden: npt.ArrayLike, input_ids: npt.ArrayLike | None = None
    ) -> npt.NDArray[Any]: ...
    def last_stats(self) -> dict[str, Any]: ...
    def routed_weights(
        self,
    ) -> tuple[
        npt.NDArray[Any],
        npt.NDArray[Any],
        npt.NDArray[np.float32] | None,
        npt.NDArray[np.float32] | None,
    ]: ...
    def fused_shared_weights(
        self,
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any]] | None: ...
    def set_location(self, location: ExpertLocation, layer: int) -> None: ...

def score_steps(
    counts: npt.NDArray[np.int32], location: ExpertLocation
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def step_lower_bounds(
    counts: npt.NDArray[np.int32], num_physical_experts: int, ep_size: int
) -> npt.NDArray[np.float64]: ...
def token_copies(
    physical: npt.NDArray[np.int32],
    source_rank: npt.NDArray[np.int32],
    num_physical_experts: int,
    ep_size: int,
    num_nodes: int,
    mode: str,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
def dispatch_table(
    location: ExpertLocation,
    dispatch: str,
    ep_rank: int,
    seed: int = 0,
    replica_order: npt.ArrayLike | None = None,
) -> npt.NDArray[np.int32]: ...
def dispatch_tables(
    location: ExpertLocation,
    dispatch: str,
    seed: int = 0,
    replica_order: npt.ArrayLike | None = None,
) -> npt.NDArray[np.int32]: ...
def sglang_replica_lists(
    location: ExpertLocation,
    ep_rank: int | None = None,
    replica_order: npt.ArrayLike | None = None,
) -> npt.NDArray[np.int32]: ...
def dispatch_tokens(
    topk_ids: npt.NDArray[np.int32],
    location: ExpertLocation,
    layer: int,
    dispatch: str = "sglang_static",
    ep_rank: int | None = None,
    rank_offsets: npt.ArrayLike | None = None,
    seed: int = 0,
) -> npt.NDArray[np.int32]: ...

DISPATCH_COST_OWN_RANK: int
DISPATCH_COST_SAME_NODE: int
DISPATCH_COST_OTHER_NODE: int

def balanced_split(
    counts: npt.ArrayLike,
    location: ExpertLocation,
    fixed_loads: npt.ArrayLike | None = None,
    layer: int | None = None,
    shares: str = "any",
) -> npt.NDArray[np.int64]: ...
def balanced_assignment(
    source_counts: npt.ArrayLike,
    location: ExpertLocation,
    fixed_loads: npt.ArrayLike | None = None,
    layer: int | None = None,
) -> npt.NDArray[np.int64]: ...
def _balanced_assignment_reference(
    source_counts: npt.ArrayLike,
    location: ExpertLocation,
    fixed_loads: npt.ArrayLike | None = None,
    layer: int | None = None,
) -> npt.NDArray[np.int64]: ...
def measure_machine_limits(
    threads: int, buffer_bytes: int, passes: int, seconds: float
) -> dict[str, Any]: ...
