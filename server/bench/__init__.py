"""`whisperstream bench` and `whisperstream soak`: streaming measured on real recordings.

The commands are in server.bench.cli and server.bench.soak; the definitions of the bench's
figures are the docstring of server.bench.cli.
"""
