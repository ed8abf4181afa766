"""The job queue: `forge submit` puts plans on it, `forge agent` takes the ones its hardware can run.

SQLite (one machine, several agents) or PostgreSQL (several machines); claims are leases renewed by
heartbeats, so a dead agent's job goes back to the queue and resumes from its last checkpoint.
"""
