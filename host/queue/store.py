"""The queue's tables and every statement on them, in SQL that SQLite and PostgreSQL both run.

Time is the database's clock, so agents on machines whose clocks disagree still agree on when a lease
expires. A claim is one transaction: PostgreSQL locks the chosen row and other agents skip it
(`FOR UPDATE SKIP LOCKED`); SQLite takes its write lock up front (`BEGIN IMMEDIATE`).
"""

from __future__ import annotations

import getpass
import json
import os
import re
import socket
import sqlite3
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from forge.errors import QueueError
from forge.host.queue.capacity import Capacity
from forge.host.queue.jobs import FINAL_STATES, Job, Requirements, RetryPolicy, compute_key

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS forge_jobs (
        id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        steps TEXT NOT NULL,
        plan_path TEXT NOT NULL,
        plan_yaml TEXT NOT NULL,
        output_dir TEXT NOT NULL,
        requirements TEXT NOT NULL,
        retry TEXT NOT NULL,
        req_accelerator TEXT NOT NULL,
        req_arch TEXT NOT NULL,
        req_compute INTEGER NOT NULL,
        req_vram_mib INTEGER NOT NULL,
        req_gpus INTEGER NOT NULL,
        priority INTEGER NOT NULL,
        submitted_at DOUBLE PRECISION NOT NULL,
        submitted_by TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        agent TEXT,
        lease_token TEXT,
        lease_expires DOUBLE PRECISION,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        started_at DOUBLE PRECISION,
        finished_at DOUBLE PRECISION,
        exit_code INTEGER,
        error TEXT,
        result TEXT)""",
    "CREATE INDEX IF NOT EXISTS forge_jobs_by_state ON forge_jobs (state, priority, seq)",
    "CREATE INDEX IF NOT EXISTS forge_jobs_by_seq ON forge_jobs (seq)",
    # kind: 'event' (a runner event, its JSON), 'log' (a runner output line), 'queue' (what the queue did)
    """CREATE TABLE IF NOT EXISTS forge_job_events (
        id {serial},
        job_id TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        ts DOUBLE PRECISION NOT NULL,
        kind TEXT NOT NULL,
        body TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS forge_job_events_by_job ON forge_job_events (job_id, id)",
    """CREATE TABLE IF NOT EXISTS forge_agents (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        host TEXT NOT NULL,
        labels TEXT NOT NULL,
        hardware TEXT NOT NULL,
        state TEXT NOT NULL,
        job_id TEXT,
        started_at DOUBLE PRECISION NOT NULL,
        last_seen DOUBLE PRECISION NOT NULL)""",
)
_JOB_COLUMNS = ("id, name, state, steps, plan_path, plan_yaml, requirements, retry, priority, submitted_at, "
                "submitted_by, attempts, agent, lease_expires, cancel_requested, started_at, finished_at, exit_code, "
                "error, result")


def default_url() -> str:
    data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return os.environ.get("FORGE_QUEUE") or f"sqlite:///{data / 'forge' / 'queue.db'}"


def open_store(url: str | None = None) -> Store:
    """`postgresql://user@host/db` for several machines; `sqlite:///path/queue.db` (or a path) for one."""
    url = url or default_url()
    if url.startswith(("postgresql://", "postgres://")):
        return Store(_Postgres(url), url)
    path = Path(url.removeprefix("sqlite://") if url.startswith("sqlite://") else url).expanduser()
    return Store(_Sqlite(path), f"sqlite://{path.resolve()}")


