"""OpenAI-compatible schemas (protocol) and conversions between them and engine types (openai)."""
