"""`lmc serve`: an OpenAI-compatible HTTP server and chat page over the engine (needs the `serve` extra)."""
