"""Strategies and their stages (SPEC §3): validation, audit log, performance."""
