"""Test app module whose attribute is not an ASGI callable."""

app = 42
