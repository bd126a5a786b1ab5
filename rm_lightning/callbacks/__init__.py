"""What a run records: margin history (TensorBoard, CSV, PNG), generation checks, results.json and
predictions.jsonl; and when it stops training (TrainingPlateau)."""

from rm_lightning.callbacks.generation_check import GenerationCheck
from rm_lightning.callbacks.margin_history import MarginHistory
from rm_lightning.callbacks.predictions import PredictionsWriter
from rm_lightning.callbacks.results import ResultsWriter
from rm_lightning.callbacks.run_directory import run_dir
from rm_lightning.callbacks.training_plateau import TrainingPlateau

__all__ = ["GenerationCheck", "MarginHistory", "PredictionsWriter", "ResultsWriter", "TrainingPlateau", "run_dir"]
