"""LoRA block weights (``LORA:STRENGTH:BLOCKS``), as the WebUI's LoRA Block Weight extension and supermerger's
LoRA tab define them (``shared/docs/merge-conventions.md`` §1.8, "LoRA block-weight presets").

A vector has 12, 17, 20 or 26 values, each naming the blocks below; it is expanded to the 26 SD1 block IDs
(BASE, IN00–IN11, M00, OUT00–OUT11), a block the vector does not name getting 0, as supermerger does:

- 12: BASE, IN04, IN05, IN07, IN08, M00, OUT00–OUT05 (the SDXL LoRA layout: its transformer blocks);
- 17: BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03–OUT11 (SD1 blocks that hold LoRA attention modules);
- 20: BASE, IN00–IN08, M00, OUT00–OUT08 (full SDXL);
- 26: BASE, IN00–IN11, M00, OUT00–OUT11 (full SD1).

IDs are labels of compvis block indices, the same on SD1 and SDXL (``input_blocks.4`` is IN04 on both). Which
block a module is in is the block of the checkpoint weight it patches, by :func:`lib_merge.arch.block_of` (text
encoder modules: BASE; ``time_embed``: IN00; ``out.``: the last OUT block). Presets are the extension's
built-in 17-value list; the 61-value Flux form is not accepted (no Flux here).
"""
from __future__ import annotations

from ..arch import SD1_BLOCKS
from ..errors import MergeError
from ..weights import parse_number, split_values


def _ids(prefix: str, numbers) -> tuple[str, ...]:
    return tuple(f"{prefix}{i:02d}" for i in numbers)


LAYOUTS: dict[int, tuple[str, ...]] = {
    12: ("BASE", *_ids("IN", (4, 5, 7, 8)), "M00", *_ids("OUT", range(6))),
    17: ("BASE", *_ids("IN", (1, 2, 4, 5, 7, 8)), "M00", *_ids("OUT", range(3, 12))),
    20: ("BASE", *_ids("IN", range(9)), "M00", *_ids("OUT", range(9))),
    26: SD1_BLOCKS,
}

PRESETS: dict[str, tuple[float, ...]] = {
    "NONE": (0.0,) * 17,
    "ALL": (1.0,) * 17,
    "INS": (1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "IND": (1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "INALL": (1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "MIDD": (1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "OUTD": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "OUTS": (1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1),
    "OUTALL": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1),
    "ALL0.5": (0.5,) * 17,
}


def expand(values: list[float] | tuple[float, ...], where: str) -> dict[str, float]:
    """Block ID -> value for all 26 SD1 IDs; IDs the vector's layout does not name get 0."""
    layout = LAYOUTS.get(len(values))
    if layout is None:
        raise MergeError(f"LoRA block weights have {len(values)} values; accepted lengths are "
                         f"{', '.join(str(n) for n in LAYOUTS)}, {where}")
    out = dict.fromkeys(SD1_BLOCKS, 0.0)
    out.update(zip(layout, (float(v) for v in values)))
    return out


def parse_blocks(text: str, where: str) -> dict[str, float]:
    """A preset name or an inline comma (or space) separated vector -> the expanded 26-block table.
    ``where`` names the LoRA (file) for the error message."""
    t = text.strip()
    if t in PRESETS:
        return expand(PRESETS[t], where)
    tokens = split_values(t)
    if len(tokens) == 1:
        try:
            float(tokens[0])
        except ValueError:
            raise MergeError(f"unknown LoRA block-weight preset {t!r} (presets: {', '.join(PRESETS)}), "
                             f"{where}") from None
    values = [parse_number(v, f"LoRA block weights, {where}") for v in tokens]
    return expand(values, where)
