"""The hostile-call corpus, by entry point; assembled by tests/hostile_calls.py."""
