"""CALVIN's own simulator (calvin_env, an optional extra) behind the evaluation interface, and the data of
CALVIN's protocol that calvin_env does not ship: the 1000 evaluation chains and the instructions.

``sequences`` and ``instructions`` need numpy only; ``env`` and ``expert`` import calvin_env, which is
installed with ``pip install vlaops[calvin]`` or, offline, ``make install`` beside a calvin_env snapshot
(docs/calvin.md).
"""
