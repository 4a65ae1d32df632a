"""Fogline firmware simulator."""
