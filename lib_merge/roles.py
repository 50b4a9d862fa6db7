"""Model roles: the letters that name a merge's inputs (A the base, then B, C, D, …), in one place."""
from __future__ import annotations

MAX_MODELS = 10  # a task-vector mode holds every input's copy of the largest tensor at once
ROLE_LETTERS = "abcdefghij"[:MAX_MODELS]


def role(i: int) -> str:
    """The metadata role of input ``i`` ("a", "b", …)."""
    return ROLE_LETTERS[i]


def label(i: int) -> str:
    """How messages name input ``i`` ("A", "B", …)."""
    return ROLE_LETTERS[i].upper()


def labels(n: int) -> str:
    """``"A B C"`` for three models."""
    return " ".join(label(i) for i in range(n))


def lora_role(i: int) -> str:
    """The metadata role of the recipe's LoRA ``i`` ("lora1", "lora2", …, as ``lora bake`` records them)."""
    return f"lora{i + 1}"


def is_lora_role(role: str) -> bool:
    """``lora1``, ``lora2``, … (no ``lora0``, no leading zeros)."""
    n = role[4:]
    return role.startswith("lora") and n.isdigit() and not n.startswith("0")
