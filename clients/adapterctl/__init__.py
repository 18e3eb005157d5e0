"""adapterctl: the client library and CLI for adapterd. Needs no torch."""
