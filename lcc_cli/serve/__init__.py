"""`lcc serve`: cartridges behind an OpenAI-compatible HTTP endpoint (app.py), found and
verified by the catalog (catalog.py), kept in RAM within a budget (cache.py), answered by one
batching engine (engine.py); browsers kept out (guard.py), idle sockets cut off (protocol.py),
message text kept from making special tokens (prompt.py); started by run.py."""
