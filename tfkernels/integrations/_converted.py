"""The IntervalMasks a library's dense masks were converted to, remembered per tensor.

Every attention layer of a forward gets the same mask tensor (one per layer type or per
attention kind), so an integration converts each tensor once per forward instead of once per layer.
"""

from __future__ import annotations

import weakref

import torch

from ..mask import IntervalMask


class ConvertedMasks:
    """The conversions of the last few mask tensors (``None``: the tensor is not an interval mask).

    An entry holds its tensor weakly and is found again only for the same tensor object at the same
    version counter (an in-place edit converts again) and the same ``key`` (what else the conversion
    depended on, e.g. the number of queries).
    """

    def __init__(self, size: int = 4):
        self._entries: list[tuple[weakref.ref, int, tuple, IntervalMask | None]] = []
        self._size = size

    def lookup(self, dense: torch.Tensor, key: tuple = ()):
        """``(True, mask_or_None)`` if ``dense`` was converted as it is now for ``key``, else ``(False, None)``."""
        for ref, version, entry_key, mask in self._entries:
            if ref() is dense and version == dense._version and entry_key == key:
                return True, mask
        return False, None

    def remember(self, dense: torch.Tensor, mask: IntervalMask | None, key: tuple = ()) -> None:
        live = [entry for entry in self._entries
                if entry[0]() is not None and not (entry[0]() is dense and entry[2] == key)]
        self._entries = [(weakref.ref(dense), dense._version, key, mask)] + live[: self._size - 1]
