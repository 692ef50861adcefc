"""Test app that raises while being imported."""

raise ValueError("broken on purpose")
