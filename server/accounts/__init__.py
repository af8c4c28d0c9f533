"""Driver accounts, their wallets and the double-entry ledger behind them."""
