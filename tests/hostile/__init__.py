"""The hostile-call corpus, by entry point; assembled by tests/support/hostile_calls.py."""
