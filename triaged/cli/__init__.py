"""Typer command-line interface: thin shells over the service functions."""
