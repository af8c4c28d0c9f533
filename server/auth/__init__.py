"""Who may use the operator panel and the driver page: users, roles, sessions, CSRF."""
