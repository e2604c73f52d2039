"""The `whisperstream` command: serve, stream a file, stream the microphone."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from server.addresses import is_loopback

log = logging.getLogger("whisperstream")


async def _serve(settings: Any) -> None:
    from server.app import TranscriptionServer
    from server.engines import build_engine
    from server.engines.deferred import DeferredEngine

    # The port opens first and the model loads meanwhile (/readyz says so): a model
    # fetched from the hub can take minutes, and a liveness probe must not kill it.
    engine = DeferredEngine(lambda: build_engine(settings.model), settings.model.name)
    server = TranscriptionServer(settings, engine)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:  # the first drains (app.py: shutdown); a second hurries it
        if stop.is_set():
            log.info("second signal: finishing the live sessions now")
            server.hurry()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    async with server.running() as running:
        ports = sorted({sock.getsockname()[1] for sock in running.sockets})
        host = settings.server.host
        log.info(
            "whisperstream ready: ws://%s:%s/v1/stream (model %s)",
            host,
            ports[0] if ports else settings.server.port,
            engine.name,
        )
        if not settings.auth.api_keys:
            log.info("no API keys configured: anyone who can reach %s may connect", host)
        await stop.wait()
        log.info("shutting down (a second SIGTERM or Ctrl-C finishes live sessions at once)")


def _configure_logging(level: str, log_file: Path | None) -> None:
    """Log to stderr, and to a file if asked; a file that cannot be written (a missing
    folder, no permission, a full disk) costs its log lines, never the transcription."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    problem = None
    if log_file is not None:
        try:
            handlers.append(logging.FileHandler(log_file))
        except OSError as exc:
            problem = f"cannot write log file {log_file} ({exc.strerror}); logging to stderr only"
    logging.basicConfig(
        level=level, handlers=handlers, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.raiseExceptions = False  # a failing write later (disk full) is skipped quietly
    if problem:
        log.warning(problem)


def cmd_serve(args: argparse.Namespace) -> int:
    from server.config import ConfigError, load_settings
    from streaming.engine import EngineLoadError

    overrides: dict[str, dict[str, Any]] = {}
    if args.host is not None:
        overrides.setdefault("server", {})["host"] = args.host
    if args.port is not None:
        overrides.setdefault("server", {})["port"] = args.port
    if args.model is not None:
        overrides.setdefault("model", {})["name"] = args.model
    try:
        settings = load_settings(args.config, overrides)
    except ConfigError as exc:
        print(f"whisperstream: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings.server.log_level, settings.server.log_file)
    hosts = [settings.server.host] + ([settings.compat.host] if settings.compat.enabled else [])
    public = [h for h in hosts if not is_loopback(h)]
    if public and not settings.auth.api_keys and not settings.server.allow_public_without_auth:
        print(
            f"whisperstream: refusing to listen on {public[0]} with no API keys; "
            "set auth.api_keys, or server.allow_public_without_auth: true to allow it",
            file=sys.stderr,
        )
        return 2
    wyoming = settings.wyoming
    if (
        wyoming.enabled
        and not is_loopback(wyoming.host)
        and not settings.server.allow_public_without_auth
    ):
        print(
            f"whisperstream: refusing to serve Wyoming on {wyoming.host}: the Wyoming protocol "
            "has no authentication, so anyone who reaches the port can use the server; set "
            "server.allow_public_without_auth: true to allow it",
            file=sys.stderr,
        )
        return 2
    try:
        asyncio.run(_serve(settings))
    except OSError as exc:
        print(f"whisperstream: cannot start the server: {exc}", file=sys.stderr)
        return 1
    except EngineLoadError as exc:  # every engine's load failure, whatever the backend
        print(f"whisperstream: {exc}", file=sys.stderr)
        return 2
    return 0


def _client_run(coro: Any) -> int:
    from client.stream import ClientError

    try:
        transcript = asyncio.run(coro)
    except ClientError as exc:
        print(f"whisperstream: {exc}", file=sys.stderr)
        return 1
    return 0 if transcript.complete else 1


def _reconnect(args: argparse.Namespace) -> Any:
    from client.stream import Reconnect

    return None if args.no_reconnect else Reconnect()


def cmd_stream(args: argparse.Namespace) -> int:
    from client.render import TerminalRenderer
    from client.stream import stream_file

    renderer = TerminalRenderer(as_json=args.json)
    return _client_run(
        stream_file(
            args.wav,
            args.url,
            args.speed,
            renderer.show,
            args.api_key,
            cafile=args.cafile,
            reconnect=_reconnect(args),
            on_notice=renderer.notice,
        )
    )


def cmd_mic(args: argparse.Namespace) -> int:
    from client.mic import stream_mic
    from client.render import TerminalRenderer

    renderer = TerminalRenderer(as_json=args.json)

    async def run() -> Any:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
        print("listening; press Ctrl-C to stop", file=sys.stderr)
        return await stream_mic(
            args.url,
            renderer.show,
            args.api_key,
            stop,
            cafile=args.cafile,
            reconnect=_reconnect(args),
            on_notice=renderer.notice,
        )

    return _client_run(run())


def build_parser() -> argparse.ArgumentParser:
    from client.stream import DEFAULT_URL

    parser = argparse.ArgumentParser(prog="whisperstream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the transcription server")
    serve.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML config file (default: ./config.yaml if present)",
    )
    serve.add_argument("--host", default=None, help="address to bind (server.host)")
    serve.add_argument("--port", type=int, default=None, help="port (server.port)")
    serve.add_argument(
        "--model", default=None, help="model.name: bundled, a CTranslate2 folder, or a hub name"
    )
    serve.set_defaults(func=cmd_serve)

    for name, helptext in (
        ("stream", "stream a WAV file and print the transcript"),
        ("mic", "stream the microphone and print the transcript"),
    ):
        p = sub.add_parser(name, help=helptext)
        if name == "stream":
            p.add_argument("wav", type=Path, help="16-bit PCM WAV file, any rate 8-48 kHz")
            p.add_argument(
                "--speed",
                type=float,
                default=1.0,
                help="pace relative to real time; 0 sends as fast as possible",
            )
        p.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default {DEFAULT_URL})")
        p.add_argument("--api-key", default=None, help="API key, when the server needs one")
        p.add_argument(
            "--cafile",
            type=Path,
            default=None,
            help="CA certificate to trust for a wss:// server (self-signed)",
        )
        p.add_argument("--json", action="store_true", help="print every message as JSON")
        p.add_argument(
            "--no-reconnect",
            action="store_true",
            help="end when the connection does, instead of reconnecting and "
            "resending the audio since the last final",
        )
        p.set_defaults(func=cmd_stream if name == "stream" else cmd_mic)

    from server.bench import cli as bench
    from server.bench import soak

    bench.add_subcommand(sub)  # whisperstream bench
    soak.add_subcommand(sub)  # whisperstream soak
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
