"""Sans-I/O protocol code: bytes and events in, bytes and actions out.

Nothing in this package touches sockets, asyncio, aioquic.asyncio, os or the clock.
"""
