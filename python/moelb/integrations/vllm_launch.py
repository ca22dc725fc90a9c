"""``python -m moelb.integrations.vllm_launch serve MODEL [vLLM's flags]``: vLLM's command line
with ``moelb.integrations.vllm.install()`` applied in every process (ours).

Runs vLLM's ``vllm`` command (``vllm.entrypoints.cli.main``) with the same arguments, after
``install()``. vLLM runs the EPLB policy in its worker processes; those started with
``multiprocessing`` ``spawn`` first re-run the parent's ``__main__`` module (this one, under the
name ``__mp_main__``), and forked ones inherit the patch, so every worker plans with moelb.
(Workers that are Ray actors do neither: use vLLM's plugin entry point there,
``docs/engines/vllm.md``.) ``MOELB_VLLM_OPTIONS`` (a JSON object, optional) gives ``install()``'s
keywords, e.g. ``'{"locality": "none"}'``. Importing this module also installs the policy (that
is its purpose)."""

from __future__ import annotations

import runpy

from moelb.integrations._common import install_at_launch
from moelb.integrations.vllm import install

__all__: list[str] = []

#: The environment variable holding install()'s keywords as a JSON object.
OPTIONS_VARIABLE = "MOELB_VLLM_OPTIONS"


install_at_launch(install, OPTIONS_VARIABLE, __name__, __spec__.name if __spec__ else __name__)

if __name__ == "__main__":
    # vLLM's own entry point (its `vllm` command), with this process's arguments (sys.argv[1:]);
    # __main__ stays this module, so the processes vLLM spawns re-run the install() above.
    runpy.run_module("vllm.entrypoints.cli.main", run_name="__main__", alter_sys=False)
