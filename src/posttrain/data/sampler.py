"""Seeded epoch order over a dataset, whose position a checkpoint saves and restores exactly."""

from __future__ import annotations

import torch

from posttrain.data.errors import DataError
from posttrain.data.report import LoadReport


class EpochSampler:
    """Endless seeded epochs over `n` items; its position is saved in checkpoints and restored exactly."""

    def __init__(self, n: int, *, seed: int, report: LoadReport | None = None):
        if n == 0:
            counts = f" ({report.summary()})" if report is not None else ""
            raise DataError(
                f"no training examples are left after validation and truncation{counts}; a row too long for "
                "data.max_length is dropped, also when truncating would leave it nothing to train on",
                reason="empty dataset",
            )
        self.n, self.seed = n, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def take(self, count: int) -> list[int]:
        picked = []
        while len(picked) < count:
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(count - len(picked), self.n - self.cursor)
            picked += self._order[self.cursor : self.cursor + take]
            self.cursor += take
        return picked

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=generator).tolist()
