"""One transaction of an SQLite connection in autocommit mode (the journal's, `vfiod.state`)."""

from __future__ import annotations

import sqlite3
import threading
from types import TracebackType
from typing import Literal


class Tx:
    """``with Tx(db, lock):`` one transaction under `lock`, committed unless the block raises.
    Opened inside another of the same thread, it is a savepoint of that one: its writes
    commit with the outer transaction (one commit, one sync), and a block that raises
    undoes only its own."""

    def __init__(self, db: sqlite3.Connection, lock: threading.RLock):
        self.db = db
        self.lock = lock
        self.nested = False

    def __enter__(self) -> None:
        self.lock.acquire()
        self.nested = self.db.in_transaction
        try:
            self.db.execute("SAVEPOINT nested" if self.nested else "BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        try:
            if not self.nested:
                self.db.execute("COMMIT" if et is None else "ROLLBACK")
            elif et is None:
                self.db.execute("RELEASE nested")
            else:
                self.db.execute("ROLLBACK TO nested")
                self.db.execute("RELEASE nested")
        finally:
            self.lock.release()
        return False
