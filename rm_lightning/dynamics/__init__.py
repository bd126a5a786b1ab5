"""Why IM-RMs fail, as tools (the paper's §4): what one gradient step does to other rewards
(``one_step``, ``closed_forms``), watched during training (``monitor``), the max-margin
separator an EX-RM head tends to (``max_margin``), and Theorem 1 checked exactly (``theorem1``)."""

from rm_lightning.dynamics.monitor import DynamicsMonitor
from rm_lightning.dynamics.one_step import OneStepChange, one_step_change, one_step_changes

__all__ = ["DynamicsMonitor", "OneStepChange", "one_step_change", "one_step_changes"]
