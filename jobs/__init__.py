"""Login-node side of PruneTune: config, plan, submission and state. Never imports torch."""
