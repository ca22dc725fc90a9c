"""``python -m moelb.integrations.sglang_launch [SGLang's server flags]``: SGLang's server with
``moelb.integrations.sglang.install()`` applied in every process (ours).

Runs ``python -m sglang.launch_server`` with the same flags, after ``install()``. SGLang starts its
scheduler processes with ``multiprocessing`` (``spawn``); a spawned process first re-runs the
parent's ``__main__`` module (this one, under the name ``__mp_main__``), so the ``install()`` below,
outside the ``__main__`` block, patches every one of them before SGLang's code runs there.
``MOELB_SGLANG_OPTIONS`` (a JSON object, optional) gives ``install()``'s keywords, e.g.
``'{"locality": "none"}'``. Importing this module also installs the patch (that is its purpose)."""

from __future__ import annotations

import runpy

from moelb.integrations._common import install_at_launch
from moelb.integrations.sglang import install

__all__: list[str] = []

#: The environment variable holding install()'s keywords as a JSON object.
OPTIONS_VARIABLE = "MOELB_SGLANG_OPTIONS"


install_at_launch(install, OPTIONS_VARIABLE, __name__, __spec__.name if __spec__ else __name__)

if __name__ == "__main__":
    # SGLang's own entry point, with this process's flags (sys.argv[1:]); __main__ stays this
    # module, so the processes SGLang spawns re-run the install() above.
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=False)
