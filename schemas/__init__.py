"""The wire contract between Switchboard services: event models and topic names."""
