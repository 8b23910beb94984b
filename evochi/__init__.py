"""evochi: distributed Evolution Strategies over the Evochi gRPC protocol.

`evochi.v1` is the worker client (the published API), `evochi.server` the server.
"""

__version__ = "0.2.0"
