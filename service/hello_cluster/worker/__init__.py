"""A worker process: imports the app and serves it on the inherited sockets."""
