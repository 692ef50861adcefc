"""hello-cluster: a systemd- and container-native prefork supervisor for ASGI services."""

__version__ = "0.1.0"
