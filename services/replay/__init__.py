"""Replays of historical data as live shop traffic."""
