"""Message templates and their sandboxed rendering (SPEC §7)."""
