"""Accounts (debtors), invoices, payments, promises to pay, derived balances and imports."""
