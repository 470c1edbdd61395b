"""Many adapters in one batch: the rows of a batch grouped by adapter name (``adapter_names``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch

from ..errors import VBLoRAError

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in ``adapter_names``


class RowGroups:
    """The rows of a batch grouped by adapter name, worked out once per forward and shared by every layer.

    ``names[i]`` is the adapter of sample ``i``. A layer whose input has ``m * len(names)`` rows (``generate``
    repeats each sample for beams or returned sequences, and some models flatten ``(batch, seq)``) gives each
    sample's ``m`` consecutive rows to its adapter."""

    def __init__(self, names: Sequence[str]) -> None:
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise VBLoRAError(f"adapter_names must be a list of adapter names (str), one per sample, got {names!r}")
        self.names = list(names)
        self.groups: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            self.groups.setdefault(name, []).append(i)
        self._index: dict[tuple[str, int, torch.device], torch.Tensor] = {}

    @classmethod
    def of(cls, names: Union[RowGroups, Sequence[str]]) -> RowGroups:
        return names if isinstance(names, RowGroups) else cls(names)

    def __len__(self) -> int:
        return len(self.names)

    def rows_per_sample(self, rows: int, where: str) -> int:
        n = len(self.names)
        if n == 0 or rows % n != 0:
            raise VBLoRAError(
                f"{where}: length of `adapter_names` should be the same as the number of inputs, but got {n} and "
                f"{rows} respectively"
            )
        return rows // n

    def index(self, name: str, per_sample: int, device: torch.device) -> torch.Tensor:
        """Row indices (int64 on ``device``) of adapter ``name`` in an input of ``per_sample`` rows per sample."""
        key = (name, per_sample, device)
        index = self._index.get(key)
        if index is None:
            samples = torch.tensor(self.groups[name], dtype=torch.long)
            index = (samples[:, None] * per_sample + torch.arange(per_sample)).reshape(-1).to(device)
            self._index[key] = index
        return index
