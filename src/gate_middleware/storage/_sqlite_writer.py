"""The SQLite ledger's writer process: transactions run off the gateway's process.

Measured (bench/throughput.py, SQLite, 2 cores): ledger writes from a worker thread
cost the event loop more than the writes themselves. The thread takes the GIL back
after every statement, and under load each handoff waits on the loop and on the OS
scheduler: requests/s fell by a quarter, where this process costs the gateway only
the pickling of each batch.

Run as a script (`python -I -S _sqlite_writer.py DB`), it imports nothing but the
standard library, so it starts in milliseconds. It reads frames of (inserts,
statements) from stdin, runs each frame as one `BEGIN IMMEDIATE` transaction, and
answers every frame with None, or (refused, the error's text): refused when SQLite
would refuse the batch again (a value it cannot store, see `REFUSED`). An insert is a
many-row INSERT and its rows, whose values are laid end to end here: off the gateway's
process. The gateway also imports `connect` and `execute` from here, so the thread
path and the process run the same code.
"""

from __future__ import annotations

import itertools
import pickle
import sqlite3
import struct
import sys
from collections.abc import Sequence
from typing import Any, BinaryIO

__all__ = ["Inserts", "Statements", "connect", "execute", "frame", "read_frame", "write_frame"]

Statements = Sequence[tuple[str, Sequence[Any]]]
Inserts = Sequence[tuple[str, Sequence[Sequence[Any]]]]  # (INSERT of n rows, the n rows)
_LENGTH = struct.Struct(">I")


def connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def execute(conn: sqlite3.Connection, inserts: Inserts, statements: Statements) -> None:
    """All of `inserts` and `statements` in one transaction, or none of them."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for sql, rows in inserts:
            conn.execute(sql, list(itertools.chain.from_iterable(rows)))
        for sql, params in statements:
            conn.execute(sql, params)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # also when COMMIT itself failed
            conn.execute("ROLLBACK")
        raise


# What SQLite (or the sqlite3 module, binding a value) raises for a value it cannot
# store: a constraint, a string with an unpaired surrogate, an integer past 64 bits.
# Written again, such a batch fails again; a locked or full database is not among them.
REFUSED = (sqlite3.IntegrityError, sqlite3.DataError, OverflowError, UnicodeError)


def frame(value: object) -> bytes:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


def write_frame(stream: BinaryIO, value: object) -> None:
    stream.write(frame(value))
    stream.flush()


def read_frame(stream: BinaryIO) -> Any:
    """The next frame, or EOFError when the other side has closed."""
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        raise EOFError
    data = stream.read(_LENGTH.unpack(head)[0])
    return pickle.loads(data)


def _serve(path: str) -> None:
    conn = connect(path)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            inserts, statements = read_frame(stdin)
        except EOFError:
            break
        try:
            execute(conn, inserts, statements)
        except Exception as exc:
            write_frame(stdout, (isinstance(exc, REFUSED), f"{type(exc).__name__}: {exc}"))
        else:
            write_frame(stdout, None)
    conn.close()


if __name__ == "__main__":
    _serve(sys.argv[1])
