"""What protects a run, kept off the algorithms' path: every check that stops a user from
losing work or from running what they did not mean to, in one place.

    run_main            a command line's mistakes as one line on stderr and exit 2, not a traceback
    number, COUNT, …    argparse types that refuse a flag's value out of its range, at parse time
    RecordError         an input or output refused, naming the file, line or field
    refuse_to_replace   the one rule for outputs a command would replace (--overwrite)
    lock_out, check_out a trainer's --out is this run's alone, and an earlier run's only when told
    file_digest, model_digest             files and model directories by content
    run_fingerprint, check_fingerprint    what defines a training run; a resume with another is refused
    claim_output        a resumable output (distill.py, train_rm.py sample, evaluate.py) is one setup's
    replace_dir         a finished directory put in place of the old one, atomically
    load_dcp_state      a torch.distributed.checkpoint state read without running any code it names
    StepGuard           a training run stops before an update whose loss or gradient is broken
    writing             a full or read-only disk said as such, naming the path

Nothing here trains, reads a data set or builds a model; everything above it may import it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import functools
import glob
import hashlib
import json
import math
import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable


class RecordError(ValueError):
    """A record that does not fit its format; the message names the file, line and field."""

    for_the_user = True  # run_main prints it as one line


def run_main(main: Callable, argv: list[str] | None = None) -> int:
    """A command line's main(argv), with a user's mistake ending as one line on stderr,
    `error: …`, and exit status 2 instead of a traceback: a bad record or a refused output
    (RecordError), a refusal (SystemExit with a message), a missing file, a full or read-only
    disk; Ctrl-C is one line and exit status 130. Anything else is a bug and keeps its traceback."""
    try:
        return main(argv) or 0
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        message = e.code
    except ValueError as e:  # RecordError, checkpoint.CheckpointError: what the user gave, named
        if not getattr(e, "for_the_user", False):
            raise
        message = str(e)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        message = f"{e.filename}: {e.strerror.lower()}" if e.filename else str(e)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT):
            raise
        message = (
            f"{e.filename or 'writing'}: {errno.errorcode[e.errno]}, {e.strerror}; nothing written before "
            "was removed: free space or give a writable path, then rerun (trainers: add --resume)"
        )
    except KeyboardInterrupt:  # what it was writing is cleaned up by then (its finally blocks)
        print("error: interrupted", file=sys.stderr)
        return 130
    print(f"error: {message}", file=sys.stderr)
    return 2


# -- outputs a command replaces ------------------------------------------------------------------


def number(
    kind: type = float,
    *,
    least: float | None = None,
    above: float | None = None,
    most: float | None = None,
    below: float | None = None,
) -> Callable[[str], float]:
    """An argparse type: a flag's text as a finite `kind` within the bounds given (least and
    most inclusive, above and below exclusive). Anything else is argparse's one-line error and
    exit 2 at parse time, naming the flag, before a model or a data file is touched."""
    bounds = [
        f">= {least:g}" if least is not None else "",
        f"> {above:g}" if above is not None else "",
        f"<= {most:g}" if most is not None else "",
        f"< {below:g}" if below is not None else "",
    ]
    wanted = f"{'an integer' if kind is int else 'a number'} {' and '.join(b for b in bounds if b)}".strip()

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not {wanted}")
        if (
            (least is not None and value < least)
            or (above is not None and value <= above)
            or (most is not None and value > most)
            or (below is not None and value >= below)
        ):
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {wanted}")
        return value

    parse.__name__ = wanted  # what argparse names in its own messages
    parse.bounds = (least if least is not None else above, most if most is not None else below)
    return parse


COUNT = number(int, least=1)  # how many of something: steps, items, ranks, tokens, workers
NONNEGATIVE_INT = number(int, least=0)  # 0 meaning "none" or "off"
POSITIVE = number(above=0)  # a rate, a size, a duration
NONNEGATIVE = number(least=0)  # a coefficient that may be 0 (a penalty off, a learning rate of 0)
SHARE = number(above=0, most=1)  # a share of a whole: top-p, MFU
FRACTION = number(least=0, below=1)  # a part held out: a validation fraction, a warmup ratio
TEMPERATURE = number(least=0, most=2)  # 0: greedy; the OpenAI API's range
FINITE = number()  # any real number: a margin, a penalty


def refuse_to_replace(
    where: Path, names: list[str], *, overwrite: bool, what: str = "output", resume: bool = False, inputs=()
) -> list[str]:
    """The one rule for outputs a command would replace, the trainers', the converters' and the
    main job's alike: when any of `names` exists in `where` (a link too, one to nowhere or a
    loop included), refuse, naming them, unless --overwrite; with it, say what is replaced. An
    output that is one of the command's `inputs` is refused either way (check_not_an_input).
    (Outputs that resume, such as distill.py's, are continued instead, see claim_output.)
    Returns the names that exist."""
    check_not_an_input([Path(where) / n for n in names], inputs)
    earlier = [n for n in names if os.path.lexists(Path(where) / n)]
    if earlier and not overwrite:
        how = (
            "add --resume to continue it, or --overwrite to start over there"
            if resume
            else "add --overwrite to replace it"
        )
        raise SystemExit(f"{where} holds an earlier {what} ({', '.join(earlier)}): {how}, or choose another --out")
    if earlier:
        print(f"--overwrite: replacing {', '.join(earlier)} in {where}", flush=True)
    return earlier


def check_not_an_input(outputs, inputs):
    """Refuse an output that is one of the command's inputs (the same path after links, or the
    same file under another name), or a directory holding one, --overwrite or not: it replaces
    an earlier output, never what the command is reading."""
    for out in outputs:
        real_out = Path(os.path.realpath(out))
        for given in (i for i in inputs if i is not None):
            real_in = Path(os.path.realpath(given))
            same = real_in == real_out or (
                real_in.exists() and real_out.exists() and os.path.samefile(real_in, real_out)
            )
            if same or real_out in real_in.parents:
                raise SystemExit(
                    f"{out} is {'' if same else 'a directory holding '}an input of this command "
                    f"({given}): an output never replaces what the command reads; choose another path"
                )


def lock_out(out: Path):
    """An exclusive lock on OUT/.lock for as long as the returned file stays open: two runs
    writing one --out would interleave their metrics and overwrite each other's state."""
    f = open(out / ".lock", "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise SystemExit(
            f"{out}: another run is using this directory (it holds {out / '.lock'}); "
            "wait for it, or choose another --out"
        ) from None
    return f


