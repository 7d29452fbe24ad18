"""Judging checkpoints: statistics (win rates with intervals); the eval stage builds on them."""
