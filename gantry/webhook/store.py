"""Delivery id → flow run, in SQLite under ``<state dir>/webhook``.

The first layer of idempotency: a redelivery (GitHub's "Redeliver", a CI retry) is
answered with the run the first delivery started, without asking Prefect; so is a captured
body sent again under a new delivery id, recognised by the payload's own ``identity``
(GitHub's release id and action, workflow run id and attempt, a timestamped signature).
The second is the idempotency key passed to Prefect, which covers a crash between creating
the run and recording it here.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    delivery_id TEXT PRIMARY KEY,
    body_sha256 TEXT NOT NULL,
    flow_run_id TEXT NOT NULL,
    url TEXT NOT NULL,
    release_id TEXT NOT NULL,
    received_at TEXT NOT NULL
)
"""
_COLUMNS = ("delivery_id", "body_sha256", "flow_run_id", "url", "release_id", "received_at")


class Delivery(BaseModel):
    """One delivery that started a run."""

    model_config = ConfigDict(frozen=True)

    delivery_id: str
    body_sha256: str
    flow_run_id: str
    url: str
    release_id: str
    received_at: str = ""
    identity: str | None = None


class DeliveryStore:
    """A small SQLite table; safe across threads and processes (one connection per call)."""

    def __init__(self, path: Path, *, timeout_s: float = 10) -> None:
        self.path = path
        self.timeout_s = timeout_s
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)
            # Added after the first release of the table: migrate a store that lacks it.
            cols = {row[1] for row in db.execute("PRAGMA table_info(deliveries)")}
            if "identity" not in cols:
                db.execute("ALTER TABLE deliveries ADD COLUMN identity TEXT")
            db.execute(
                "CREATE UNIQUE INDEX IF NOT EXISTS deliveries_identity ON deliveries(identity) "
                "WHERE identity IS NOT NULL"
            )

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # timeout: how long to wait for another writer's lock before failing.
        db = sqlite3.connect(self.path, timeout=self.timeout_s)
        try:
            with db:  # commits, or rolls back on error
                yield db
        finally:
            db.close()

    def get(self, delivery_id: str) -> Delivery | None:
        return self._one("delivery_id", delivery_id)

    def get_by_identity(self, identity: str) -> Delivery | None:
        """The delivery that started a run for this payload identity, if any."""
        return self._one("identity", identity)

    def _one(self, column: str, value: str) -> Delivery | None:
        assert column in ("delivery_id", "identity")  # never from input
        with self._connect() as db:
            row = db.execute(
                f"SELECT {', '.join(_COLUMNS)}, identity FROM deliveries WHERE {column} = ?",  # noqa: S608
                (value,),
            ).fetchone()
        if row is None:
            return None
        return Delivery(**dict(zip((*_COLUMNS, "identity"), row, strict=True)))

    def put(self, delivery: Delivery) -> Delivery:
        """Record ``delivery`` unless its id or identity is known; return what is stored
        (first wins)."""
        received = delivery.received_at or datetime.now(UTC).isoformat(timespec="seconds")
        with self._connect() as db:
            db.execute(
                f"INSERT OR IGNORE INTO deliveries ({', '.join(_COLUMNS)}, identity) "  # noqa: S608
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    delivery.delivery_id,
                    delivery.body_sha256,
                    delivery.flow_run_id,
                    delivery.url,
                    delivery.release_id,
                    received,
                    delivery.identity,
                ),
            )
        stored = self.get(delivery.delivery_id) or (
            self.get_by_identity(delivery.identity) if delivery.identity else None
        )
        assert stored is not None  # just inserted, or already there
        return stored
