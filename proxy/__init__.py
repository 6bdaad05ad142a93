"""llm-sidecar: an OpenAI-compatible sidecar reverse proxy."""

__version__ = "0.1.0"
