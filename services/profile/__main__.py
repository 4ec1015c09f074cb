import asyncio
import sys

from services.profile.app import build
from services.profile.crypto import KeyConfigError

try:
    host = build()
except KeyConfigError as exc:
    sys.exit(f"profile: {exc}")
asyncio.run(host.run())
