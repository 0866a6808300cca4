"""Batches for Lightning: the resumable loader (a seeded order per epoch, the micro-batches of one
optimizer step collated together with their unit counts) and the DataModule."""

from __future__ import annotations

import math
import random
from collections import deque
from typing import Any, Iterator, Sized, cast

import lightning as L
from torch.utils.data import DataLoader

from lft.data.packing import concatenate, drops_padding, packable
from lft.errors import DataError

#: The key under which a training batch carries the unit counts of its optimizer step (taken off
#: the batch by the module before the objective sees it).
STEP_KEY = "lft_step"


class ResumableLoader(DataLoader):
    """A DataLoader over a seeded permutation per epoch that remembers how far it got, so a
    run resumed mid-epoch continues with the next batch rather than starting the epoch again.

    Lightning saves ``state_dict()`` in its checkpoints and calls ``load_state_dict`` on resume.

    With an ``objective`` (whose ``units(batch)`` counts what its loss averages over), each
    batch also carries, under ``STEP_KEY``, the counts of the optimizer step it belongs to: the
    ``accumulate`` consecutive batches of the epoch that are accumulated into one update (the
    last step of an epoch may have fewer). The step's batches are collated together when its
    first one is served, so the counts of the whole step are known before its first forward
    pass (see ``lft.objective``).
    """

    #: With ``lengths``, the shuffled order is cut into groups of this many batches, each group is
    #: sorted by length and batched, and the batches are shuffled: similar lengths share a batch.
    GROUP_BATCHES = 50
    #: Always an int here: the constructor takes one (a DataLoader's may be None).
    batch_size: int

    def __init__(
        self,
        dataset: list,
        batch_size: int,
        collate_fn: Any,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        lengths: list[int] | None = None,
        accumulate: int = 1,
        objective: Any = None,
    ):
        self._seed = seed
        self._accumulate = max(1, int(accumulate))
        self._objective = objective
        self._steps = 0  # serial of the optimizer step whose batches are being served
        self._lengths = lengths
        self._rank = rank
        self._world = world_size
        self._shuffle = shuffle
        self._epoch = 0
        self._consumed = 0
        self._resume_at = 0
        self._served: deque[tuple[int, list[int]]] = deque(maxlen=64)  # (serial, dataset indices)
        self._serial = 0
        super().__init__(
            dataset,  # type: ignore[arg-type]  # torch types it Dataset; a list is a map-style dataset
            batch_size=batch_size,
            collate_fn=collate_fn,
            shuffle=False,
            drop_last=drop_last,
        )

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(cast(Sized, self.dataset))))  # the list given to __init__
        if self._shuffle:
            random.Random(self._seed * 1000003 + epoch).shuffle(order)
        if self._world > 1:  # every rank sees its own equal share of the same permutation
            order = order[: len(order) - len(order) % self._world][self._rank :: self._world]
        return order

    def _batches(self, epoch: int) -> list[list[int]]:
        order = self._order(epoch)
        size = self.batch_size
        lengths = self._lengths
        if lengths is None:
            batches = [order[i : i + size] for i in range(0, len(order), size)]
        else:
            group = size * self.GROUP_BATCHES
            batches = []
            for g in range(0, len(order), group):
                ranked = sorted(order[g : g + group], key=lambda i: -lengths[i])
                batches += [ranked[i : i + size] for i in range(0, len(ranked), size)]
        if self.drop_last and batches and len(batches[-1]) < size:
            batches.pop()
        if self._lengths is not None and self._shuffle:
            random.Random(self._seed * 1000003 + epoch + 7919).shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]  # a generator, not torch's own iterator class
        batches = self._batches(self._epoch)
        start, self._resume_at = self._resume_at, 0
        self._consumed = start
        step: dict[int, Any] = {}
        for index in range(start, len(batches)):
            if self._objective is None:
                batch = self.collate_fn([self.dataset[i] for i in batches[index]])
            else:
                if index not in step:
                    step = self._collate_step(batches, index)
                batch = step.pop(index)
            self._consumed = index + 1
            self._served.append((self._serial, batches[index]))
            self._serial += 1
            yield batch
        self._epoch += 1
        self._consumed = 0

    def _collate_step(self, batches: list[list[int]], index: int) -> dict[int, Any]:
        """The collated batches of the optimizer step that holds batch ``index``, from ``index`` on,
        each tagged with the counts of its units and of the whole step's."""
        from lft.objective import add_units, units_of

        first = index - index % self._accumulate
        members = range(first, min(first + self._accumulate, len(batches)))
        collated = {i: self.collate_fn([self.dataset[j] for j in batches[i]]) for i in members}
        counts = {i: units_of(self._objective, collated[i]) for i in members}
        totals = add_units(list(counts.values()))
        self._steps += 1
        for i in members:
            collated[i][STEP_KEY] = {"step": self._steps, "units": counts[i], "totals": totals, "size": len(members)}
        return {i: b for i, b in collated.items() if i >= index}

    def __len__(self) -> int:
        n = len(cast(Sized, self.dataset)) // self._world
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def rows_of(self, serial: int) -> list[str] | None:
        """Where the rows of the ``serial``-th batch this loader served (counting from 0) came
        from, when the dataset is ``Examples``; None when unknown."""
        where = getattr(self.dataset, "where", None)
        for number, indices in self._served:
            if number == serial and where is not None:
                return [where[i] for i in indices]
        return None

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "consumed": self._consumed}

    def load_state_dict(self, state: dict) -> None:
        self._epoch = int(state.get("epoch", 0))
        self._resume_at = int(state.get("consumed", 0))


