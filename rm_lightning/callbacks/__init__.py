from rm_lightning.callbacks.generation_check import GenerationCheck
from rm_lightning.callbacks.margin_history import MarginHistory

__all__ = ["GenerationCheck", "MarginHistory"]
