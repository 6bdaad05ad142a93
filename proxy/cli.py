"""Command line: ``llm-sidecar [--config FILE]`` serves (SIGHUP reloads FILE, SIGTERM/SIGINT drain and
stop); ``llm-sidecar check-config FILE`` checks.

``--config FILE`` may come before or after the command (``check-config --config FILE`` too)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
import time

from proxy import __version__
from proxy.app import App, BuildError, ReloadError
from proxy.config import Config
from proxy.config_loader import ConfigError, load_config
from proxy.logs import LogHandle, configure_logging
from proxy.sdnotify import Notifier

log = logging.getLogger("llm_sidecar")

EXIT_CONFIG = 2
DEFAULT_CONFIG = "config.yaml"
_CONFIG_HELP = f"YAML config (default: ./{DEFAULT_CONFIG})"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    config: str | None = args.config
    if args.command == "check-config":
        if args.file is not None and config is not None and args.file != config:
            parser.error(
                f"check-config: two config files given ({args.file} and --config {config}): give one"
            )
        return check_config(args.file or config or DEFAULT_CONFIG)
    return serve(config or DEFAULT_CONFIG)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llm-sidecar", description="OpenAI-compatible sidecar reverse proxy for LLM backends."
    )
    p.add_argument("--version", action="version", version=f"llm-sidecar {__version__}")
    p.add_argument("--config", "-c", default=None, help=_CONFIG_HELP)
    sub = p.add_subparsers(dest="command")
    serving = sub.add_parser("serve", help="serve until SIGINT/SIGTERM (the default)")
    check = sub.add_parser(
        "check-config", help="validate a config file: exit 0, or print problems and exit 2"
    )
    check.add_argument(
        "file", nargs="?", help=f"the config to check (or --config; default: ./{DEFAULT_CONFIG})"
    )
    for command in (serving, check):
        # After the command too; SUPPRESS: when absent here, the one given before the command stays.
        command.add_argument("--config", "-c", default=argparse.SUPPRESS, help=_CONFIG_HELP)
    return p


def check_config(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return EXIT_CONFIG
    chain = " → ".join([*(m.type for m in config.middleware), "forward"])
    print(f"{path}: OK ({len(config.routes)} routes, {len(config.upstreams)} upstreams; chain: {chain})")
    return 0


def serve(path: str) -> int:
    started = time.monotonic()
    try:
        config = load_config(path)
    except ConfigError as e:
        print(f"llm-sidecar: not starting, the config has problems:\n{e}", file=sys.stderr)
        return EXIT_CONFIG
    logs = configure_logging(config.log)  # formatting and writing in a thread, off the loop
    import uvloop

    try:
        return int(uvloop.run(_serve(config, path, started, logs)))
    except KeyboardInterrupt:
        return 0
    finally:
        logs.close()  # what is still queued gets written


async def _serve(config: Config, path: str, started: float, logs: LogHandle) -> int:
    loop = asyncio.get_running_loop()
    try:
        app = App(config, loop, access_sink=logs.access)
    except BuildError as e:
        log.error("not starting: %s", e)
        return EXIT_CONFIG
    try:
        await app.start()
    except OSError as e:
        log.error("cannot listen on %s: %s", config.listen.address, e.strerror or e)
        return 1
    # Everything built so far lives until exit: keep it out of the collector's full passes, which
    # otherwise walk it all again and again (latency spikes at p99 under load).
    gc.freeze()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reload_wanted = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, reload_wanted.set)
    log.info("%s (ready in %.0f ms)", app.describe(), (time.monotonic() - started) * 1000)
    notifier = Notifier()
    notifier.ready()
    watchdog = loop.create_task(notifier.watchdog())
    reloader = loop.create_task(_reload_on_signal(app, path, reload_wanted, notifier, logs))
    await stop.wait()
    log.info("stopping: finishing in-flight requests (up to %g s)", app.config.drain_timeout_s)
    notifier.stopping()
    reloader.cancel()
    watchdog.cancel()
    await app.stop()
    return 0


async def _reload_on_signal(
    app: App, path: str, wanted: asyncio.Event, notifier: Notifier, logs: LogHandle
) -> None:
    """SIGHUP: read and check ``path`` again, build it, swap it in; a file with problems is
    rejected with check-config's messages and the config in force goes on serving."""
    loop = asyncio.get_running_loop()
    while True:
        await wanted.wait()
        wanted.clear()
        notifier.reloading()
        try:
            config = await loop.run_in_executor(None, load_config, path)
            notes = await app.reload(config)
        except (ConfigError, ReloadError) as e:
            app.reloads["failed"] += 1
            log.error("reload of %s rejected; still serving the config before it:\n%s", path, e)
        else:
            app.reloads["ok"] += 1
            logs.reconfigure(config.log)
            for note in notes:
                log.warning("reload of %s: %s", path, note)
            log.info("config reloaded from %s | %s", path, app.describe_routes())
        notifier.ready()