class LftDataModule(L.LightningDataModule):
    """Holds formatted examples; batches them through ``lft_collate``."""

    def __init__(
        self,
        train: list[dict],
        eval: list[dict] | None,
        hook: Any,
        tokenizer: Any,
        config: Any,
        objective: Any = None,
        stream: dict | None = None,
    ):
        super().__init__()
        self.stream = stream  # data.streaming: the sources to read as training goes (lft.data.stream)
        self.objective = objective  # counts the units of each optimizer step (``lft.objective``)
        self.train_features = train
        self.eval_features = eval or []
        self.hook = hook
        self.tokenizer = tokenizer
        self.config = config
        self._train_loader: Any = None

    def collate(self, features: list[dict]) -> dict:
        if self.objective.reads_packed_rows and self._drops_padding(features):  # one row, no padding
            features = [concatenate(features)]
        batch = self.hook.lft_collate(features=features, tokenizer=self.tokenizer, config=self.config)
        if batch is None:
            raise DataError("no selected plugin could collate a batch")
        return batch

    def _drops_padding(self, features: list[dict]) -> bool:
        setting = self.config.data.padding_free
        if setting == "auto" and (self.config.data.packing or len(features) < 2 or not packable(features)):
            return False
        return drops_padding(setting, lengths=[len(f["input_ids"]) for f in features])

    def train_dataloader(self) -> Any:
        if self.stream is not None:
            if self._train_loader is None:
                from lft.data.stream import StreamLoader

                trainer = getattr(self, "trainer", None)
                rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
                counted = self.objective is not None and not self.objective.steps_optimizer
                self._train_loader = StreamLoader(
                    self.stream, self.hook, self.tokenizer, self.config, self.collate,
                    objective=self.objective if counted else None, rank=rank, world_size=world,
                )  # fmt: skip
            return self._train_loader
        if self._train_loader is None:
            cfg = self.config.trainer
            trainer = getattr(self, "trainer", None)
            rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
            lengths = (
                [sum(len(v) for k, v in f.items() if k.endswith("input_ids")) for f in self.train_features]
                if self.config.data.group_by_length
                else None
            )
            # Objectives that step the optimizer themselves (online methods) count their own units.
            counted = self.objective is not None and not self.objective.steps_optimizer
            self._train_loader = ResumableLoader(
                self.train_features,
                cfg.batch_size,
                self.collate,
                cfg.seed,
                rank=rank,
                world_size=world,
                lengths=lengths,
                accumulate=cfg.grad_accum,
                objective=self.objective if counted else None,
            )
        return self._train_loader

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.eval_features,  # type: ignore[arg-type]  # torch types it Dataset; a list is a map-style dataset
            batch_size=self.config.trainer.batch_size,
            collate_fn=self.collate,
        )

    def eval_loader(self, batch_size: int | None = None) -> DataLoader:
        return DataLoader(
            self.eval_features,  # type: ignore[arg-type]  # torch types it Dataset; a list is a map-style dataset
            batch_size=batch_size or self.config.trainer.batch_size,
            collate_fn=self.collate,
        )
