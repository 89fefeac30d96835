"""A library's index: DIR/.lcc-index.sqlite, every indexed cartridge's pages searchable by text.

SQLite's FTS5 full-text index ranks pages with its built-in `bm25()`; no inverted index of our
own. The index is derived data: `refresh` rebuilds what changed from the cartridges themselves.

- A cartridge is known by its content, not its time stamp: its `lcc_checksum` (a sha256 over
  its manifest and the digest of every tensor block; opening a v3 file reads its header, block
  table and index tensors, not its blocks).
  A file whose size, time or inode changed is opened and its checksum compared; only a
  changed checksum re-indexes it. A file replaced with the same checksum is the same
  cartridge.
- Every update is one transaction (`BEGIN IMMEDIATE`): a crash or Ctrl-C leaves the old index
  or the new one, never half of one, and two lcc processes updating at once take turns (the
  second waits on SQLite's lock; `busy_timeout`). WAL mode lets readers search while a writer
  works.
- The index only *chooses*. A page found here is read from its cartridge (opened without
  following links) only after the cartridge's checksum is checked against the one indexed and
  the row against the cartridge's own page table (runtime/memory/library.py): no index state
  can make lcc read or show a page its cartridge does not hold. Rows of the wrong type or range
  are never used: their cartridge is indexed again.
- The index file is lcc's own: it is opened only when it (and SQLite's -wal, -shm and -journal
  files beside it) is a regular file or absent, never through a symbolic link (a link could make
  lcc drop tables in another database). `rebuild` replaces such a link with a new index, and
  always works: it recreates every table.
- `refresh(check=...)` runs the checks `ask` runs against the loaded model (shape, RoPE,
  window, fingerprint, token ids), so a cartridge that cannot be read is listed as unreadable
  and never indexed.

Tables: `cartridges` (one row per file: name, checksum, stat, source, tokens, pages),
`pages` (cartridge, page number, entry range), `page_text` (FTS5 over each page's text, rowid =
the page's id), `cartridge_text` (FTS5 over each cartridge's whole text, rowid = its id). A
database that is damaged, of another schema version, or not a database at all is rebuilt from
the cartridges.
"""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import CartridgeError, LccError, ResourceError, UsageError

INDEX_NAME = ".lcc-index.sqlite"
SCHEMA_VERSION = 2  # 2: cartridge_text, each cartridge's whole text for its share of a page's score
BUSY_MS = 30_000  # how long a second lcc waits for another's update before giving up
_WORD = re.compile(r"\w+")
MAX_QUERY_TERMS = 64

TABLES = ("cartridge_text", "page_text", "pages", "cartridges", "meta")  # dropped in this order
SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE cartridges(
    id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, checksum TEXT NOT NULL,
    size INTEGER, mtime_ns INTEGER, inode INTEGER, source TEXT, tokens INTEGER, pages INTEGER,
    fingerprint TEXT, indexed REAL);
CREATE TABLE pages(
    id INTEGER PRIMARY KEY, cartridge INTEGER NOT NULL REFERENCES cartridges(id) ON DELETE CASCADE,
    number INTEGER NOT NULL, start INTEGER NOT NULL, entries INTEGER NOT NULL);
