r"""Sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP): each rank writes its part.

Under FSDP2 (``fully_shard``) no rank holds the whole model or optimizer state, so a checkpoint is a folder
that every rank writes its shards into, in parallel: DCP's ``.metadata`` (written by rank 0: every tensor's
global shape and which file holds which chunk) and one ``__<rank>_0.distcp`` file per rank. The model and
optimizer states come from ``torch.distributed.checkpoint.state_dict.get_state_dict`` (keyed by parameter
name, the same for any sharding), so a checkpoint written by W ranks loads on any number of ranks, or into an
unsharded model in one process (**resharding**: DCP reads each rank's chunks of the global tensors).
The rest of the trainer's state (step, RNG states, data position, schedule, guard, ...: the ``extra`` dict,
rank 0's) is ``extra.pt``.

**Atomic.** :func:`save_sharded` writes everything into a temporary folder ``.<name>.<id>.tmp`` beside
``path``, then rank 0 records every file's size and CRC-32 in ``optimlab.json`` (the manifest, written last),
checks that the folder is complete (every file DCP's metadata refers to is there and long enough), renames
it to ``checkpoint.step<N>.dcp`` and only then flips ``path`` (a symbolic link, e.g. ``checkpoint.dcp``) to
it, atomically (a new link renamed over the old). A write killed at any point leaves ``path`` on the last
good checkpoint, and the temporary folder is removed by :meth:`ShardedCheckpointFiles.clean_temporaries`.
The ``keep`` newest versions are kept; older ones are deleted after the flip.

**Verified on read.** :func:`load_sharded` (and :func:`read_training_checkpoint`, :func:`verify_sharded`) first
checks every file against the manifest (present, same size, same CRC-32); a missing manifest (an interrupted
or foreign write), a missing, truncated or altered file, or a single-file checkpoint given where a folder is
expected is one line (:class:`~optimlab.train.checkpoint.CheckpointError`) naming the file, never a silent
misread. Parameters or optimizer state holding NaN/inf are refused too. Collective: in a distributed job
every rank must call :func:`save_sharded` / :func:`load_sharded`, and every rank raises the same error.

:func:`sharded_to_single` and :func:`single_to_sharded` convert to and from the single-file checkpoint of
:mod:`optimlab.train.checkpoint` (``optimlab checkpoint convert``), through
``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` and ``dcp.save`` in one process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from optimlab.io import atomic_write_text, fsync_folder, os_error_text
from optimlab.optim._dtensor import is_dtensor
from optimlab.train.checkpoint import (
    LATEST_NAME,
    CheckpointError,
    CheckpointFiles,
    CheckpointWriteError,
    load_checkpoint,
    nonfinite_tensors,
    save_checkpoint,
    short_list,
    verify_checkpoint,
)

__all__ = ["SHARDED_FORMAT", "SHARDED_LATEST_NAME", "SHARDED_KEY", "MANIFEST_NAME", "ShardedCheckpointFiles",
           "save_sharded", "load_sharded", "verify_sharded", "checkpoint_layout",
           "latest_checkpoint", "read_training_checkpoint", "intact_previous", "whole_checkpoint", "sharded_to_single",
           "single_to_sharded"]

SHARDED_FORMAT = "optimlab.train.sharded-checkpoint/1"
SHARDED_LATEST_NAME = "checkpoint.dcp"
"""The link a run folder's latest sharded checkpoint is reached by (``checkpoint.step<N>.dcp`` beside it)."""
MANIFEST_NAME = "optimlab.json"
EXTRA_NAME = "extra.pt"
_VERSION = re.compile(r"^(?P<stem>.+)\.step(?P<step>\d+)(?:\.r(?P<again>\d+))?\.dcp$")
_CHUNK = 1 << 22


# ---------------------------------------------------------------------------------------------- collectives

