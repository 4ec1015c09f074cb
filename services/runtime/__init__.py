"""Plumbing every service shares: settings, broker, store, batch pipeline, dead letters, metrics, clock, logs."""
