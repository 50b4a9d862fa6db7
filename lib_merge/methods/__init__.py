"""How tensors combine: modes (the formula across models) and, inside a mode, methods (how two tensors
combine), each declaring its parameters where it is defined."""
