"""raytp: tensor-parallel LLM serving on Ray Serve.

Request path: ingress (FastAPI, OpenAI API) → server (one replica = one TP group)
→ engine (schedule → execute → update) → executor (the gang) → workers (one rank each).
"""

__version__ = "0.1.0"
