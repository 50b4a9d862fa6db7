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


_LETTERS = frozenset(ROLE_LETTERS)


# -- role paths (merge chains) -----------------------------------------------------------------------------
# An input of a recipe nested at model A is named by the path of roles down to it: "a.b" is model B of the recipe
# that stands in for A; "a.vae", "a.lora1" likewise. Top-level inputs keep their plain roles.
def split_role(path: str) -> tuple[str, str]:
    """``"a.b.lora1"`` -> (``"a.b."``, ``"lora1"``); a top-level role has the prefix ``""``."""
    head, _, last = path.rpartition(".")
    return (head + "." if head else ""), last


def is_role_path(path: str) -> bool:
    """Every segment but the last a model letter; the last a model letter, ``vae`` or ``loraN``."""
    *steps, last = path.split(".")
    return all(s in _LETTERS for s in steps) and (last in _LETTERS or last == "vae" or is_lora_role(last))


def is_model_role(path: str) -> bool:
    """A model file's role path (not a VAE, not a LoRA)."""
    return is_role_path(path) and split_role(path)[1] in _LETTERS


def describe_role(path: str) -> str:
    """How messages name a role path: ``B``, ``A.B`` (model B of the recipe at A), ``A.LoRA 1``."""
    prefix, last = split_role(path)
    name = f"LoRA {last[4:]}" if is_lora_role(last) else last.upper()
    return prefix.upper() + name
