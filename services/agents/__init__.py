"""Specialist agents: an LLM reasoning loop run as one event per step, with its state in a Redis checkpoint."""