def check_out(out: Path, *, resume: bool, overwrite: bool):
    """Refuse to train into an earlier run's directory unless told how (data.schema's one rule);
    with --overwrite its metrics and resumable state go (best/ and final/ are replaced as the new
    run writes them)."""
    if resume or not refuse_to_replace(
        out, ["metrics.jsonl", "state", "best", "final"], overwrite=overwrite, what="run", resume=True
    ):
        return
    (out / "metrics.jsonl").unlink(missing_ok=True)
    for name in ("state", "state.tmp", "state.old"):
        shutil.rmtree(out / name, ignore_errors=True)


# -- fingerprints: what produced an output, what defines a run ---------------------------------------


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (the first 16 hex digits)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def model_digest(path: str | os.PathLike) -> str:
    """A fingerprint of an HF-format model directory, cheap at any size: config.json,
    tokenizer.model, and of every weight file its size, its header (tensor names, shapes,
    offsets) and 1 MiB from its middle and its end. Two trainings' weights differ there."""
    path = Path(path)
    h = hashlib.sha256()
    for name in ("config.json", "tokenizer.model"):
        if (path / name).is_file():
            h.update(name.encode() + (path / name).read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            for start in (0, size // 2, max(0, size - (1 << 20))):
                fh.seek(start)
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def json_digest(content: dict) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


# What defines a run: a resume must have the same (check_fingerprint). The micro-batch size, the
# number of ranks, --grad-sync and activation checkpointing change how a step is computed, not
# what it computes, and may differ. CHANGEABLE may differ when --allow-change names them.
DEFINING = ("epochs", "max_steps", "batch_size", "lr", "weight_decay", "warmup_ratio", "grad_clip", "max_len", "seed")
CHANGEABLE = {"lr": "lr", "max-steps": "max_steps", "epochs": "epochs"}


def data_digests(args) -> dict[str, str]:
    """file_digest of each of a run's --data and --val-data files, read once: the run's
    fingerprint, its order of the files and its model card all take them from here."""
    return {f: file_digest(f) for f in [*args.data, *(getattr(args, "val_data", None) or [])]}


def run_fingerprint(args, digests: dict[str, str], defining: tuple[str, ...] = DEFINING, **extra) -> dict:
    """The settings (`defining`, names of args) and the data (by content: `digests`, from
    data_digests, in no particular order) that define a training run, plus the trainer's own
    (`extra`: a base model, a loss margin; models by model_fingerprint, files by digests)."""
    setup = {k: getattr(args, k) for k in defining}
    setup["data"] = sorted(digests[f] for f in args.data)
    setup["val_data"] = sorted(digests[f] for f in getattr(args, "val_data", None) or [])
    setup.update(extra)
    return json.loads(json.dumps(setup))


def check_fingerprint(saved: dict, now: dict, allowed: list[str], where: Path):
    """Refuse to resume a run saved with other settings or data, naming each difference."""
    diff = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    refused = [k for k in diff if k not in {CHANGEABLE[a] for a in allowed}]
    if refused:
        changes = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in refused)
        may = [a for a, k in CHANGEABLE.items() if k in refused]
        raise SystemExit(
            f"--resume: {where} was saved by a run with other settings or data ({changes}). Resume "
            f"with the same ones, or start over with --overwrite"
            + (
                f"; --allow-change {' '.join(may)} lets {'that' if len(may) == 1 else 'those'} change"
                if may and len(may) == len(refused)
                else ""
            )
        )


def model_fingerprint(spec: str) -> str:
    """A base model by content (model_digest), or the name of a built-in config."""
    return model_digest(spec) if Path(spec).is_dir() else spec


def setup_record(out: str | os.PathLike) -> Path:
    """Where claim_output records what produced `out`: OUT.setup.json beside it."""
    out = Path(out)
    return out.with_name(out.stem + ".setup.json")


def claim_output(out: str | os.PathLike, setup: dict, info: dict | None = None, inputs=()) -> Path:
    """Make sure resumable output `out` is this setup's: a file beside it (OUT.setup.json)
    records what produced it — `setup` (fingerprints and settings that change the records)
    and `info` (paths, labels: shown, not compared). A rerun with another setup is refused
    with the differences named, so one model's records are never continued, or counted, as
    another's. An output that holds nothing yet takes the new setup; one that is among the
    command's `inputs` is refused (check_not_an_input). Returns the record's path."""
    out = Path(out)
    check_not_an_input([out], inputs)
    record = setup_record(out)
    setup = json.loads(json.dumps(setup))  # as it will read back
    beside = [out, *out.parent.glob(f"{glob.escape(out.stem)}.*.jsonl")]  # its rejects, a first stage's records
    # A link to nowhere (or a loop) holds something unknown: refused below, as any unlabelled file.
    holds = any(
        os.path.lexists(p) and (not p.exists() or (any(p.iterdir()) if p.is_dir() else p.stat().st_size > 0))
        for p in beside
    )
    if holds and record.is_file():
        before = json.loads(record.read_text(encoding="utf-8"))["setup"]
        diff = [
            f"{k}: {before.get(k)!r} -> {setup.get(k)!r}"
            for k in sorted(set(before) | set(setup))
            if before.get(k) != setup.get(k)
        ]
        if diff:
            raise RecordError(
                f"{out} holds the output of another setup ({'; '.join(diff)}): write to another "
                f"--out, or delete {out} and the files beside it named {out.stem}.* to start over"
            )
    elif holds:
        raise RecordError(
            f"{out} exists but says nothing of what produced it (no {record.name}): write to "
            f"another --out, or delete it to start over"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(
        json.dumps({"setup": setup, "info": info or {}}, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
    )
    os.replace(tmp, record)
    return record


# -- files on disk ------------------------------------------------------------------------------------


def replace_dir(new: Path, path: Path, aside: Path | None = None):
    """Put the finished directory `new` in place of `path`: the old one is renamed aside
    (to `aside`, or a fresh hidden directory beside `path`), then `new` renamed in, and only
    then is the old one removed. A kill between the two renames leaves both complete (a
    trainer's state passes aside=state.old so that TrainState.recover finds it)."""
    if not path.exists():
        os.rename(new, path)
        return
    if aside is None:
        holder = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        aside = holder / path.name
    else:
        shutil.rmtree(aside, ignore_errors=True)
        holder = aside
    os.rename(path, aside)
    os.rename(new, path)
    shutil.rmtree(holder)


@contextlib.contextmanager
def writing(path: Path):
    """Writes to `path` whose failure for want of space, or of permission, is said as such and
    names the path: torch's writers report a full disk as "[enforce fail at inline_container.cc]
    unexpected pos", and torch.distributed.checkpoint wraps that again (a BaseException)."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES) and not e.filename:
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    except (RuntimeError, CheckpointException):
        if _free_bytes(path) < 64 << 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise


def _free_bytes(path: Path) -> int:
    for p in (path, *path.parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return 1 << 62


# -- a training run's guards ---------------------------------------------------------------------------

FLAT_STEPS = 3  # steps in a row with an exactly zero gradient before a run stops


class StepGuard:
    """Stops a run before an update it must not make, naming the last resumable state that
    exists: a loss or gradient norm that is not finite, or a gradient exactly zero FLAT_STEPS
    steps in a row (it never is for a model that is learning; it is for one whose activations
    blew up and saturated); and a state is never saved from weights or optimizer state that are
    not finite (an update can make them so from a finite gradient), so that the state on disk
    is always the last good one. A trainer calls check() before each optimizer step and
    check_weights() before each state it writes, sets `saved` (where it was: "step 4", "round
    2, step 8") after, and keeps a validation as best only when sound() says so."""

    def __init__(self, state_dir: Path):
        self.state_dir, self.saved, self.flat = state_dir, None, 0

    def last_state(self) -> str:
        return f"{self.state_dir} ({self.saved})" if self.saved is not None else "none, no state was saved yet"

    def check(self, step: int, loss: float, grad_norm: float, where: str = ""):
        """`where`: what comes before the step in a message ("round 3, ")."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise SystemExit(
                f"{where}step {step}: loss {loss} / gradient norm {grad_norm} is not finite; stopping "
                f"before the update. The last good state: {self.last_state()}. {self.advice()}"
            )
        self.flat = self.flat + 1 if grad_norm == 0.0 else 0
        if self.flat >= FLAT_STEPS:
            raise SystemExit(
                f"{where}steps {step + 1 - self.flat}-{step}: the gradient is exactly zero (loss flat at "
                f"{loss:.6g}): the model has stopped learning, most likely blown up by too high an "
                f"--lr. Stopping; best/ holds no validation from those steps. "
                f"The last state: {self.last_state()}."
            )

    def check_weights(self, where: str, finite: bool):
        """Before a state is saved: `finite` (distributed.all_finite, the same on every rank)."""
        if not finite:
            raise SystemExit(
                f"{where}: the update left weights or optimizer state that are not finite; stopping "
                f"without saving them. The last good state: {self.last_state()}. {self.advice()}"
            )

    def advice(self) -> str:
        if self.saved is None:
            return "Lower --lr or check the data, and start again."
        return "Resume from it with a lower --lr (--resume --allow-change lr), or check the data."

    def sound(self, metrics: dict) -> bool:
        """Whether a validation may be kept as best: never one of a model that stopped learning."""
        return self.flat == 0 and all(math.isfinite(x) for x in metrics.values())


def clear_leftovers(out: Path):
    """Remove what a save that was killed or ran out of disk left in `out`: the model-sized
    temporaries of best/ and final/ (a trainer's state has its own, TrainState.recover)."""
    for name in ("best", "final"):
        for leftover in [*out.glob(f".{name}.tmp-*"), *out.glob(f".{name}.old-*")]:
            shutil.rmtree(leftover, ignore_errors=True)


# -- loading a resumable state without running its code ------------------------------------------------

# What a torch.distributed.checkpoint .metadata file is made of. It is a pickle, and a pickle
# can name any function to call: loading a crafted state directory with pickle.load would run
# its code. Only these classes and functions may be named.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


def check_dcp_metadata(directory: Path):
    """Read a state's .metadata through the allow-listed unpickler; a state that names anything
    else is refused, naming the directory, before anything is loaded or run."""
    reader, _ = _safe_dcp()
    try:
        reader(str(directory)).read_metadata()
    except pickle.UnpicklingError as e:
        raise SystemExit(
            f"{directory}: refusing to load this state: {e}. Nothing was loaded or run; "
            "it is not a state this project wrote."
        ) from None


def check_state_files(directory: Path, saved: dict[str, str], now: dict[str, str]):
    """Refuse a state whose files are not the ones saved: `saved` the digests written with it,
    `now` those of the files found (sha256, file_digest)."""
    on_disk = {f.name for f in directory.iterdir() if f.name != "trainer.json"}
    wrong = sorted(set(saved) - on_disk) + sorted(n for n in now if now[n] != saved[n])
    if wrong:
        raise SystemExit(
            f"{directory / wrong[0]}: not the file that was saved ("
            f"{'missing' if wrong[0] not in on_disk else 'its digest differs'}"
            f"{f'; {len(wrong) - 1} more' if len(wrong) > 1 else ''}): the state was changed "
            "or damaged since; nothing was loaded: start over with --overwrite, or restore it"
        )


def load_dcp_state(state: dict, directory: Path):
    """torch.distributed.checkpoint.load of `state` from `directory`, its metadata through the
    allow-listed unpickler and its other non-tensor entries through torch.load(weights_only=True):
    nothing in the directory can make it run code."""
    import torch.distributed.checkpoint as dcp

    reader, planner = _safe_dcp()
    dcp.load(state, storage_reader=reader(str(directory)), planner=planner())


@functools.cache
def _safe_dcp():
    """(reader, planner) classes for torch.distributed.checkpoint that run no code a state names.
    Built on first use, so that the commands that never load a state do not import DCP."""
    import torch
    import torch.distributed.checkpoint.metadata as dcp_metadata
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element

    class MetadataUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            allowed = (module, name) in _METADATA_GLOBALS
            if module == "torch.distributed.checkpoint.metadata":  # its dataclasses and enums
                obj = getattr(dcp_metadata, name, None)
                allowed = isinstance(obj, type) and obj.__module__ == module
            elif module == "torch":
                allowed = allowed or isinstance(getattr(torch, name, None), torch.dtype)
            if not allowed:
                raise pickle.UnpicklingError(f"it names {module}.{name}, which a checkpoint's metadata never holds")
            return super().find_class(module, name)

    class SafeReader(FileSystemReader):
        """FileSystemReader whose .metadata goes through MetadataUnpickler."""

        def read_metadata(self, *args, **kwargs):
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                metadata = MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = dcp_metadata.StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(DefaultLoadPlanner):
        """The default planner reads non-tensor entries (the optimizer's hyperparameters) with
        torch.load(weights_only=False); plain numbers, strings and lists need no more than
        weights_only=True, which runs no code."""

        def load_bytes(self, read_item, value):
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeReader, SafePlanner
