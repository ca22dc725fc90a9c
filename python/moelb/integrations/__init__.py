"""moelb behind the engines' own EPLB policy signatures (ours; ``reference/integrations.md``).

- ``moelb.integrations.deepseek``: ``rebalance_experts`` with DeepSeek ``eplb.py``'s signature and
  return triple; ``algorithm="moelb"`` (the default) or ``"deepseek"``.
- ``moelb.integrations.sglang``: SGLang's ``rebalance_experts`` (``srt/eplb/eplb_algorithms``) and
  ``install()``, which makes ``--eplb-algorithm moelb`` plan with moelb in a running SGLang.
- ``moelb.integrations.vllm``: ``MoelbEplbPolicy`` (vLLM's ``AbstractEplbPolicy`` contract) and
  ``install()``, which puts it in the place of vLLM's ``"default"`` policy.

Importing this package (or moelb) imports neither PyTorch nor an engine: the adapters import
PyTorch on their first call, ``install()`` imports the engine it patches. The errors below are
shared by all three.
"""

from ._common import EngineLayoutError, EngineNotFoundError, EnginePreconditionError

__all__ = ["EngineLayoutError", "EngineNotFoundError", "EnginePreconditionError"]
