"""duecourse: an open-source engine for automated debt collection and accounts-receivable dunning."""

__version__ = "0.1.0"