def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (``value`` itself without a process group)."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gathered(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (``[value]`` without a process group)."""
    if not _distributed():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _raise_agreed(message: str | None, error: type[CheckpointError] = CheckpointError) -> None:
    """Raise ``error(first message of any rank)`` on every rank when any rank has one."""
    messages = [m for m in _gathered(message) if m is not None]
    if messages:
        raise error(messages[0])


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Silence DCP's warning that it saves or loads in a single process: here that is meant (no process group)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")
        yield


# ---------------------------------------------------------------------------------------------- integrity

def _file_record(path: Path) -> dict[str, int]:
    """``{"bytes": size, "crc32": CRC-32}`` of a file, read back from disk."""
    crc, size = 0, 0
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"bytes": size, "crc32": crc}


def checkpoint_layout(path: str | Path) -> str:
    """``"sharded"`` (a folder, or a link to one, holding an optimlab manifest), ``"single"`` (a file), or
    ``"missing"``; a folder without a manifest raises :class:`CheckpointError` (an interrupted write, or a
    checkpoint of another program)."""
    target = Path(path)
    if target.is_dir():
        if not (target / MANIFEST_NAME).is_file():
            raise CheckpointError(f"{target} is not a complete optimlab sharded checkpoint: it has no {MANIFEST_NAME} "
                                  "(its write was interrupted, or another program wrote it)")
        return "sharded"
    return "single" if target.is_file() else "missing"


def _manifest(directory: Path) -> dict[str, Any]:
    manifest_path = directory / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as err:
        reason = os_error_text(err) if isinstance(err, OSError) else f"not JSON ({err})"
        raise CheckpointError(f"Checkpoint manifest {manifest_path} is unreadable: {reason}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != SHARDED_FORMAT or not isinstance(
            manifest.get("files"), dict):
        raise CheckpointError(f"{manifest_path} is not an optimlab sharded checkpoint manifest ({SHARDED_FORMAT})")
    return manifest


def _sharded_directory(path: str | Path) -> Path:
    """The checkpoint folder ``path`` is or links to; one-line errors for a missing path or another layout."""
    target = Path(path)
    layout = checkpoint_layout(target)
    if layout == "missing":
        raise CheckpointError(f"No sharded checkpoint at {target}")
    if layout == "single":
        raise CheckpointError(f"{target} is a single-file checkpoint, not a sharded (torch.distributed.checkpoint) "
                              f"folder: convert it with `optimlab checkpoint convert {target} DIR`, or load it "
                              "without FSDP")
    return target.resolve()


def _verify_directory(directory: Path) -> dict[str, Any]:
    """Every file of the manifest present with its size and CRC-32; returns the manifest."""
    manifest = _manifest(directory)
    for name, record in sorted(manifest["files"].items()):
        file = directory / name
        try:
            found = _file_record(file)
        except FileNotFoundError:
            raise CheckpointError(f"Checkpoint {directory} is incomplete: {file} is missing") from None
        except OSError as err:
            raise CheckpointError(f"Cannot read checkpoint file {file}: {os_error_text(err)}") from None
        if found["bytes"] != record["bytes"]:
            raise CheckpointError(f"Checkpoint file {file} is damaged: {found['bytes']} bytes, the manifest says "
                                  f"{record['bytes']} (truncated or overwritten)")
        if found["crc32"] != record["crc32"]:
            raise CheckpointError(f"Checkpoint file {file} is damaged: it fails its CRC-32 checksum")
    return manifest


def verify_sharded(path: str | Path) -> dict[str, Any]:
    """Check a sharded checkpoint (a folder or the link to one) against its manifest in this process; returns the
    manifest (format, step, world size, files). Raises :class:`CheckpointError` naming the first bad file."""
    return _verify_directory(_sharded_directory(path))


def _check_complete(directory: Path, files: dict[str, dict[str, int]]) -> None:
    """Every storage file DCP's metadata refers to is in ``files`` and long enough for its chunks."""
    metadata = FileSystemReader(str(directory)).read_metadata()
    for info in (metadata.storage_data or {}).values():
        record = files.get(info.relative_path)
        if record is None or info.offset + info.length > record["bytes"]:
            raise CheckpointWriteError(f"cannot write checkpoint to {directory}: the storage file "
                                       f"{info.relative_path} is missing or short")


