"""The memory service: records every goal event in Redis, keeps outcomes in Qdrant, answers recalls."""
