"""`forge jobs logs`: replay a job's events and output from the queue through the same progress bars
`forge train` shows, and keep following until the job ends."""

from __future__ import annotations

import time

from forge.contract.events import parse_line
from forge.host.queue.jobs import Job
from forge.host.queue.store import Store


def replay(store: Store, job: Job, renderer, follow: bool, poll_seconds: float = 0.5) -> Job:
    """Everything recorded so far (and, following, until the job is final); returns the job as it ended."""
    after = 0
    while True:
        job = store.get(job.id)  # read the state first: events written before it are all there to drain
        while rows := store.events(job.id, after):
            for row in rows:
                after = row["id"]
                if row["kind"] == "event":
                    event = parse_line(row["body"])
                    if event is not None:
                        renderer.event(event)
                elif row["kind"] == "log":
                    renderer.log(row["body"])
                else:
                    renderer.note(row["body"])
        if job.final or not follow:
            return job
        time.sleep(poll_seconds)
