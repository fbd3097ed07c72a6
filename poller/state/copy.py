"""`state copy`: move a whole state from one store into an empty one (SQLite → PostgreSQL).

The daemon must be stopped: the source is opened with its lock, so nothing changes while
it is read. The target is written in one transaction (a failure leaves it empty) and then
read back: every table must hold as many rows as the source's, and the cursor must match.
"""

from __future__ import annotations

from dataclasses import dataclass

from poller.state.base import StateDump, StateError, StateStore


class CopyRefusedError(Exception):
    """The copy was not started, and nothing was written: the message says why."""


class TargetNotEmptyError(CopyRefusedError):
    """The target store already holds a state: copying into it could lose or mix one."""


class CopyMismatchError(StateError):
    """The target, read back after the copy, does not hold what was copied."""


@dataclass(frozen=True)
class CopySummary:
    """How much one copy moved: the rows of each table, and the cursor."""

    cursor: int | None
    events: int
    outbox: int
    dead_letters: int
    gaps: int
    notes: int
    pauses: int
    parts_sent: int
    attempt_log: int

    @classmethod
    def of(cls, dump: StateDump) -> CopySummary:
        return cls(
            cursor=dump.high_water,
            events=len(dump.events),
            outbox=len(dump.outbox),
            dead_letters=len(dump.dead_letters),
            gaps=len(dump.gaps),
            notes=len(dump.notes),
            pauses=len(dump.pauses),
            parts_sent=len(dump.parts_sent),
            attempt_log=len(dump.attempt_log),
        )

    def line(self, source: str, target: str) -> str:
        """The one line `state copy` prints (names of stores come without secrets)."""
        return (
            f"copied {source} to {target}: cursor {self.cursor}, {self.events} event(s), "
            f"{self.outbox} outbox row(s), {self.dead_letters} dead letter(s), "
            f"{self.gaps} gap(s); also {self.notes} note(s), {self.pauses} pause(s), "
            f"{self.parts_sent} sent part(s), {self.attempt_log} logged attempt(s)"
        )


async def copy_state(source: StateStore, target: StateStore) -> CopySummary:
    """Copy everything in `source` into `target`, which must be empty; verify by reading
    the target back. Raises TargetNotEmptyError before writing anything, CopyMismatchError
    when the read-back differs (the target then holds the copy and must be emptied by hand)."""
    if not await target.is_empty():
        raise TargetNotEmptyError(
            f"{target.where}: already holds a state; copy only into an empty one"
        )
    dump = await source.export_rows()
    await target.import_rows(dump)
    copied = CopySummary.of(dump)
    found = CopySummary.of(await target.export_rows())
    if found != copied:
        differ = ", ".join(
            f"{name} {getattr(copied, name)} → {getattr(found, name)}"
            for name in copied.__dataclass_fields__
            if getattr(copied, name) != getattr(found, name)
        )
        raise CopyMismatchError(
            f"{target.where}: the copy read back differs from {source.where} ({differ}); "
            "empty the target before trying again"
        )
    return copied
