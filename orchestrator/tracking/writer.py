"""Sending operations, in order, to one store: what the live tracker and `tracking replay` share.

The writer knows the run behind each handle (resolved by an open operation, or read back from a
spill file's progress record) and applies the two rules that make a resumed run consistent:
per-step metric points at or below the run's resume floor are dropped, and operations meant for a
new run only (the config file, the dataset input) are dropped when the run was resumed. Both are
decided here, at send time, because a job may resume while MLflow is down.

A handle opened before the run's latest driver (a spill file replayed after a later run of the job
logged to MLflow, ResolvedRun.stale; never the running driver's own handle) only adds to the run:
per-step points between its floor and the later driver's first step, params, tags and artifacts
the run lacks. Its finish, and values the run already has, are the later driver's and are left as
they are.
"""

from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.tracking.ops import (
    CHANGED_PARAMS_TAG, MAX_TAG_LEN, RUN_KEY_TAG, Op, ResolvedRun, artifact_name, describe, digest, server_name,
)

if TYPE_CHECKING:
    from orchestrator.tracking.store import Store

log = logging.getLogger(__name__)


class RunRefused(Exception):
    """MLflow refused to open a handle's run (a deleted experiment, say): nothing of it can be sent."""


class Writer:
    def __init__(self, store: Store, *, live: Callable[[str], bool] = lambda handle: False) -> None:
        """`live(handle)`: whether `handle` is the running driver's own (the tracker's run), which
        holds the job now and so is never stale, whatever the clocks that judge a spill file say."""
        from orchestrator.tracking.store import is_refusal

        self.store = store
        self._live = live
        self._is_refusal = is_refusal
        self.runs: dict[str, ResolvedRun] = {}
        # handles whose run was read back from a progress record, each with its job's run-key digest: see `_ours`
        self._unchecked: dict[str, str | None] = {}
        self._param_keys: dict[str, set[str]] = {}
        self.sent_points = 0
        self.sent_operations = 0
        self.skipped_points = 0  # per-step points at or below a resume floor, or a stale handle's cut
        self.kept = 0  # a stale handle's operations that would have overwritten the run's later values
        self.refusals: list[str] = []
        self._last_refusal: tuple[str, int, str] | None = None  # why, how many in a row, its line

    def adopt(self, runs: Mapping[str, Mapping[str, Any]], *, key_digest: str | None = None) -> None:
        """Runs resolved earlier (a spill file's progress record); a run already known wins.
        `key_digest`: the job's run key as the spill file's name holds it; each run must be that job's."""
        for handle, data in runs.items():
            if handle not in self.runs:
                self.runs[handle] = ResolvedRun.from_json(data)
                self._unchecked[handle] = key_digest

    def apply(self, batch: list[Op], *, files: Path) -> None:
        """Send one batch (`files`: the folder staged artifact copies are relative to).

        A transient failure raises: nothing of the batch is known to be stored, and sending it
        again is safe (MLflow drops a metric point identical to one it has; tags, params and
        artifacts are set to the same values). An operation the store refuses is dropped and noted.
        """
        try:
            self._send(batch, files)
        except Exception as exc:
            malformed = isinstance(exc, (KeyError, TypeError, ValueError))  # a spill line edited by hand
            if not (malformed or self._is_refusal(exc)):
                raise
            if len(batch) > 1:  # find the refused ones; send the rest
                for op in batch:
                    self.apply([op], files=files)
                return
            self._refused(batch, f"{'malformed' if malformed else 'MLflow refused it'}: {describe(exc)}")

    def _refused(self, batch: list[Op], why: str) -> None:
        """Note what the store would not take. Refusals for one reason in a row, not yet passed on (the
        operations of one request split to find the refused ones: every one of a run the store no longer
        has, its sqlite file deleted), are one line, not one per operation."""
        last = self._last_refusal
        if last is not None and last[0] == why and self.refusals and self.refusals[-1] == last[2]:
            count = last[1] + len(batch)
            message = f"{count} operations could not be sent ({why}); dropped"
            self.refusals[-1] = message
        else:
            count = len(batch)
            what = f"a {batch[0]['op']} operation" if count == 1 else f"{count} {batch[0]['op']} operations"
            message = f"{what} could not be sent ({why}); dropped"
            log.info("%s", message)  # passed on by the tracker, or the replay's lines: a warning said it twice
            self.refusals.append(message)
        self._last_refusal = (why, count, message)

    def _send(self, batch: list[Op], files: Path) -> None:
        first = batch[0]
        if first["op"] == "open":
            self._open(first)
            return
        run = self._checked(first["handle"])
        if run is None:  # its open line was lost (an unreadable line): no run to send it to
            self._refused(batch, f"no run is known for handle {first['handle']}")
        elif first.get("new_run_only") and run.resumed:
            return
        elif first["op"] == "metrics":
            self._metrics(run, batch)
        else:
            kept = self.kept
            getattr(self, f"_{first['op']}")(run, first, files)
            self.sent_operations += self.kept == kept

    def _open(self, op: Op) -> None:
        handle = op["handle"]
        if handle in self.runs:
            return
        recorded = op.get("resolved")
        if recorded and op.get("tracking_uri") == server_name(self.store.tracking_uri):
            run = ResolvedRun.from_json(recorded)
            if self._ours(run, op["run_key"]):
                self.runs[handle] = run
                return
        try:
            run = self.runs[handle] = self.store.open_run(
                experiment=op["experiment"], run_key=op["run_key"], run_name=op["run_name"], handle=handle,
                floor_key=op["floor_key"], start_ms=op["t"], may_be_stale=not self._live(handle))
        except Exception as exc:
            if self._is_refusal(exc):
                raise RunRefused(f"run {op['run_name']!r} in experiment {op['experiment']!r}: "
                                 f"{describe(exc)}") from exc
            raise
        self.sent_operations += 1
        if run.stale:
            upto = "" if run.cut is None else f" below step {run.cut}"
            self.refusals.append(
                f"run {op['run_name']!r} was logged to by a later driver after this one opened it: only what "
                f"it lacks is sent (per-step points{upto}, params, tags and artifacts it has not got); "
                "its status and the values it has are left as they are")

    def _checked(self, handle: str) -> ResolvedRun | None:
        """The run behind `handle`; None when none is known, or the one read back from disk is not its job's."""
        run = self.runs.get(handle)
        if run is not None and handle in self._unchecked:
            # a store that does not answer raises: checked again
            ours = self._ours(run, run.tags.get(RUN_KEY_TAG), key_digest=self._unchecked[handle])
            del self._unchecked[handle]
            if not ours:
                del self.runs[handle]
                return None
        return run

    def _ours(self, run: ResolvedRun, run_key: str | None, *, key_digest: str | None = None) -> bool:
        """Whether the store's run `run.run_id` is one this program made for `run_key` (any run key
        when None) and, given `key_digest`, for the job whose spill file it is. A run read back from a
        spill file or its progress record is not trusted: a line planted or edited there would send
        its metrics, tags and status into any run on the server."""
        found = self.store.run_key(run.run_id)
        return (found is not None and found == (run_key or found)
                and (key_digest is None or digest(found) == key_digest))

    def _metrics(self, run: ResolvedRun, batch: list[Op]) -> None:
        floor = -1 if run.floor is None else run.floor
        cut = float("inf") if run.cut is None else run.cut
        points = [p for op in batch for p in op["points"] if not op["per_step"] or floor < p[3] < cut]
        self.skipped_points += sum(len(op["points"]) for op in batch) - len(points)
        if points:
            self.store.log_metrics(run.run_id, points)
            self.sent_points += len(points)

    def _params(self, run: ResolvedRun, op: Op, files: Path) -> None:
        # A param is set once: a resumed run keeps the value it has (MLflow refuses a change).
        known = self._param_keys.setdefault(op["handle"], set(run.params))
        fresh = {k: v for k, v in op["params"].items() if k not in known}
        if fresh:
            self.store.log_params(run.run_id, fresh)
            known.update(fresh)
        # A rerun's changed value (a longer training.max_steps) would otherwise go unseen.
        changed = [f"{k}: {run.params[k]} -> {v}" for k, v in op["params"].items() if run.params.get(k, v) != v]
        if changed and not run.stale:  # a stale handle's values are older, not changed
            self.store.set_tags(run.run_id, {CHANGED_PARAMS_TAG: "; ".join(changed)[:MAX_TAG_LEN]})

    def _tags(self, run: ResolvedRun, op: Op, files: Path) -> None:
        tags = {k: v for k, v in op["tags"].items() if not (run.stale and k in run.tags)}
        if tags or not op["tags"]:
            self.store.set_tags(run.run_id, tags)
        else:
            self.kept += 1

    def _text(self, run: ResolvedRun, op: Op, files: Path) -> None:
        name = artifact_name(op["name"])
        if not self._overwrites(run, name):
            self.store.log_text(run, op["text"], name)

    def _overwrites(self, run: ResolvedRun, name: str) -> bool:
        """Whether a stale handle's artifact would replace the one a later driver logged."""
        if run.stale and self.store.has_artifact(run, name):
            self.kept += 1
            return True
        return False

    def _file(self, run: ResolvedRun, op: Op, files: Path) -> None:
        local = staged_copy(files, op["staged"])
        if local is None:  # not a name _stage makes: never a file elsewhere, read or deleted
            raise ValueError(f"staged copy {op['staged']!r} is not inside {files}")
        if not local.is_file():  # removed by hand, or already sent by a replay that died before recording it
            self._refused([op], f"its copy {local} is gone")
            return
        folder = op["artifact_path"] and artifact_name(op["artifact_path"])
        if not self._overwrites(run, posixpath.join(folder or "", local.name)):
            self.store.log_artifact(run, local, folder)

    def _dataset(self, run: ResolvedRun, op: Op, files: Path) -> None:
        self.store.log_dataset(run.run_id, name=op["name"], uri=op["uri"], rows=op["rows"], schema=op["schema"])

    def _finish(self, run: ResolvedRun, op: Op, files: Path) -> None:
        if run.stale:  # the run's status is its later driver's
            self.kept += 1
        else:
            self.store.set_status(run.run_id, op["status"], op["t"])


_STAGED = re.compile(r"[0-9a-f]{32}/[^/\x00]+")


def staged_copy(files: Path, staged: Any) -> Path | None:
    """The copy `staged` names in the artifacts folder `files`, or None when it names anything else.

    A spill line is read back from disk, so it is not trusted: the name must be what the tracker's
    _stage makes (`<uuid hex>/<file name>`), and no symbolic link may lead it out of `files`;
    otherwise a planted or edited line would upload, then delete, any file this user can write.
    """
    if not isinstance(staged, str) or not _STAGED.fullmatch(staged) or staged.endswith(("/.", "/..")):
        return None
    local = files / staged
    try:
        inside = local.resolve() == files.resolve() / staged
    except (OSError, RuntimeError):  # a link loop
        return None
    return local if inside else None


def remove_staged(batch: list[Op], files: Path) -> None:
    """Delete the artifact copies a sent batch made at call time."""
    for op in batch:
        if op["op"] == "file" and (local := staged_copy(files, op.get("staged"))) is not None:
            local.unlink(missing_ok=True)
            try:
                local.parent.rmdir()
            except OSError:
                pass
