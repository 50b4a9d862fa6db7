"""How tensors combine: modes (the formula across models) and, inside a mode, methods (how two tensors
combine), each declaring its parameters where it is defined (``Param``)."""
from . import pairwise  # noqa: F401  (registers the methods)
from .formula import Formula, bind
from .modes import MODES, Mode, get_mode
from .params import Param
from .registry import METHODS, Method, get_method

__all__ = ["Formula", "bind", "MODES", "Mode", "get_mode", "Param", "METHODS", "Method", "get_method"]
