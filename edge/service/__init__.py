"""The headless service: the daemon loop, its SQLite state, the outbox thread, systemd notification, check-config."""