CREATE INDEX pages_by_cartridge ON pages(cartridge);
CREATE VIRTUAL TABLE page_text USING fts5(text, tokenize = 'unicode61 remove_diacritics 2');
CREATE VIRTUAL TABLE cartridge_text USING fts5(text, tokenize = 'unicode61 remove_diacritics 2');
"""


@dataclass(frozen=True)
class Hit:
    page_id: int
    cartridge: str  # file name in the library
    checksum: str
    number: int
    start: int
    entries: int
    text: str
    score: float  # the page's bm25() plus its cartridge's: lower is better, as SQLite reports it


@dataclass
class RefreshResult:
    added: list[str]
    replaced: list[str]
    removed: list[str]
    unreadable: dict[str, str]  # name -> reason
    cartridges: int
    pages: int
    seconds: float

    def to_dict(self) -> dict:
        return {"added": self.added, "replaced": self.replaced, "removed": self.removed,
                "unreadable": self.unreadable, "cartridges": self.cartridges, "pages": self.pages,
                "seconds": round(self.seconds, 3)}


class Library:
    """A folder of cartridges and the index beside it. One connection: a process that uses a
    Library from several threads (the server) holds its own lock around every call."""

    def __init__(self, folder: str | Path, rebuild: bool = False):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UsageError(f"{self.folder} is not a folder of cartridges")
        self.path = self.folder / INDEX_NAME
        self._replace_links = rebuild  # `lcc index --rebuild`: a link in the index's place is replaced
        self._check = None  # the model's checks, once a refresh was given them
        self._db: sqlite3.Connection | None = None
        # files that are not indexed cartridges, by (size, mtime, inode): not opened again until they change
        self._refused: dict[str, tuple] = {}

    # --- the database ------------------------------------------------------------------------

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = self._connect()
        return self._db

    def _files_are_own(self) -> None:
        """The index and SQLite's files beside it must be regular files (or absent): lcc never
        writes through a link. With --rebuild a link is removed (the link, not its target)."""
        for suffix in ("", "-wal", "-shm", "-journal"):
            path = Path(str(self.path) + suffix)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise UsageError(f"cannot read {path.name} in {self.folder}: {exc.strerror}") from exc
            if stat.S_ISREG(st.st_mode):
                continue
            kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
            if self._replace_links and not stat.S_ISDIR(st.st_mode):
                path.unlink()
                continue
            raise CartridgeError(f"the library index {path.name} in {self.folder} is {kind}; lcc does not write "
                                 f"through it", hint=f"remove it, or run `lcc index {self.folder} --rebuild`, "
                                                     f"which replaces it with a new index")

    def _connect(self) -> sqlite3.Connection:
        self._files_are_own()
        for attempt in (0, 1):
            db = None
            try:
                db = sqlite3.connect(self.path, timeout=BUSY_MS / 1000, isolation_level=None,
                                     check_same_thread=False)
                db.execute(f"PRAGMA busy_timeout = {BUSY_MS}")
                _wal(db)
                db.execute("PRAGMA foreign_keys = ON")
                if self._version(db) != SCHEMA_VERSION:
                    self._create(db)
                return db
            except sqlite3.DatabaseError as exc:
                if db is not None:
                    db.close()
                if not _damaged(exc) or attempt:
                    raise _index_error(exc, self.path) from exc
                self._discard()  # not a database, or a damaged one: it is derived data
            except OSError as exc:
                raise UsageError(f"cannot open the library index in {self.folder}: {exc.strerror}") from exc
        raise AssertionError("unreachable")

    @staticmethod
    def _version(db: sqlite3.Connection) -> int | None:
        """The schema version, or None when any of its tables is missing (an index damaged by
        hand is rebuilt from the cartridges: it is derived data)."""
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.OperationalError:
            return None
        if not set(TABLES) <= tables:
            return None
        return int(row[0]) if row and str(row[0]).isdecimal() else None

    def _create(self, db: sqlite3.Connection, force: bool = False) -> None:
        """(Re)create every table in one transaction: another process sees the old index or this one."""
        _begin(db, self.path)
        try:
            if not force and self._version(db) == SCHEMA_VERSION:  # another process made it while we waited
                db.execute("COMMIT")
                return
            for table in TABLES:
                db.execute(f"DROP TABLE IF EXISTS {table}")
            for statement in filter(str.strip, SCHEMA.split(";")):  # not executescript: it would commit
                db.execute(statement)
            db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise

    def _discard(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(str(self.path) + suffix).unlink(missing_ok=True)

    def rebuild(self) -> None:
        """Start from an empty index: every table dropped and made again (one transaction:
        readers see the old index until it commits), whatever state they were in."""
        try:
            self._create(self.db, force=True)
        except sqlite3.Error as exc:
            raise _index_error(exc, self.path) from exc

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # --- keeping it up to date -----------------------------------------------------------------

    def files(self) -> dict[str, os.stat_result]:
        """The library's cartridges: *.lcc files directly in the folder (not hidden files of a
        write in progress, not partial files, not symbolic links)."""
        out = {}
        try:
            entries = list(os.scandir(self.folder))
        except OSError as exc:
            raise UsageError(f"cannot list {self.folder}: {exc.strerror}") from exc
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.endswith(".lcc"):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                out[entry.name] = st
        return out

    def refresh(self, progress=None, check=None) -> RefreshResult:
        """Bring the index in line with the folder: new and changed cartridges (by checksum)
        indexed, removed ones dropped; one transaction per cartridge written, so an interrupted
        refresh keeps everything it finished. `check(cartridge_file, name)` raises LccError for
        a cartridge the loaded model cannot read (runtime.memory.check_model): it is then
        listed as unreadable, not indexed."""
        started = time.perf_counter()
        self._check = check if check is not None else self._check
        check = self._check
        db = self.db
        try:
            known = {row[0]: row[1:] for row in db.execute("SELECT name, checksum, size, mtime_ns, inode FROM "
                                                           "cartridges")}
        except sqlite3.Error as exc:
            raise _index_error(exc, self.path) from exc
        found = self.files()
        added, replaced, removed, unreadable = [], [], [], {}
        for name in sorted(set(known) - set(found)):
            self._write(lambda: self._delete(name), name)
            removed.append(name)
        def stat_of(name):
            return found[name].st_size, found[name].st_mtime_ns, found[name].st_ino

        todo = [n for n in sorted(found) if (n not in known or stat_of(n) != tuple(known[n][1:]))
                and self._refused.get(n, (None,))[0] != stat_of(n)]
        unreadable.update({n: reason for n, (st, reason) in self._refused.items() if n in found and st == stat_of(n)})
        for n, name in enumerate(todo):
            if progress is not None:
                progress(n, len(todo), name)
            try:
                cart = _open_header(self.folder / name, check)
            except Exception as exc:  # one bad file never stops the rest of the library
                reason = exc.message if isinstance(exc, LccError) else f"unreadable ({type(exc).__name__})"
                unreadable[name] = reason
                self._refused[name] = (stat_of(name), reason)  # not opened again until it changes
                if name in known:  # it changed into something unreadable: its pages must go
                    self._write(lambda: self._delete(name), name)
                    removed.append(name)
                continue
            st = found[name]
            if name in known and known[name][0] == cart["checksum"]:
                self._write(lambda: db.execute("UPDATE cartridges SET size = ?, mtime_ns = ?, inode = ? WHERE name = ?",
                                               (st.st_size, st.st_mtime_ns, st.st_ino, name)), name)
                continue
            self._write(lambda: self._put(name, cart, st), name)
            (replaced if name in known else added).append(name)
        counts = db.execute("SELECT (SELECT count(*) FROM cartridges), (SELECT count(*) FROM pages)").fetchone()
        return RefreshResult(added, replaced, removed, unreadable, counts[0], counts[1], time.perf_counter() - started)

    def _write(self, work, name: str) -> None:
        db = self.db
        _begin(db, self.path)
        try:
            work()
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(db)
            raise _index_error(exc, self.path, f" (updating {name})") from exc
        except BaseException:
            _rollback(db)
            raise

    def _delete(self, name: str) -> None:
        """A cartridge's rows, its pages' text included (FTS5 rows do not cascade)."""
        db = self.db
        db.execute("DELETE FROM page_text WHERE rowid IN (SELECT p.id FROM pages p JOIN cartridges c "
                   "ON c.id = p.cartridge WHERE c.name = ?)", (name,))
        db.execute("DELETE FROM cartridge_text WHERE rowid IN (SELECT id FROM cartridges WHERE name = ?)", (name,))
        db.execute("DELETE FROM cartridges WHERE name = ?", (name,))

    def _put(self, name: str, cart: dict, st: os.stat_result) -> None:
        db = self.db
        self._delete(name)
        cur = db.execute("INSERT INTO cartridges(name, checksum, size, mtime_ns, inode, source, tokens, pages, "
                         "fingerprint, indexed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (name, cart["checksum"], st.st_size, st.st_mtime_ns, st.st_ino, cart["source"],
                          cart["tokens"], len(cart["pages"]), cart["fingerprint"], time.time()))
        cid = cur.lastrowid
        for number, page in enumerate(cart["pages"]):
            pid = db.execute("INSERT INTO pages(cartridge, number, start, entries) VALUES (?, ?, ?, ?)",
                             (cid, number, page["start"], page["entries"])).lastrowid
            db.execute("INSERT INTO page_text(rowid, text) VALUES (?, ?)", (pid, page["text"]))
        db.execute("INSERT INTO cartridge_text(rowid, text) VALUES (?, ?)",
                   (cid, "\n".join(page["text"] for page in cart["pages"])))

    # --- searching ------------------------------------------------------------------------------

    def search(self, question: str, limit: int = 64, fingerprint: str | None = None, _again: bool = False) -> list[Hit]:
        """The best `limit` pages for `question`, best first (of cartridges made for the model with
        `fingerprint`, when given): FTS5's bm25() of the page plus that of its cartridge's whole
        text, so that of two pages that match alike, the one whose document is about the
        question wins (in a folder of one article's paragraphs, a sibling's sentence otherwise
        beat the question's own paragraph for 18% of questions; 13.5% with it)."""
        query = fts_query(question)
        if not query:
            return []
        try:
            rows = self.db.execute(
                "WITH docs AS (SELECT rowid AS cid, bm25(cartridge_text) AS ds FROM cartridge_text "
                "WHERE cartridge_text MATCH ?) "
                "SELECT p.id, c.name, c.checksum, p.number, p.start, p.entries, t.text, "
                "bm25(page_text) + COALESCE(d.ds, 0) AS score "
                "FROM page_text t JOIN pages p ON p.id = t.rowid JOIN cartridges c ON c.id = p.cartridge "
                "LEFT JOIN docs d ON d.cid = c.id "
                "WHERE page_text MATCH ? AND (? IS NULL OR c.fingerprint = ?) ORDER BY score, p.id LIMIT ?",
                (query, query, fingerprint, fingerprint, limit)).fetchall()
        except sqlite3.Error as exc:
            raise _index_error(exc, self.path) from exc
        hits, damaged = [], set()
        for row in rows:
            if _sound(row):
                hits.append(Hit(*row))
            else:
                damaged.add(row[1])
        if damaged and not _again:  # a row of the wrong type or range is never used: its cartridge is indexed again
            for name in damaged:
                self.forget(str(name))
            self.refresh(check=self._check)
            return self.search(question, limit, fingerprint, _again=True)
        return hits

    def cartridges(self) -> list[dict]:
        rows = self.db.execute("SELECT name, checksum, source, tokens, pages, fingerprint FROM cartridges "
                               "ORDER BY name").fetchall()
        return [dict(zip(("name", "checksum", "source", "tokens", "pages", "fingerprint"), r)) for r in rows]

    def refuse(self, name: str, reason: str) -> None:
        """A cartridge found unreadable when read (the model's checks): its pages dropped and the
        file not indexed again until it changes."""
        try:
            st = os.stat(self.folder / name, follow_symlinks=False)
            self._refused[name] = ((st.st_size, st.st_mtime_ns, st.st_ino), reason)
        except OSError:
            pass
        self.forget(name)

    def forget(self, name: str) -> None:
        """Drop one cartridge's pages (found changed when read): the next refresh indexes it again."""
        self._write(lambda: self._delete(name), name)


def _sound(row) -> bool:
    """A search row lcc may use: ids, page number and entry range as non-negative integers, a
    non-empty range, text as text."""
    _, name, checksum, number, start, entries, text, _ = row
    ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (number, start, entries))
    return (ints and number >= 0 and start >= 0 and entries >= 1 and isinstance(name, str)
            and isinstance(checksum, str) and isinstance(text, str))


