"""The SFT corpus rendered once, on disk, memory-mapped by every rank and every rerun.

A corpus of n rendered conversations is four flat arrays in a directory, in native byte order:

    ids.int32       every conversation's token ids, one after another
    labels.int32    their labels (IGNORE_INDEX where no loss is taken)
    offsets.int64   n + 1 offsets: conversation i is ids[offsets[i]:offsets[i + 1]]
    labelled.int32  n counts of labelled positions after the first (what a step divides by)

A corpus of prompts (PPO's: token ids to generate from, no labels) has ids and offsets only.

At the paper's size (226,042 conversations of about 1,024 tokens, Table 3) that is ~1.8 GB on
disk. train_sft.py renders its data into a cache directory, one entry per key, the key being
everything the rendering depends on: the data (by content), the tokenizer (by content), the
settings that select and cut conversations, and the code in data/ and tokenizer.py. Rank 0
renders a missing entry alone, writing the arrays as it goes with the sha256 of each file,
and renames the finished directory into place, so a half-written entry is never taken; an
entry is taken only when every file is what was written (its digest, checked when the entry
is opened: a file damaged in place is rendered again). Runs that share a cache take its lock
while they check or build an entry, and a whole entry is never removed, so two runs starting
together render it once and both use it. Every rank then maps the same files: its
memory holds the pages of the conversations it draws (its share of each batch), and the
page cache of a node holds one copy for all its ranks. A rerun finds the entry and starts
without reading or rendering the data again (nanoGPT's prepare-once design).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from data.mixing import mix
from data.readers import read
from data.schema import Report
from data.template import IGNORE_INDEX, Rendered, render

ARRAYS = {"ids": np.int32, "labels": np.int32, "offsets": np.int64, "labelled": np.int32}
META = "corpus.json"  # written last: an entry without it is not finished
CODE = [*sorted((Path(__file__).parent).glob("*.py")), Path(__file__).parents[1] / "tokenizer.py"]


class Corpus:
    """A rendered corpus (the layout above), memory-mapped: corpus[i] is conversation i as a
    Rendered whose ids and labels are views of the files, read when they are used; in a corpus
    of prompts, prompt i's ids as a list."""

    def __init__(self, directory: Path):
        labelled = (directory / "labels.int32").exists()
        arrays = {
            name: _array(directory, name, dtype)
            for name, dtype in ARRAYS.items()
            if labelled or name in ("ids", "offsets")
        }
        self.ids, self.offsets = arrays["ids"], arrays["offsets"]
        self.labels, self.labelled = arrays.get("labels"), arrays.get("labelled")
        n = len(self.offsets) - 1
        if (
            n < 0
            or int(self.offsets[-1]) != len(self.ids)
            or (labelled and (len(self.labelled) != n or len(self.labels) != len(self.ids)))
        ):
            raise ValueError(f"{directory}: the arrays of a rendered corpus do not agree in size")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} of a corpus of {len(self)}")
        i %= len(self)
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        if self.labels is None:
            return self.ids[start:end].tolist()
        return Rendered(self.ids[start:end], self.labels[start:end], labelled=int(self.labelled[i]))

    @property
    def lengths(self) -> list[int]:
        """Every conversation's length in tokens (from the offsets: no token is read)."""
        return np.diff(self.offsets).tolist()


