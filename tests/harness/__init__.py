"""The suite's harness: stage processes forked from one pre-imported server, and the order of the tests across
pytest-xdist processes (README.md)."""
