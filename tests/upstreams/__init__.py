"""Tiny misbehaving upstream servers, run as real processes by tests."""