# ---------------------------------------------------------------------------------------------- save

def _check_extra(extra: dict[str, Any]) -> int:
    step = extra.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"Invalid extra['step']: {step!r} (accepted: an integer >= 0; it names the checkpoint)")
    stack: list[tuple[str, Any]] = list(extra.items())
    while stack:
        key, value = stack.pop()
        if is_dtensor(value):
            raise TypeError(f"Invalid extra[{key!r}]: a sharded DTensor (extra is written by rank 0 alone; keep "
                            "sharded state in the model or the optimizer)")
        if isinstance(value, dict):
            stack.extend((f"{key}.{k}", v) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{key}[{i}]", v) for i, v in enumerate(value))
    return step


def _write_folder(folder: Path, state: dict[str, Any], extra: dict[str, Any], *, distributed: bool) -> None:
    """DCP ``state`` and rank 0's ``extra`` into ``folder``; then rank 0 writes the manifest (the files' sizes
    and CRC-32s, every rank's own read back by that rank) and checks the folder is complete. Collective."""
    rank = _rank()
    message = None
    try:
        with _single_process_quiet():
            dcp.save(state, storage_writer=FileSystemWriter(str(folder), sync_files=True), no_dist=not distributed)
        mine = {p.name: _file_record(p) for p in folder.glob(f"__{rank}_*.distcp")}
        if rank == 0:
            with (folder / EXTRA_NAME).open("wb") as handle:
                torch.save(extra, handle)
                handle.flush()
                os.fsync(handle.fileno())
            mine.update({name: _file_record(folder / name) for name in (".metadata", EXTRA_NAME)})
    except OSError as err:
        message = f"cannot write checkpoint to {folder.parent}: {os_error_text(err)}"
        mine = {}
    except dcp.CheckpointException as err:  # a rank's write failed; DCP reports it on every rank
        message = f"cannot write checkpoint to {folder.parent}: {_dcp_failure(err)}"
        mine = {}
    records = _gathered((message, mine))
    _raise_agreed(next((m for m, _ in records if m is not None), None), CheckpointWriteError)
    if rank == 0:
        files = {name: record for _, part in records for name, record in part.items()}
        manifest = {"format": SHARDED_FORMAT, "step": extra["step"], "world_size": len(records), "files": files}
        try:
            _check_complete(folder, files)
            atomic_write_text(folder / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        except CheckpointWriteError as err:
            message = str(err)
        except OSError as err:
            message = f"cannot write checkpoint to {folder.parent}: {os_error_text(err)}"
    message = _from_rank0(message)
    if message is not None:
        raise CheckpointWriteError(message)


def _dcp_failure(error: Exception) -> str:
    failures = getattr(error, "failures", {}) or {}
    for rank, failure in sorted(failures.items()):
        cause = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(cause, OSError):
            return f"rank {rank}: {os_error_text(cause)}"
        return f"rank {rank}: {cause}"
    return str(error)


class ShardedCheckpointFiles:
    """The sharded checkpoints of one run folder: the link ``<name>`` (default ``checkpoint.dcp``) to the latest
    ``checkpoint.step<N>.dcp`` folder, and up to ``keep - 1`` previous ones (the same surface as
    :class:`optimlab.train.checkpoint.CheckpointFiles`)."""

    def __init__(self, folder: str | Path, keep: int = 2, name: str = SHARDED_LATEST_NAME) -> None:
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"Invalid keep_checkpoints: {keep!r} (accepted range: an integer >= 1)")
        if not name.endswith(".dcp") or "/" in name:
            raise ValueError(f"Invalid sharded checkpoint name: {name!r} (accepted: a file name ending in .dcp)")
        self.folder = Path(folder)
        self.keep = keep
        self.latest = self.folder / name
        self._stem = name[:-len(".dcp")]

    def versions(self) -> list[tuple[int, Path]]:
        """``(step, folder)`` of every checkpoint version in the run folder, newest step first."""
        if not self.folder.is_dir():
            return []
        found = []
        for entry in os.listdir(self.folder):
            match = _VERSION.match(entry)
            if match and match["stem"] == self._stem and (self.folder / entry).is_dir():
                found.append((int(match["step"]), int(match["again"] or 0), self.folder / entry))
        return [(step, path) for step, _, path in sorted(found, reverse=True)]

    def current(self) -> Path | None:
        """The version folder the link points to (``None`` without a link)."""
        return self.latest.resolve() if self.latest.is_symlink() else None

    def previous(self) -> list[tuple[int, Path]]:
        """``(step, folder)`` of the kept versions other than the latest, newest first."""
        current = self.current()
        return [(step, path) for step, path in self.versions() if path.resolve() != current]

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> Path:
        """Write a new version (:func:`save_sharded`), flip the link to it, delete versions beyond ``keep``;
        returns the new version's folder. Collective."""
        step = _check_extra(extra)
        if self.latest.exists() and not self.latest.is_symlink():
            raise CheckpointError(f"{self.latest} exists and is not a link to a sharded checkpoint: move it away, "
                                  "or pass another --out folder")
        distributed = _distributed()
        temporary = self.folder / f".{self.latest.name}.{_from_rank0(uuid.uuid4().hex[:12])}.tmp"
        message = None
        if _rank() == 0:
            try:
                temporary.mkdir(parents=True)
            except OSError as err:
                message = f"cannot write checkpoint to {self.folder}: {os_error_text(err)}"
        message = _from_rank0(message)
        if message is not None:
            raise CheckpointWriteError(f"{message}; {self._intact()}")
        try:
            model_state, optimizer_state = get_state_dict(model, optimizer)
            _write_folder(temporary, {"model": model_state, "optimizer": optimizer_state}, extra,
                          distributed=distributed)
            outcome = self._publish(temporary, step) if _rank() == 0 else None
            outcome = _from_rank0(outcome)
        except CheckpointWriteError as error:
            raise CheckpointWriteError(f"{error}; {self._intact()}") from None
        finally:
            if _rank() == 0:
                shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(outcome, str):
            raise CheckpointWriteError(f"{outcome}; {self._intact()}")
        return Path(outcome[0])

    def _intact(self) -> str:
        current = self.current()
        if current is None:
            return "no checkpoint was written"
        return f"the previous checkpoint {current.name} is intact"

    def _publish(self, temporary: Path, step: int) -> tuple[str] | str:
        """Rank 0: rename the finished folder to its version name, flip the link, prune. Returns ``(the version's
        path,)``, or the one-line error (a string) that every rank raises."""
        current = self.current()
        version = self.folder / f"{self._stem}.step{step}.dcp"
        again = 0
        while version.resolve() == current or (version.exists() and version.is_symlink()):
            again += 1
            version = self.folder / f"{self._stem}.step{step}.r{again}.dcp"
        try:
            if version.exists():  # an abandoned version of the same step (a resume from an older checkpoint)
                shutil.rmtree(version)
            os.rename(temporary, version)
            fsync_folder(self.folder)
            link = self.folder / f".{self.latest.name}.{uuid.uuid4().hex[:12]}.link.tmp"
            os.symlink(version.name, link)
            os.replace(link, self.latest)
            fsync_folder(self.folder)
        except OSError as err:
            return f"cannot write checkpoint to {self.folder}: {os_error_text(err)}"
        for _, old in self.previous()[self.keep - 1:]:
            shutil.rmtree(old, ignore_errors=True)
        return (str(version),)

    def remove_all(self) -> None:
        """Delete the link and every version (a run started afresh with ``--overwrite``)."""
        if self.latest.is_symlink():
            self.latest.unlink()
        for _, path in self.versions():
            shutil.rmtree(path, ignore_errors=True)

    def clean_temporaries(self) -> list[Path]:
        """Delete what killed writes left behind (``.<name>.*.tmp`` folders and links); returns them. Call only
        while no other process writes checkpoints to this folder."""
        removed = []
        for path in self.folder.glob(f".{self.latest.name}.*.tmp") if self.folder.is_dir() else []:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        return removed


def save_sharded(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 extra: dict[str, Any], *, keep: int = 2) -> Path:
    """Write ``model``'s and ``optimizer``'s states (sharded: each rank its part) and rank 0's ``extra`` (plain
    Python/torch values; an int ``extra["step"]`` is required) as a new version beside ``path`` and flip the link
    ``path`` (a name ending in ``.dcp``) to it atomically; keep the ``keep`` newest versions. Returns the version's
    folder. Every rank must call it; a failed write raises :class:`CheckpointWriteError` on every rank and
    leaves the previous checkpoint as it was."""
    target = Path(path)
    return ShardedCheckpointFiles(target.parent, keep, target.name).save(model, optimizer, extra)


# ---------------------------------------------------------------------------------------------- load

def _verified(path: str | Path) -> Path:
    """Rank 0 verifies the checkpoint (every file's CRC-32); every rank gets its folder or the same error."""
    outcome: str | tuple[str] | None = None
    if _rank() == 0:
        try:
            outcome = (str(_sharded_directory(path)),)
            _verify_directory(Path(outcome[0]))
        except CheckpointError as err:
            outcome = str(err)
    outcome = _from_rank0(outcome)
    if isinstance(outcome, str):
        raise CheckpointError(outcome)
    return Path(outcome[0])


def _read_extra(directory: Path) -> dict[str, Any]:
    try:
        extra = torch.load(directory / EXTRA_NAME, map_location="cpu", weights_only=False)
    except Exception as err:  # a verified file that still does not unpickle: another program's, or a bug
        raise CheckpointError(f"Cannot read {directory / EXTRA_NAME}: {err}") from err
    if not isinstance(extra, dict):
        raise CheckpointError(f"{directory / EXTRA_NAME} does not hold the trainer's state (a dict)")
    return extra


def _make_room(state: dict[str, Any], directory: Path) -> str | None:
    """DCP loads only the entries its template has: add the checkpoint's param-group settings the template lacks
    (e.g. ``initial_lr``, set by an LR schedule), so they are not dropped; return what else has no place in it
    (a message), or ``None``."""
    metadata = FileSystemReader(str(directory)).read_metadata()
    homeless = []
    for key, path in (metadata.planner_data or {}).items():
        node: Any = state
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else node[part] if isinstance(
                node, list) and isinstance(part, int) and part < len(node) else None
        if isinstance(node, dict) and path[-1] not in node:
            if path[:2] == ("optimizer", "param_groups"):
                node[path[-1]] = None  # replaced by the stored value
            else:
                homeless.append(key)
        elif not isinstance(node, dict):
            homeless.append(key)
    return f"the checkpoint holds {short_list(homeless)}, which this model and optimizer lack" if homeless else None


def load_sharded(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Verify the sharded checkpoint ``path`` (a folder, or the link to one), load it into ``model`` and
    ``optimizer`` as they are sharded now (any number of ranks, or an unsharded model in one process: DCP
    reshards), and return its ``extra``. Raises :class:`CheckpointError` on every rank for a damaged, partial or
    foreign checkpoint, another layout, or non-finite values. Every rank must call it.

    ``get_state_dict`` gives the templates DCP loads into; for an optimizer without state yet it first takes one
    step with zero gradients and learning rate 0 (torch's way of creating the state), whose effects the loaded
    parameters and optimizer state then overwrite."""
    directory = _verified(path)
    extra = _read_extra(directory)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    homeless = _make_room(state, directory)
    message = f"Checkpoint {directory} does not fit this model and optimizer: {homeless}" if homeless else None
    if message is None:
        try:
            with _single_process_quiet():
                dcp.load(state, storage_reader=FileSystemReader(str(directory)), no_dist=not _distributed())
        except (dcp.CheckpointException, RuntimeError, KeyError) as err:
            message = f"Checkpoint {directory} does not fit this model and optimizer: {_dcp_failure(err)}"
    _raise_agreed(message)
    local_state = {key: value.to_local() if is_dtensor(value) else value for key, value in model_state.items()}
    bad = nonfinite_tensors(local_state, state["optimizer"])
    _raise_agreed(f"Checkpoint {directory} (step {extra.get('step')}) holds non-finite values in {short_list(bad)}"
                  if bad else None)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return extra


# ---------------------------------------------------------------------------------------------- either layout

SHARDED_KEY = "sharded_checkpoint"
"""In a payload of :func:`read_training_checkpoint` from a sharded checkpoint: its folder, for :func:`load_sharded`."""


def latest_checkpoint(folder: str | Path) -> Path:
    """The checkpoint a resume of the run ``folder`` continues: ``checkpoint.pt`` or ``checkpoint.dcp`` (the link to
    the latest sharded version), the one written last when both exist; ``checkpoint.pt`` when neither does."""
    run = Path(folder)
    found = [path for path in (run / LATEST_NAME, run / SHARDED_LATEST_NAME) if path.exists()]
    return max(found, key=lambda path: os.lstat(path).st_mtime_ns) if found else run / LATEST_NAME


def read_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """The trainer's checkpoint at ``path`` in either layout, verified: a single file's payload
    (:func:`~optimlab.train.checkpoint.load_checkpoint`), or a sharded checkpoint's ``extra`` (the same entries but
    the model and optimizer, which :func:`load_sharded` loads later into the sharded model) with
    ``payload[SHARDED_KEY]`` its folder. Raises :class:`CheckpointError` (one line) otherwise. Not collective: the
    launcher calls it in one process."""
    if checkpoint_layout(path) != "sharded":
        return load_checkpoint(path)
    directory = _sharded_directory(path)
    _verify_directory(directory)
    return {**_read_extra(directory), SHARDED_KEY: str(directory)}


def intact_previous(path: str | Path) -> tuple[int, Path] | None:
    """``(step, path)`` of the newest previous checkpoint of ``path``'s run folder, in ``path``'s layout, that passes
    its checksums (what to resume from when ``path`` is damaged); ``None`` when there is none."""
    target = Path(path)
    damaged = target.resolve()
    sharded = target.is_dir() or target.name.endswith(".dcp")
    if sharded:
        candidates: list[tuple[int, Path]] = ShardedCheckpointFiles(target.parent).versions()
    else:
        candidates = CheckpointFiles(target.parent).previous()
    for step, candidate in candidates:
        if candidate.resolve() == damaged:
            continue
        try:
            verify_sharded(candidate) if sharded else verify_checkpoint(candidate)
        except CheckpointError:
            continue
        return step, candidate
    return None


# ---------------------------------------------------------------------------------------------- conversion

def _optimizer_to_names(optimizer_state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """A ``torch.optim`` state dict (parameters numbered across the groups) keyed by parameter name instead."""
    groups = [{**group, "params": [names[i] for i in group["params"]]} for group in optimizer_state["param_groups"]]
    return {"state": {names[i]: value for i, value in optimizer_state["state"].items()}, "param_groups": groups}


def _optimizer_to_numbers(optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`_optimizer_to_names`: names become their position across the groups."""
    number: dict[str, int] = {}
    groups = []
    for group in optimizer_state["param_groups"]:
        params = []
        for name in group["params"]:
            number.setdefault(name, len(number))
            params.append(number[name])
        groups.append({**group, "params": params})
    stored = optimizer_state.get("state", {})  # DCP stores no entry for an empty state (plain SGD's)
    return {"state": {number[name]: value for name, value in stored.items()}, "param_groups": groups}


def optimizer_parameter_names(payload: dict[str, Any]) -> list[str]:
    """The name of each parameter of a single-file checkpoint's optimizer state, in its numbering: the trainer's
    model (``model_config``), param groups (``optimlab.param_groups`` with the run's weight decay, layer decay and
    LR) and optimizer (by registry name: some regroup, e.g. Muon puts matrices and the rest in groups of their own)
    rebuilt without memory (meta device). Raises :class:`CheckpointError` when they do not match the checkpoint."""
    from optimlab.optim.groups import param_groups
    from optimlab.optim.registry import create_optimizer
    from optimlab.train.model import GPT, GPTConfig

    settings = payload.get("train_config") or {}
    with torch.device("meta"):
        model = GPT(GPTConfig(**payload["model_config"]))
    groups = param_groups(model, settings.get("weight_decay", 0.0), layer_decay=settings.get("layer_decay"),
                          lr=settings.get("lr"))
    if settings.get("optimizer"):
        groups = create_optimizer(groups, settings["optimizer"], lr=settings.get("lr", 1e-3)).param_groups
    by_id = {id(p): name for name, p in model.named_parameters()}
    built = [len(group["params"]) for group in groups]
    saved = [len(group["params"]) for group in payload["optimizer"]["param_groups"]]
    if saved != built:
        raise CheckpointError(f"cannot name the optimizer's parameters: the checkpoint's param groups hold {saved} "
                              f"parameters, the trainer's model and optimizer make {built}")
    return [by_id[id(p)] for group in groups for p in group["params"]]


def whole_checkpoint(path: str | Path) -> dict[str, Any]:
    """The trainer's checkpoint at ``path`` as one payload with whole tensors, whichever its layout: a single file's
    (:func:`~optimlab.train.checkpoint.load_checkpoint`), or a sharded checkpoint's model and optimizer state
    gathered into this process's memory (numbered like ``torch.optim``'s state dict) beside its ``extra``."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    if checkpoint_layout(path) != "sharded":
        return load_checkpoint(path)
    directory = _sharded_directory(path)
    _verify_directory(directory)
    extra = _read_extra(directory)
    flat = Path(tempfile.mkdtemp(prefix="optimlab-whole-")) / "state.pt"
    try:
        with _single_process_quiet():
            dcp_to_torch_save(str(directory), str(flat))
        state = torch.load(flat, map_location="cpu", weights_only=False)
    finally:
        shutil.rmtree(flat.parent, ignore_errors=True)
    payload = {key: value for key, value in extra.items() if key != "format"}
    payload.update(model=state["model"], optimizer=_optimizer_to_numbers(state["optimizer"]))
    bad = nonfinite_tensors(payload["model"], payload["optimizer"])
    if bad:
        raise CheckpointError(f"Checkpoint {directory} holds non-finite values in {short_list(bad)}")
    return payload


def sharded_to_single(source: str | Path, target: str | Path) -> dict[str, Any]:
    """Write the sharded checkpoint ``source`` as one single-file checkpoint ``target`` (atomically, CRC-32 per
    record), loadable in one process by :func:`optimlab.train.checkpoint.load_checkpoint`; returns the payload.
    Reads the whole model and optimizer state into this process's memory (:func:`whole_checkpoint`)."""
    _sharded_directory(source)  # a one-line error for another layout
    payload = whole_checkpoint(source)
    save_checkpoint(target, payload)
    return payload


def single_to_sharded(source: str | Path, target: str | Path) -> Path:
    """Write the single-file checkpoint ``source`` as a sharded checkpoint folder ``target`` (it must not exist;
    written as ``.<name>.<id>.tmp`` beside it, verified, then renamed), which :func:`load_sharded` loads on any
    number of ranks (e.g. ``optimlab train --resume-from TARGET --fsdp``). Returns ``target``."""
    payload = load_checkpoint(source)
    names = optimizer_parameter_names(payload)
    state = {"model": payload["model"], "optimizer": _optimizer_to_names(payload["optimizer"], names)}
    extra = {key: value for key, value in payload.items() if key not in ("model", "optimizer", "format")}
    out = Path(target)
    if out.exists() or out.is_symlink():
        raise FileExistsError(f"{out} already exists: choose a new folder for the sharded checkpoint")
    temporary = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.tmp"
    temporary.mkdir(parents=True)
    try:
        _write_folder(temporary, state, extra, distributed=False)
        _verify_directory(temporary)
        os.rename(temporary, out)
        fsync_folder(out.parent)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return out
