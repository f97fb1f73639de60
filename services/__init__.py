"""Switchboard services. `runtime` is the shared library; every other package is a runnable service."""
