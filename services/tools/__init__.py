"""Tool executors: run typed tools on request, with timeouts and idempotent side effects."""
