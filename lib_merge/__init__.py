"""BlockMerge engine: block-weighted merging of SD1/SD2/SDXL checkpoints, streamed one tensor at a time."""
from .errors import MergeError, MergeInterrupted
from .recipe import Recipe

__all__ = ["MergeError", "MergeInterrupted", "Recipe", "merge_to_file", "merge_to_folder"]
__version__ = "0.1.0"


def merge_to_file(*args, **kwargs):
    from .merge import merge_to_file as _m
    return _m(*args, **kwargs)


def merge_to_folder(*args, **kwargs):
    """:func:`merge_to_file`, written as a diffusers folder (see :mod:`lib_merge.folder_output`)."""
    from .folder_output import merge_to_folder as _m
    return _m(*args, **kwargs)