class Store:
    def __init__(self, dialect, url: str) -> None:
        self.dialect, self.url = dialect, url
        self._local = threading.local()
        with self._tx() as run:
            dialect.lock_schema(run)
            for statement in SCHEMA:
                run(statement.replace("{serial}", dialect.serial))

    # -- submitting and following ------------------------------------------------------------------------
    def submit(self, *, name: str, steps: list[str], plan_path: str, plan_yaml: str, output_dir: str,
               requirements: Requirements, retry: RetryPolicy, priority: int = 0) -> Job:
        job_id = "j-" + uuid.uuid4().hex[:10]
        row = dict(id=job_id, name=name, state="queued", steps=",".join(steps), plan_path=plan_path, plan_yaml=plan_yaml,
                   output_dir=output_dir,
                   requirements=requirements.model_dump_json(), retry=retry.model_dump_json(),
                   req_accelerator=requirements.accelerator, req_arch=requirements.arch,
                   req_compute=compute_key(requirements.min_compute_capability or "0.0"),
                   req_vram_mib=requirements.min_free_vram_mib, req_gpus=requirements.gpu_count,
                   priority=priority, submitted_by=f"{getpass.getuser()}@{socket.gethostname()}")
        with self._tx() as run:
            run(f"INSERT INTO forge_jobs ({', '.join(row)}, submitted_at, seq) "
                f"VALUES ({', '.join(':' + key for key in row)}, {self.dialect.now}, "
                "(SELECT COALESCE(MAX(seq), 0) + 1 FROM forge_jobs))", row)
            self._note(run, job_id, 0, f"Submitted by {row['submitted_by']}; needs {requirements.describe()}.")
        return self.get(job_id)

    def get(self, ref: str) -> Job:
        """A job by its id or a unique prefix of it."""
        with self._tx() as run:
            rows = run(f"SELECT {_JOB_COLUMNS} FROM forge_jobs WHERE id = :ref OR id LIKE :prefix "
                       "ORDER BY seq DESC LIMIT 2", {"ref": ref, "prefix": ref.replace("%", "") + "%"})
        exact = [row for row in rows if row["id"] == ref]
        if exact or len(rows) == 1:
            return _job((exact or rows)[0])
        if not rows:
            raise QueueError(f"No job {ref!r} on the queue at {self.url}.", "`forge jobs list` shows the jobs.")
        raise QueueError(f"{ref!r} matches several jobs.", "Give more of the id (`forge jobs list`).")

    def jobs(self, states: list[str] | None = None, limit: int = 50) -> list[Job]:
        where = f"WHERE state IN ({', '.join(f':s{i}' for i in range(len(states)))})" if states else ""
        params = {f"s{i}": state for i, state in enumerate(states or [])} | {"limit": limit}
        with self._tx() as run:
            rows = run(f"SELECT {_JOB_COLUMNS} FROM forge_jobs {where} ORDER BY seq DESC LIMIT :limit",
                       params)
        return [_job(row) for row in rows]

    def cancel(self, ref: str) -> Job:
        """A queued job is cancelled at once; a running one is asked to stop (its agent stops the runner
        gracefully, so its state is saved)."""
        job = self.get(ref)
        if job.final:
            raise QueueError(f"Job {job.id} already {job.state}.", "Nothing to cancel.")
        with self._tx() as run:
            run(f"UPDATE forge_jobs SET cancel_requested = 1, state = CASE WHEN state = 'queued' THEN 'cancelled' "
                f"ELSE state END, finished_at = CASE WHEN state = 'queued' THEN {self.dialect.now} ELSE NULL END "
                "WHERE id = :id", {"id": job.id})
            self._note(run, job.id, job.attempts, "Cancel requested by "
                       f"{getpass.getuser()}@{socket.gethostname()}.")
        return self.get(job.id)

    def events(self, job_id: str, after: int = 0, limit: int = 2000) -> list[dict]:
        with self._tx() as run:
            return run("SELECT id, attempt, ts, kind, body FROM forge_job_events WHERE job_id = :job AND id > :after "
                       "ORDER BY id LIMIT :limit", {"job": job_id, "after": after, "limit": limit})

    def add_events(self, job_id: str, attempt: int, items: list[tuple[float, str, str]]) -> None:
        if not items:
            return
        with self._tx() as run:
            for ts, kind, body in items:
                run("INSERT INTO forge_job_events (job_id, attempt, ts, kind, body) VALUES (:job, :attempt, :ts, "
                    ":kind, :body)", {"job": job_id, "attempt": attempt, "ts": ts, "kind": kind, "body": body})

    # -- the agent's side ----------------------------------------------------------------------------------
    def claim(self, agent_id: str, capacity: Capacity, lease_seconds: float) -> tuple[Job, str] | None:
        """The most urgent queued job this agent can run, leased to it: (job, lease token), or None. A job
        whose output directory another running job writes waits: two runners must never share one (a plan
        submitted twice trains the same run)."""
        match, params = _match(capacity)
        token = uuid.uuid4().hex
        busy = "SELECT 1 FROM forge_jobs AS other WHERE other.state = 'running' AND other.output_dir = {dir}"
        with self._tx() as run:
            picked = run(f"SELECT id, output_dir FROM forge_jobs WHERE state = 'queued' AND ({match}) AND NOT EXISTS "
                         f"({busy.format(dir='forge_jobs.output_dir')}) ORDER BY priority DESC, seq LIMIT 1 "
                         f"{self.dialect.skip_locked}", params)
            if not picked:
                return None
            job_id, output = picked[0]["id"], picked[0]["output_dir"]
            self.dialect.lock_key(run, output)  # a concurrent claim for the same directory commits first ...
            if run(busy.format(dir=":dir"), {"dir": output}):  # ... and is seen here
                return None
            updated = run(f"UPDATE forge_jobs SET state = 'running', agent = :agent, lease_token = :token, "
                          f"lease_expires = {self.dialect.now} + :ttl, attempts = attempts + 1, "
                          f"started_at = COALESCE(started_at, {self.dialect.now}) WHERE id = :id AND state = 'queued' "
                          "RETURNING attempts", {"agent": agent_id, "token": token, "ttl": lease_seconds, "id": job_id})
            if not updated:  # taken in between (cannot happen with the row lock; cheap to be sure)
                return None
            attempt = updated[0]["attempts"]
            self._note(run, job_id, attempt, f"Attempt {attempt} claimed by agent {agent_id}.")
        return self.get(job_id), token

    def renew(self, job_id: str, token: str, lease_seconds: float) -> bool | None:
        """Extend the lease: whether a cancel was requested, or None when the lease is no longer ours."""
        with self._tx() as run:
            rows = run(f"UPDATE forge_jobs SET lease_expires = {self.dialect.now} + :ttl WHERE id = :id AND "
                       "lease_token = :token AND state = 'running' RETURNING cancel_requested",
                       {"ttl": lease_seconds, "id": job_id, "token": token})
        return bool(rows[0]["cancel_requested"]) if rows else None

    def finish(self, job_id: str, token: str, state: str, exit_code: int | None, error: str | None,
               result: dict, note: str) -> bool:
        """Record an attempt's end, if the lease is still ours (a fenced-off agent must not overwrite)."""
        with self._tx() as run:
            rows = run(f"UPDATE forge_jobs SET state = :state, exit_code = :code, error = :error, result = :result, "
                       f"lease_token = NULL, lease_expires = NULL, finished_at = CASE WHEN :final = 1 THEN "
                       f"{self.dialect.now} ELSE NULL END WHERE id = :id AND lease_token = :token RETURNING attempts",
                       {"state": state, "code": exit_code, "error": error, "result": json.dumps(result),
                        "final": int(state in FINAL_STATES), "id": job_id, "token": token})
            if rows:
                self._note(run, job_id, rows[0]["attempts"], note)
        return bool(rows)

    def requeue_expired(self) -> list[tuple[str, str]]:
        """Jobs whose agent stopped renewing its lease go back on the queue (or fail, when out of restarts)."""
        now = self.dialect.now
        with self._tx() as run:
            expired = [_job(row) for row in run(f"SELECT {_JOB_COLUMNS} FROM forge_jobs WHERE state = 'running' "
                                                f"AND lease_expires < {now} {self.dialect.skip_locked}")]
            moved = []
            for job in expired:
                state = job.next_state(None)
                error = None if state != "failed" else f"agent {job.agent} was lost and no restarts are left"
                run(f"UPDATE forge_jobs SET state = :state, error = :error, lease_token = NULL, lease_expires = NULL, "
                    f"finished_at = CASE WHEN :state = 'queued' THEN NULL ELSE {now} END WHERE id = :id",
                    {"state": state, "error": error, "id": job.id})
                self._note(run, job.id, job.attempts, f"Agent {job.agent} stopped renewing its lease: job {state}.")
                run("UPDATE forge_agents SET state = 'lost', job_id = NULL WHERE id = :agent", {"agent": job.agent})
                moved.append((job.id, state))
        return moved

    def register_agent(self, agent_id: str, name: str, capacity: Capacity, state: str, job_id: str | None) -> None:
        row = {"id": agent_id, "name": name, "host": socket.gethostname(), "labels": json.dumps(capacity.labels()),
               "hardware": capacity.hardware.model_dump_json(), "state": state, "job": job_id}
        with self._tx() as run:
            run(f"INSERT INTO forge_agents (id, name, host, labels, hardware, state, job_id, started_at, last_seen) "
                f"VALUES (:id, :name, :host, :labels, :hardware, :state, :job, {self.dialect.now}, {self.dialect.now}) "
                f"ON CONFLICT (id) DO UPDATE SET labels = :labels, hardware = :hardware, state = :state, "
                f"job_id = :job, last_seen = {self.dialect.now}", row)

    def agents(self) -> list[dict]:
        with self._tx() as run:
            rows = run(f"SELECT id, name, host, labels, hardware, state, job_id, started_at, last_seen, "
                       f"{self.dialect.now} AS now FROM forge_agents ORDER BY name, id")
        return [{**row, "labels": json.loads(row["labels"]), "hardware": json.loads(row["hardware"])} for row in rows]

    # -- plumbing ------------------------------------------------------------------------------------------
    def _note(self, run, job_id: str, attempt: int, text: str) -> None:
        run(f"INSERT INTO forge_job_events (job_id, attempt, ts, kind, body) VALUES (:job, :attempt, "
            f"{self.dialect.now}, 'queue', :body)", {"job": job_id, "attempt": attempt, "body": text})

    @contextmanager
    def _tx(self) -> Iterator[Callable[..., list[dict]]]:
        """One transaction on this thread's connection; `run(sql, params)` returns the rows as dicts."""
        connection = getattr(self._local, "connection", None)
        try:
            if connection is None:
                connection = self._local.connection = self.dialect.connect()
            with self.dialect.transaction(connection) as cursor:
                def run(sql: str, params: dict | None = None) -> list[dict]:
                    cursor.execute(self.dialect.sql(sql), params or {})
                    if cursor.description is None:
                        return []
                    names = [column[0] for column in cursor.description]
                    return [dict(zip(names, values)) for values in cursor.fetchall()]

                yield run
        except self.dialect.errors as exc:
            self._local.connection = None
            try:
                if connection is not None:
                    connection.close()
            except Exception:
                pass
            raise QueueError(f"The queue at {self.url} failed: {str(exc).strip().splitlines()[0] if str(exc) else exc}",
                             self.dialect.hint) from None


