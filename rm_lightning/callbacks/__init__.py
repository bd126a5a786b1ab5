from rm_lightning.callbacks.margin_history import MarginHistory

__all__ = ["MarginHistory"]
