"""The HTTP gateway: accepts goals, serves their status, streams their progress as server-sent
events, and publishes lifecycle commands and approval decisions. It never calls a model."""