def _match(capacity: Capacity) -> tuple[str, dict]:
    """SQL for "this agent can run it", the same rule as `Capacity.misfit` (tested against it)."""
    parts, params = [], {}
    if capacity.cpu_jobs:
        parts.append("req_accelerator = 'cpu'")
    images, free = capacity.images, capacity.free_vram_mib
    if images and free:
        params |= {f"arch{i}": arch for i, arch in enumerate(images)} | {"compute": capacity.compute}
        params |= {f"free{n}": mib for n, mib in enumerate(free, start=1)}
        counts = " OR ".join(f"(req_gpus = {n} AND req_vram_mib <= :free{n})" for n in range(1, len(free) + 1))
        parts.append(f"(req_accelerator = 'cuda' AND req_arch IN ({', '.join(f':arch{i}' for i in range(len(images)))})"
                     f" AND req_compute <= :compute AND ({counts}))")
    return " OR ".join(parts) or "1 = 0", params


def _job(row: dict) -> Job:
    return Job(
        id=row["id"], name=row["name"], state=row["state"], steps=row["steps"].split(","), plan_path=row["plan_path"],
        plan_yaml=row["plan_yaml"], requirements=Requirements.model_validate_json(row["requirements"]),
        retry=RetryPolicy.model_validate_json(row["retry"]), priority=row["priority"],
        submitted_at=row["submitted_at"], submitted_by=row["submitted_by"], attempts=row["attempts"],
        agent=row["agent"], lease_expires=row["lease_expires"], cancel_requested=bool(row["cancel_requested"]),
        started_at=row["started_at"], finished_at=row["finished_at"], exit_code=row["exit_code"], error=row["error"],
        result=json.loads(row["result"]) if row["result"] else {},
    )


