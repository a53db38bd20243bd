"""The ServerApp's work: the run's set-up, node waiting and the grid it talks through,
and the retrieval task the routing strategy aggregates (§5)."""
