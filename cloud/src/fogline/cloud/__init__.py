"""Fogline cloud tier."""
