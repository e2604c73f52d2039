"""The I/O around the streaming core: WebSocket endpoint, HTTP routes, inference
scheduling, configuration and the command line."""
