"""Prefect tasks: thin wrappers over pagecast core functions."""
