"""Every option a config can set has a description in ``--help``: jsonargparse reads them from the class's
"Args:" section, and one unparseable entry (a literal newline, two names on one line) left every option of that
class without one."""

import inspect

import docstring_parser
import pytest

import data_modules
import rm_lightning.callbacks as callbacks
from rm_lightning import ExplicitGenerativeRM, ExplicitRM, ImplicitRM
from rm_lightning.dynamics import DynamicsMonitor
from rm_lightning.models.reward_module import RewardModule

CONFIGURABLE = [RewardModule, ExplicitRM, ImplicitRM, ExplicitGenerativeRM, DynamicsMonitor,
                *(getattr(data_modules, name) for name in dir(data_modules) if name.endswith("DataModule")),
                *(getattr(callbacks, name) for name in callbacks.__all__ if isinstance(getattr(callbacks, name), type))]


@pytest.mark.parametrize("cls", CONFIGURABLE, ids=lambda cls: cls.__name__)
def test_every_init_option_has_a_description(cls):
    described = {param.arg_name for doc in (cls.__doc__, cls.__init__.__doc__) if doc
                 for param in docstring_parser.parse(doc).params}
    options = [name for name, param in inspect.signature(cls.__init__).parameters.items()
               if name != "self" and param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL)]
    assert [name for name in options if name not in described] == []
