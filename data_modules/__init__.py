"""One LightningDataModule per dataset; each shift variant is a named eval set."""

from data_modules.base import EvalSet, PreferenceDataModule
from data_modules.persona import PersonaDataModule

__all__ = ["EvalSet", "PreferenceDataModule", "PersonaDataModule"]
