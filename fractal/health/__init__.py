"""Liveness and readiness, served by every app."""