def fts_query(question: str) -> str:
    """The question's words as an FTS5 query: any of them (OR), each quoted so that no word is
    read as FTS5 syntax (NEAR, AND, a column name...)."""
    words = list(dict.fromkeys(w.lower() for w in _WORD.findall(question)))[:MAX_QUERY_TERMS]
    return " OR ".join(f'"{w}"' for w in words)


def _open_header(path: Path, check=None) -> dict:
    """What the index keeps of a cartridge, from its header alone (format v3: the checksum
    covers every block through the block table, checked at open), opened without following a
    link and, with `check`, checked against the model as `ask` would."""
    from ..format.cartridge import open_held
    from ..format.layouts import layout_of

    f = open_held(path)
    m = f.manifest
    if f.version < 3 or not layout_of(m).indexed:
        raise CartridgeError(f"{path.name} is not an indexed cartridge", hint="compile it with --index")
    if not m["index"]["pages"]:
        raise CartridgeError(f"{path.name} holds no pages")
    if check is not None:
        check(f, path.name)
    return {"checksum": f.meta["lcc_checksum"], "source": m["source"].get("name"),
            "tokens": m["source"].get("token_count"), "pages": m["index"]["pages"],
            "fingerprint": m["model"]["fingerprint"]}


# SQLite's primary result codes for a file that is not a database, or a damaged one
_SQLITE_CORRUPT, _SQLITE_NOTADB, _SQLITE_FULL = 11, 26, 13


