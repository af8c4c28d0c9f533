"""Payments: providers (wallet, sandbox card), settlement, debts, refunds, permits, receipts."""
