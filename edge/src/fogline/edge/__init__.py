"""Fogline edge agent."""
