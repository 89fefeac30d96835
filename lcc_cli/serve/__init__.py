"""`lcc serve`: cartridges behind an OpenAI-compatible HTTP endpoint (app.py), found and
verified by the catalog (catalog.py), answered by one batching engine (engine.py)."""
