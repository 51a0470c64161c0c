"""Channels (SPEC §7): the provider interface and its implementations (sandbox first)."""
