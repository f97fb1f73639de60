"""The orchestrator: plans goals into tasks, dispatches them as their dependencies finish, writes the answer."""
