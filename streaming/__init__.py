"""The sans-I/O streaming core: audio in, VAD, streaming policy, protocol events out.

Nothing in this package imports asyncio, websockets or an MQTT client; the server and
the clients move bytes, this package decides what they mean.
"""
