"""Organizations, users, roles, API keys, authentication, settings and the audit log."""