class _Sqlite:
    serial = "INTEGER PRIMARY KEY AUTOINCREMENT"
    now = "((julianday('now') - 2440587.5) * 86400.0)"
    skip_locked = ""  # BEGIN IMMEDIATE already serialises writers
    errors = (sqlite3.Error,)
    hint = "Check that the file's directory exists and is writable, and that it is on a local disk (not NFS)."

    def __init__(self, path: Path) -> None:
        self.path = path

    def connect(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode = WAL")  # readers (`forge jobs logs -f`) never block the agents
        connection.execute("PRAGMA synchronous = NORMAL")
        return connection

    @staticmethod
    def lock_schema(run) -> None:
        pass

    @staticmethod
    def lock_key(run, key: str) -> None:
        pass  # BEGIN IMMEDIATE: one writer at a time already

    @staticmethod
    def sql(text: str) -> str:
        return text

    @staticmethod
    @contextmanager
    def transaction(connection):
        cursor = connection.cursor()
        cursor.execute("BEGIN IMMEDIATE")
        try:
            yield cursor
        except BaseException:
            connection.rollback()
            raise
        connection.commit()


class _Postgres:
    serial = "BIGSERIAL PRIMARY KEY"
    now = "CAST(extract(epoch FROM clock_timestamp()) AS DOUBLE PRECISION)"
    skip_locked = "FOR UPDATE SKIP LOCKED"
    hint = "Check the URL (FORGE_QUEUE or --queue), that the server is up and that this machine may connect."

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError:
            raise QueueError("A PostgreSQL queue needs psycopg.",
                             "pip install 'forge-runner[postgres]' (or psycopg[binary]).") from None
        self.url, self.psycopg = url, psycopg
        self.errors = (psycopg.Error,)

    def connect(self):
        return self.psycopg.connect(self.url, autocommit=True, connect_timeout=10)

    @staticmethod
    def lock_schema(run) -> None:
        run("SELECT pg_advisory_xact_lock(4242001)")  # agents starting together must not race CREATE TABLE

    @staticmethod
    def lock_key(run, key: str) -> None:
        run("SELECT pg_advisory_xact_lock(hashtext(:key))", {"key": key})

    @staticmethod
    def sql(text: str) -> str:
        return re.sub(r"(?<![:\w]):(\w+)", r"%(\1)s", text)

    @staticmethod
    @contextmanager
    def transaction(connection):
        with connection.transaction(), connection.cursor() as cursor:
            yield cursor
