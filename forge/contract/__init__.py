"""The host↔runner contract: the forge.yaml schema and the event protocol. Both sides import only this."""

from forge.contract.events import Event, encode_event, parse_line
from forge.contract.plan import PLAN_SCHEMA_VERSION, Plan

__all__ = ["PLAN_SCHEMA_VERSION", "Event", "Plan", "encode_event", "parse_line"]
