"""The cluster simulator's parts, one concern per module (DESIGN section 7 and its overview's
item 6: "Simulate a serving cluster"). Import the simulator from ``moelb.simulate`` (or
``moelb``): that module is its public face and documents what it measures.

- ``presets``: model shapes (``ModelPreset``, ``MODEL_PRESETS``);
- ``config``: what to simulate (``SimulationConfig``, ``parse_algorithm``);
- ``traffic``: synthetic router inputs routed into a recorder, step by step;
- ``trace``: replayed per-step counts of a recorder dump;
- ``scoring``: balancedness of counts under a placement, and its bound;
- ``policies``: each placement policy's running state, scored and re-planned per window;
- ``token_level``: a step's tokens dispatched as an engine does, then Waterfill;
- ``timing``: the realised steps timed by the step-time model (``moelb.step_time``);
- ``results``: what ``simulate`` returns, and its JSON form;
- ``driver``: ``simulate`` itself, window by window.
"""
