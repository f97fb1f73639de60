"""The `switchboard` command: run goals, serve roles, submit and follow goals."""
