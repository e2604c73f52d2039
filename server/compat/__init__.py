"""APIs that existing clients speak, on a listener of their own (`compat`): OpenAI's
files and Realtime transcription APIs, and Deepgram's live streaming API. Each is a
front door on the session host; none has a session loop of its own."""
