"""Prefect flows: short orchestration scripts over the pagecast core package."""