def _damaged(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def _index_error(exc: sqlite3.Error, path: Path, where: str = "") -> LccError:
    """A typed error for a database failure: busy (another lcc holds it past the timeout) or a
    full disk are resources; anything else names the index, which `lcc index DIR --rebuild`
    (or deleting the file) makes again."""
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    if code == _SQLITE_FULL:
        return ResourceError(f"no space left for the library index {path.name}{where}")
    if "locked" in str(exc) or "busy" in str(exc):
        return ResourceError(f"the library index {path.name} is busy (another lcc is updating it){where}",
                             hint="try again when it is done")
    return CartridgeError(f"the library index {path.name} cannot be used{where}: {exc}",
                          hint="run `lcc index DIR --rebuild`, or delete the file: it is rebuilt from the cartridges")


def _wal(db: sqlite3.Connection) -> None:
    """Switch to WAL. Two processes opening a new index at once race here, and SQLite answers
    "database is locked" at once instead of calling the busy handler, so wait as it would."""
    deadline = time.monotonic() + BUSY_MS / 1000
    while True:
        try:
            db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if not ("locked" in str(exc) or "busy" in str(exc)) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _begin(db: sqlite3.Connection, path: Path) -> None:
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise _index_error(exc, path) from exc


def _rollback(db: sqlite3.Connection) -> None:
    """SQLite has already rolled back after some failures (a full disk): only what is open."""
    if db.in_transaction:
        db.execute("ROLLBACK")
