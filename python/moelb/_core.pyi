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
    def static_dispatch_table(self, ep_rank: int, seed: int = 0) -> npt.NDArray[np.int32]: ...
    def dispatch(
        self,
        topk_ids: npt.NDArray[np.int32],
        layer: int,
        ep_rank: int = 0,
        algorithm: str = "static",
        seed: int = 0,
    ) -> npt.NDArray[np.int32]: ...
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
    dispatch: str = "static",
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
        dispatch: str = "static",
        seed: int = 0,
    ) -> Any: ...
