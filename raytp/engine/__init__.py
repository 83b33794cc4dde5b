"""The engine: scheduler (pure Python), engine loop, detokenizer. Imports neither torch nor Ray."""
