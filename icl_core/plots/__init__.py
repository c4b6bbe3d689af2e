"""Figures: one ``plot_<figure>(data) -> Figure`` per paper figure, one module per chapter.

``intro`` (introduction), ``cooccurrence`` (Argument 1), ``coperturbation`` (2), ``ablation`` (3),
``generality`` (4), ``mechanism`` (5), ``continuity`` (6). The introduction's functions are also
importable from ``icl_core.plots`` directly.
"""
from .intro import *  # noqa: F401,F403
