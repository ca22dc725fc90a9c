"""Model presets of the simulator: the shape of each DeepSeek model as far as expert placement goes
(layers, experts, groups, hash layers, weight bytes). DESIGN section 7 (the simulator)."""

from __future__ import annotations

from dataclasses import dataclass

from .._core import TopKConfig

__all__ = ["MODEL_PRESETS", "ModelPreset"]


@dataclass(frozen=True)
class ModelPreset:
    """The shape of a model as far as expert placement goes.

    num_hidden_layers: decoder layers (the rows of SGLang's placement files, dense ones included);
    first_moe_layer: the first MoE layer (DeepSeek-V3: 3; earlier layers are dense);
    num_hash_layers: V4: the first MoE layers route by token id (``HashRouter``);
    expert_bytes: one routed expert's weights (gate, up and down projections, FP8: 1 byte each).
    """

    name: str
    num_hidden_layers: int
    first_moe_layer: int
    num_experts: int
    num_groups: int | None
    num_hash_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int = 129280
    weight_bytes: int = 1

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_moe_layer

    @property
    def expert_bytes(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size * self.weight_bytes

    def topk_config(self) -> TopKConfig:
        return {
            "deepseek-v3": TopKConfig.deepseek_v3,
            "deepseek-v4-flash": TopKConfig.deepseek_v4_flash,
            "deepseek-v4-pro": TopKConfig.deepseek_v4_pro,
        }[self.name]()


MODEL_PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset("deepseek-v3", 61, 3, 256, 8, 0, 7168, 2048),
        ModelPreset("deepseek-v4-flash", 43, 0, 256, 8, 3, 4096, 2048),
        ModelPreset("deepseek-v4-pro", 61, 0, 384, 8, 3, 7168, 3072),
    )
}
