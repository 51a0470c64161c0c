"""Campaigns (SPEC §5): lifecycle, membership, KPIs."""
