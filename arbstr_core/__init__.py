"""arbstr: an OpenAI-compatible proxy that routes each chat completion to the cheapest provider."""

__version__ = "0.1.0"
