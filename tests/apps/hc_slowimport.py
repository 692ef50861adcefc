"""Test app that takes a while to import, as a big app on a busy machine does."""

import os
import time

time.sleep(float(os.environ.get("HC_SLOW_IMPORT_SECONDS", "2")))

from hello_cluster.app import app  # noqa: E402

__all__ = ["app"]
