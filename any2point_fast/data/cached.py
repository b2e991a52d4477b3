"""A dataset wrapper that can keep the raw items of its base dataset in memory."""

from __future__ import annotations

from torch.utils.data import Dataset


class CachedItems(Dataset):
    """The items of ``base``, read once and kept when ``cache`` is on (``_raw(index)``); subclasses
    turn a raw item into a training item in ``__getitem__``."""

    def __init__(self, base: Dataset, cache: bool = False):
        self.base = base
        self._cache: dict[int, tuple] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.base)

    def preload(self) -> None:
        """Read every raw item into the cache now (before DataLoader workers start and copy it)."""
        if self._cache is not None:
            for index in range(len(self)):
                self._raw(index)

    def _raw(self, index: int) -> tuple:
        if self._cache is None:
            return self.base[index]
        if index not in self._cache:
            self._cache[index] = self.base[index]
        return self._cache[index]


__all__ = ["CachedItems"]
