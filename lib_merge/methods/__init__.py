"""How tensors combine: modes (the formula across models) and, inside a mode, methods (how two tensors
combine), each declaring its parameters where it is defined (``Param``)."""
from . import pairwise, taskvec  # noqa: F401  (register the methods and the variadic modes)
from .formula import Formula, bind, params_for
from .modes import MODES, Mode, get_mode
from .params import Param
from .registry import METHODS, Method, get_method

__all__ = ["Formula", "bind", "params_for", "MODES", "Mode", "get_mode", "Param", "METHODS", "Method", "get_method"]
