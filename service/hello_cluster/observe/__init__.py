"""What operators see: metrics, the master's endpoint, /status and its command."""