def _array(directory: Path, name: str, dtype) -> np.ndarray:
    path = directory / f"{name}.{np.dtype(dtype).name}"
    if path.stat().st_size == 0:  # an empty file cannot be mapped
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def write_corpus(directory: Path, items, labels: bool = True) -> dict:
    """Rendered conversations (labels: ids, labels and the labelled counts), or prompts (lists
    of ids: ids only), from any iterable -> the arrays in `directory`, written as they come:
    the writer holds one item at a time. Returns the counts and each file's sha256, hashed as
    it is written (no second read)."""
    directory.mkdir(parents=True, exist_ok=True)
    names = [f"{name}.int32" for name in (["ids", "labels"] if labels else ["ids"])]
    files = {name: open(directory / name, "wb") for name in names}
    digests = {name: hashlib.sha256() for name in names}
    offsets, labelled = [0], []

    def write(name: str, data: bytes):
        files[name].write(data)
        digests[name].update(data)

    try:
        for x in items:
            ids = np.asarray(x.ids if labels else x, dtype=np.int32)
            write("ids.int32", ids.tobytes())
            offsets.append(offsets[-1] + len(ids))
            if labels:
                y = np.asarray(x.labels, dtype=np.int32)
                write("labels.int32", y.tobytes())
                labelled.append(int(np.count_nonzero(y[1:] != IGNORE_INDEX)))
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files.values():
            f.close()
    for name, values in [("offsets", offsets)] + ([("labelled", labelled)] if labels else []):
        data = np.asarray(values, dtype=ARRAYS[name]).tobytes()
        filename = f"{name}.{np.dtype(ARRAYS[name]).name}"
        with open(directory / filename, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        digests[filename] = hashlib.sha256(data)
    return {
        "items": len(offsets) - 1,
        "tokens": offsets[-1],
        "sha256": {name: h.hexdigest() for name, h in sorted(digests.items())},
    }


def entry_name(key: dict) -> str:
    """The cache entry of a key: its digest with that of the code that renders (data/*.py and
    tokenizer.py), so that a change to the template, the readers or the mixing renders anew."""
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    for f in CODE:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


class Damaged(ValueError):
    """An entry that is there but not what was written: the message names the file."""


def complete(entry: Path, verify: bool = True) -> dict | None:
    """The meta record of a finished, whole entry; None when there is none (or none finished);
    Damaged, naming the file, when one is there but its arrays disagree in size or (verify) a
    file's sha256 is not the one recorded when it was written. Verifying reads every file once,
    on rank 0: 1.3-1.5 s a GB here (hashlib.file_digest from the page cache, this 2-core
    machine), so about 2.5 s for the paper's 1.8 GB corpus, beside a rerun's 9.6 s to step 1."""
    try:
        meta = json.loads((entry / META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise Damaged(f"{entry / META}: not readable ({e})") from None
    try:
        for part in meta["parts"]:
            if len(Corpus(entry / part)) != meta[part]["items"]:
                raise Damaged(f"{entry / part}: {len(Corpus(entry / part))} items, {meta[part]['items']} written")
            for name, digest in meta["sha256"][part].items() if verify else ():
                with open(entry / part / name, "rb") as f:
                    if hashlib.file_digest(f, "sha256").hexdigest() != digest:
                        raise Damaged(f"{entry / part / name}: its contents are not what was written (sha256 differs)")
    except (OSError, KeyError, TypeError, IndexError) as e:
        raise Damaged(f"{entry}: not a whole entry ({type(e).__name__}: {e})") from None
    except ValueError as e:
        raise Damaged(str(e)) from None
    return meta


@contextlib.contextmanager
def _locked(cache: Path):
    """The cache's lock (an flock on its directory: no file of its own), held while a run checks
    or builds an entry in it; runs that render other entries into one cache take turns."""
    fd = os.open(cache, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def ensure_entry(entry: Path, key: dict, build, labels: bool = True, say=print) -> dict:
    """The entry's meta record, rendering it first (build_entry) when there is none or the one
    there is damaged (said, naming the file), under the cache's lock: runs that share the cache
    and start together render it once."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with _locked(entry.parent):
        try:
            meta = complete(entry)
        except Damaged as e:
            say(f"{e}: rendering the entry again")
            meta = None
        if meta is not None:
            say(f"the rendered data from the cache: {entry}")
            return meta
        say(f"rendering the data into {entry} (once: a rerun maps it)")
        return build_entry(entry, key, build, labels)


def build_entry(entry: Path, key: dict, build, labels: bool = True) -> dict:
    """Write the entry that `build() -> ({part: items}, report)` makes (each part's items an
    iterable, written as it comes, conversations or, without labels, prompts; the report
    complete once they are used up), into a temporary directory beside it, renamed into place
    when whole: one a killed build left is never taken. An entry already there (a damaged one)
    is first renamed aside, never removed where it stands, and the rename into place never
    replaces a whole one. Returns its meta record."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    try:
        parts, report = build()
        meta = {"key": key, "parts": list(parts)}
        for part, items in parts.items():
            meta[part] = write_corpus(tmp / part, items, labels)
            meta.setdefault("sha256", {})[part] = meta[part].pop("sha256")
        meta["summary"] = report.summary() if report else ""
        (tmp / META).write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
        if entry.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{entry.name}.old-", dir=entry.parent))
            os.rename(entry, aside / "entry")  # maps of its files stay valid until they are closed
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.rename(tmp, entry)  # never replaces an entry: a directory there makes it fail
        except OSError as e:  # another run placed a whole one first (runs without the lock: ensure_entry's)
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            return complete(entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def read_sources(files, report, fmt: str | None = None, encoding: str = "utf-8") -> list:
    """Conversations from files in any format data/ reads, as mixing Sources. One that ends with
    the patient's turn has nothing to learn at its end: its last turn is dropped (the answered
    rounds before it stay) and counted, and one with no answered round at all is skipped and
    counted."""
    from data.mixing import Source

    sources = []
    for f in files:
        records = []
        for r in read(f, fmt, report=report, encoding=encoding):
            if r["messages"][-1]["role"] == "user":
                if len(r["messages"]) == 1:
                    report.skip("no answer to train on (a question alone)", r["id"])
                    continue
                report.note("an unanswered last question dropped", r["id"])
                r = dict(r, messages=r["messages"][:-1])
            records.append(r)
        sources.append(Source(str(f), records))
    return sources


def rendered(records, tok, max_len: int, report):
    """Each record rendered for training, in order; one whose first round does not fit is
    skipped and counted, one that lost later rounds to the limit counted."""
    for r in records:
        x = render(tok, r["messages"], max_len=max_len)
        if x is None:
            report.skip(f"first round longer than {max_len} tokens", r["id"])
            continue
        if x.rounds_dropped:
            report.note("later rounds dropped to fit the context", r["id"])
        yield x


def sft_data(files, val_files, tok, *, max_len: int, seed: int, val_fraction: float, fmt=None, encoding="utf-8"):
    """What train_sft.py trains and validates on: ({"train": items, "val": items}, report), the
    items rendered as they are drawn (the report is complete once both are used up). `files` are read
    in the order given (the caller's, by content), deduplicated and split by data.mixing.mix
    with `seed`; --val-data files, when given, are the validation set whole."""
    report = Report()
    train, val, rows = mix(
        read_sources(files, report, fmt, encoding), seed=seed, val_fraction=0 if val_files else val_fraction
    )
    for row in rows:  # nothing is dropped without a word: the same conversation under another id
        for _ in range(row["duplicates"]):
            report.skip("the same conversation as another (normalised text; data.mixing.dedup_key)", row["source"])
    if val_files:
        val = [r for s in read_sources(val_files, report, fmt, encoding) for r in s.records]
    return {"train": rendered(train, tok, max_len, report), "val": rendered(val, tok, max_len, report)}, report
