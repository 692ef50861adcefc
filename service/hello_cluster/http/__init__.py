"""The wire: our HTTP/1.1 protocol, uvicorn's, the policy both share, TLS, WSGI."""
