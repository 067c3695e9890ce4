"""Mixing several sources into one training set, and the batches a trainer draws from it.

mix:     per-source caps and weights, deduplication on normalised text, a validation split —
         all decided by the seed alone, so two runs (or two ranks) build the same sets.
Batches: length-grouped global batches (padding-efficient, deterministic), with a state
         (epoch, position) that a checkpoint saves so a resumed run sees exactly the batches
         it would have seen. Batches are global: a trainer splits each among ranks and
         micro-batches, so the sequence of batches does not depend on the number of ranks.
"""

from __future__ import annotations

import math
import random
import re
import unicodedata
from dataclasses import dataclass


@dataclass
class Source:
    name: str
    records: list[dict]
    weight: float = 1.0  # <1 subsamples, >1 repeats (after the validation split)
    cap: int | None = None  # at most this many records, before weighting


_NOT_TEXT = re.compile(r"[\W_]+", re.UNICODE)


def normalise(text: str) -> str:
    """The text used to detect duplicates: NFKC (full-width -> ASCII), lower case, no
    whitespace or punctuation."""
    return _NOT_TEXT.sub("", unicodedata.normalize("NFKC", text).lower())


def dedup_key(record: dict) -> str:
    key = "\x1f".join(m["role"][0] + normalise(m["content"]) for m in record["messages"])
    if "chosen" in record:
        key += "\x1f" + normalise(record["chosen"]) + "\x1f" + normalise(record["rejected"])
    return key


def mix(sources: list[Source], *, seed: int = 0, val_fraction: float = 0.05):
    """-> (train, val, rows): rows summarise each source for the printed table.

    Per source, in order: drop duplicates (also of anything an earlier source kept), order the
    rest by content and shuffle them with a seed derived from (seed, the source's position in
    the list) — not its name, which is often a path and would make the split depend on where
    the data lives, and not the order of its lines — apply the cap, hold out val_fraction (at
    least one record when the source has two or more), then weight the training part. The
    training set is shuffled once more at the end. A caller whose list of sources has no order
    of its own (train_sft.py's --data) sorts it by content first.
    """
    seen: set[str] = set()
    train, val, rows = [], [], []
    for position, src in enumerate(sources):
        keyed = []  # (key, record): each key computed once (NFKC of the whole text: most of mix's time)
        for r in src.records:
            k = dedup_key(r)
            if k not in seen:
                seen.add(k)
                keyed.append((k, r))
        # By content: the shuffle below then depends on the records, not on their order in the file.
        unique = [r for _, r in sorted(keyed, key=lambda kr: kr[0])]
        rng = random.Random(f"{seed}:{position}")
        rng.shuffle(unique)
        capped = unique[: src.cap] if src.cap is not None else unique
        n_val = math.ceil(len(capped) * val_fraction) if val_fraction > 0 and len(capped) > 1 else 0
        src_val, src_train = capped[:n_val], capped[n_val:]
        whole, part = divmod(src.weight, 1.0)
        weighted = src_train * int(whole) + src_train[: round(len(src_train) * part)]
        train += weighted
        val += src_val
        rows.append(
            {
                "source": src.name,
                "read": len(src.records),
                "duplicates": len(src.records) - len(unique),
                "capped": len(unique) - len(capped),
                "val": len(src_val),
                "train": len(weighted),
            }
        )
    random.Random(f"{seed}:mix").shuffle(train)
    return train, val, rows


def length_stats(lengths: list[int]) -> dict:
    """Count, total and the 50th/90th/99th percentiles and maximum of lengths."""
    if not lengths:
        return {"count": 0, "total": 0, "p50": 0, "p90": 0, "p99": 0, "max": 0}
    s = sorted(lengths)

    def pct(q):  # nearest-rank percentile
        return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]

    return {"count": len(s), "total": sum(s), "p50": pct(50), "p90": pct(90), "p99": pct(99), "max": s[-1]}


class LengthGroupedBatches:
    """Global batches of indices, grouped by length, in an order fixed by (seed, epoch).

    Each epoch: shuffle all indices, cut them into groups of `group_batches` batches, sort each
    group by length and cut it into batches, then shuffle the batches. Sequences in a batch
    have similar lengths (little padding) while the batch order stays random. The last batch
    of an epoch may be short; drop_last leaves it out.
    """

    def __init__(
        self, lengths: list[int], batch_size: int, *, seed: int = 0, group_batches: int = 32, drop_last: bool = False
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.group_batches, self.drop_last = group_batches, drop_last
        self.epoch, self.position = 0, 0

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        group = self.batch_size * self.group_batches
        batches = []
        for g in range(0, len(order), group):
            chunk = sorted(order[g : g + group], key=lambda i: self.lengths[i])
            batches += [chunk[b : b + self.batch_size] for b in range(0, len(chunk), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        rng.shuffle(batches)
        return batches

    def __len__(self) -> int:
        return len(self.epoch_batches(0))

    def __iter__(self):
        """Batches from the saved position onwards, forever (epoch after epoch)."""
        while True:
            batches = self.epoch_batches(self.epoch)
            while self.position < len(batches):
                batch = batches[self.position]
                self.position += 1
                yield batch
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "n": len(self.lengths),
        }

    def load_state_dict(self, state: dict):
        for key in ("seed", "batch_size", "n"):
            mine = {"seed": self.seed, "batch_size": self.batch_size, "n": len(self.lengths)}[key]
            if state[key] != mine:
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]}, this run has {mine}: "
                    "the data or the batch size changed since the checkpoint"
                )
        self.epoch, self.position = state["epoch"], state["position"]
