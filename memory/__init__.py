"""Episodic memory in Redis and semantic memory in Qdrant, behind narrow interfaces."""
