"""One LightningDataModule per dataset; each shift variant is a named eval set."""

from data_modules.base import EvalSet, PreferenceDataModule
from data_modules.hamiltonian import HamiltonianCycleDataModule
from data_modules.persona import PersonaDataModule
from data_modules.preference import RealWorldDataModule
from data_modules.preference_sources import EvalSetSource, PairSource

__all__ = ["EvalSet", "PreferenceDataModule", "PersonaDataModule", "RealWorldDataModule", "PairSource", "EvalSetSource",
           "HamiltonianCycleDataModule"]
