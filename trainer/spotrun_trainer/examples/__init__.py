"""Example training jobs that use the session API."""
