"""Forge: a containerised job runner for LLM fine-tuning."""

__version__ = "0.1.0"
