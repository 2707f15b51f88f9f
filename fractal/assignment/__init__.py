"""Fractal assignment."""
