"""Clients of the whisperstream protocol: a file streamer, a microphone streamer and the
browser page (client/web)."""
