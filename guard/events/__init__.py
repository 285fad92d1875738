"""The event path: ring buffer records in, syslog and JSON lines out.

reader (ring buffer -> record queue -> fold) -> records (decode) -> enrich ->
formats -> transports. Pure values but for the reader's ring buffer and the
transports' sockets.
"""
