"""The command line: ``relay local|remote|serve|demo|plugins``.

The only code that prints errors and exits: a ConfigError (or a port that cannot be bound) is
one line on stderr and exit status 2; SIGINT and SIGTERM stop the relays and exit 0.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import secrets
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from . import __version__
from .address import Address
from .config import DEFAULT_METHOD, Config, build_config, build_configs, load_file
from .errors import ConfigError
from .plugin_manager import RelayPluginManager, get_plugin_manager
from .runner import Runner
from .sip008 import load_server_list, pick_server
from .ssurl import format_ss_url
from .workers import run_workers

__all__ = ["main"]

log = logging.getLogger("relay")

EXIT_USAGE = 2

# Flags that map onto config keys; everything else is the CLI's own.
_CONFIG_FLAGS = (
    "listen server method password key timeout connect_timeout protocol forward handler allow_private mode udp_timeout workers auth allow_open".split()
)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        plugins, config_path = _preparse(argv)
        file = load_file(config_path) if config_path else {}
        listed = file.get("plugins", [])
        pm = get_plugin_manager(tuple(plugins) + (tuple(p for p in listed if isinstance(p, str)) if isinstance(listed, list) else ()))
        parser = build_parser(pm)
        args = parser.parse_args(argv)
        _setup_logging(args.verbose - args.quiet)
        return args.run(args, pm, file)
    except ConfigError as e:
        print(f"relay: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # `relay url | head`: the reader left; say nothing more (Python's documented recipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130


def build_parser(pm: RelayPluginManager) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay",
        description="A plugin-based TCP proxy in the Shadowsocks spirit: a local relay (SOCKS5, tunnel) "
        "and a remote relay, joined by a Shadowsocks AEAD tunnel.",
    )
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    local = _command(commands, "local", "run a local relay: SOCKS5 (or a tunnel) in front of a remote", _run_local)
    _config_options(local, listen_default="127.0.0.1:1080")
    local.add_argument("-s", "--server", metavar="HOST:PORT", help="the remote relay")
    local.add_argument("--server-url", metavar="SS_URL", help="the remote as an ss:// URL (SIP002): server, method and password in one")
    local.add_argument("--server-list", metavar="FILE_OR_URL", help="a SIP008 server list (JSON file, or an http(s):// URL); the first server, or --server-name")
    local.add_argument("--server-name", metavar="NAME", help="which server of --server-list, by id or remarks")
    _cipher_options(local)
    local.add_argument("--protocol", metavar="NAME", help="front-end: mixed (default: SOCKS5, SOCKS4/4a and HTTP on one port), socks5, socks4, http or tunnel")
    local.add_argument("--allow-open", action="store_true", default=None, help="allow listening on a non-loopback address without --auth (an open proxy)")
    local.add_argument("--auth", action="append", metavar="USER:PASSWORD", help="require this user (SOCKS5 username/password, HTTP Basic); repeatable")
    local.add_argument("-L", "--forward", metavar="HOST:PORT", help="tunnel target, as seen from the remote (ss-tunnel's -L)")

    remote = _command(commands, "remote", "run a remote relay: the Shadowsocks server end", _run_remote)
    _config_options(remote, listen_default="0.0.0.0:8388")
    _cipher_options(remote)
    remote.add_argument("--handler", metavar="NAME", help="answer tunnelled streams with this handler (echo, uppercase) instead of connecting out")
    _allow_private(remote)

    serve = _command(commands, "serve", "serve a handler (echo, uppercase, socks5...) on a plain TCP port", _run_serve)
    _config_options(serve, listen_default="127.0.0.1:9999")
    serve.add_argument("--handler", metavar="NAME", help="the handler to run for every connection (default echo)")
    _allow_private(serve)

    demo = _command(commands, "demo", "run a remote and a local SOCKS5 relay on loopback, with a fresh password", _run_demo)
    demo.add_argument("-l", "--listen", metavar="HOST:PORT", default=None, help="SOCKS5 address (default 127.0.0.1:1080, or any free port)")
    demo.add_argument("-m", "--method", default=DEFAULT_METHOD, help=f"cipher (default {DEFAULT_METHOD})")
    _common(demo)

    check = _command(commands, "check", "check a config file without starting anything; one line per problem", _run_check)
    check.add_argument("-c", "--config", metavar="FILE", required=True, help="the JSON config to check")
    check.add_argument("--role", choices=("local", "remote"), help="what the config is for (default: local if it has local_port, local_address or locals)")
    check.add_argument("--plugin", action="append", default=[], metavar="MODULE", help="also load this plugin module")
    check.add_argument("-v", "--verbose", action="count", default=0, help=argparse.SUPPRESS)
    check.add_argument("-q", "--quiet", action="count", default=0, help=argparse.SUPPRESS)

    genkey = _command(commands, "genkey", "print a fresh key (2022 methods) or password for a method", _run_genkey)
    genkey.add_argument("-m", "--method", default="2022-blake3-aes-256-gcm", help="the method (default 2022-blake3-aes-256-gcm)")
    genkey.add_argument("--plugin", action="append", default=[], metavar="MODULE", help=argparse.SUPPRESS)
    genkey.add_argument("-v", "--verbose", action="count", default=0, help=argparse.SUPPRESS)
    genkey.add_argument("-q", "--quiet", action="count", default=0, help=argparse.SUPPRESS)

    url = _command(commands, "url", "print the ss:// URL (and a QR code) of a remote, for clients", _run_url)
    url.add_argument("-c", "--config", metavar="FILE", help="the remote's shadowsocks-libev JSON config")
    url.add_argument("--host", metavar="HOST", help="the address clients reach the remote at (default: the config's server, unless it is a wildcard)")
    url.add_argument("-p", "--port", type=int, help="the port clients reach it at (default: the config's)")
    _cipher_options(url)
    url.add_argument("--tag", default=None, help="a name for the server in clients (the URL's #fragment; default for a multi-user remote: the user's name)")
    url.add_argument("--user", metavar="NAME", help='a multi-user remote ("users"): the URL of this user only (default: one per user)')
    url.add_argument("--no-qr", action="store_true", help="print only the URL")
    url.add_argument("--plugin", action="append", default=[], metavar="MODULE", help=argparse.SUPPRESS)
    url.add_argument("-v", "--verbose", action="count", default=0, help=argparse.SUPPRESS)
    url.add_argument("-q", "--quiet", action="count", default=0, help=argparse.SUPPRESS)

    plugins = _command(commands, "plugins", "list the loaded plugins, their hooks, handlers and ciphers", _run_plugins)
    plugins.add_argument("--plugin", action="append", default=[], metavar="MODULE", help="also load this plugin module")
    plugins.add_argument("-v", "--verbose", action="count", default=0, help=argparse.SUPPRESS)
    plugins.add_argument("-q", "--quiet", action="count", default=0, help=argparse.SUPPRESS)

    for name, sub in (("local", local), ("remote", remote), ("serve", serve), ("demo", demo)):
        pm.hook.relay_add_arguments(parser=sub, command=name)
    return parser


def _command(commands: Any, name: str, help: str, run: Any) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
    sub.set_defaults(run=run, command=name)
    return sub


def _common(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--plugin", action="append", default=[], metavar="MODULE", help="load a plugin module from the import path (repeatable)")
    sub.add_argument("-v", "--verbose", action="count", default=0, help="log more (debug)")
    sub.add_argument("-q", "--quiet", action="count", default=0, help="log less (warnings and errors only)")


def _config_options(sub: argparse.ArgumentParser, listen_default: str) -> None:
    sub.add_argument("-c", "--config", metavar="FILE", help="shadowsocks-libev JSON config; flags override it")
    sub.add_argument("-l", "--listen", metavar="HOST:PORT", help=f"where to listen (default {listen_default})")
    sub.add_argument("-t", "--timeout", type=float, metavar="SECONDS", help="idle timeout of a session (default 300)")
    sub.add_argument("--connect-timeout", type=float, metavar="SECONDS", help="timeout to connect upstream (default 10)")
    udp = sub.add_mutually_exclusive_group()
    udp.add_argument("-u", "--udp", dest="mode", action="store_const", const="tcp_and_udp", help="relay UDP too (mode tcp_and_udp)")
    udp.add_argument("-U", "--udp-only", dest="mode", action="store_const", const="udp_only", help="relay UDP only (mode udp_only)")
    sub.add_argument("--udp-timeout", type=float, metavar="SECONDS", help="idle timeout of a UDP association (default 300)")
    sub.add_argument("--workers", type=int, metavar="N", help="run N worker processes sharing the port (SO_REUSEPORT), to use N cores")
    _common(sub)


def _cipher_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("-m", "--method", help=f"cipher (default {DEFAULT_METHOD})")
    sub.add_argument("-k", "--password", help="shared password")
    sub.add_argument("--key", help="base64 master key, instead of a password")


def _allow_private(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--allow-private", action="store_true", default=None, help="allow targets on loopback, private and link-local addresses")


def _preparse(argv: list[str]) -> tuple[list[str], str | None]:
    """--plugin and -c must be known before the full parser exists (plugins add options)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--plugin", action="append", default=[])
    pre.add_argument("-c", "--config")
    known, _ = pre.parse_known_args(argv)
    return known.plugin, known.config


def _setup_logging(verbosity: int) -> None:
    level = logging.DEBUG if verbosity > 0 else logging.WARNING if verbosity < 0 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr)


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    flags = {key: getattr(args, key, None) for key in _CONFIG_FLAGS}
    flags["plugins"] = args.plugin or None
    return flags


def _config(role: str, args: argparse.Namespace, pm: RelayPluginManager, file: dict[str, Any]) -> Config:
    return build_config(role, file, _flags(args), ciphers=pm.ciphers(), handlers=pm.handlers(), options=args)


def _run_local(args: argparse.Namespace, pm: RelayPluginManager, file: dict[str, Any]) -> int:
    flags = _flags(args)
    flags["server_url"] = args.server_url
    source = args.server_list or file.get("server_list")
    if source is not None:
        if not isinstance(source, str):
            raise ConfigError('"server_list" must be a file path or an http(s):// URL')
        if args.server_url or file.get("server_url"):
            raise ConfigError("give either a server URL or a server list, not both")
        spec = pick_server(load_server_list(source), args.server_name or file.get("server_name"))
        log.info("server %s from the list %s", spec.tag or spec.id or spec.server, source.split("?")[0])
        flags["server_url"] = spec.to_url()
    return _serve(pm, build_configs("local", file, flags, ciphers=pm.ciphers(), handlers=pm.handlers(), options=args))


def _run_remote(args: argparse.Namespace, pm: RelayPluginManager, file: dict[str, Any]) -> int:
    return _serve(pm, [_config("remote", args, pm, file)])


def _run_serve(args: argparse.Namespace, pm: RelayPluginManager, file: dict[str, Any]) -> int:
    return _serve(pm, [_config("serve", args, pm, file)])


def _run_demo(args: argparse.Namespace, pm: RelayPluginManager, file: dict[str, Any]) -> int:
    password = secrets.token_urlsafe(16)
    ciphers, handlers = pm.ciphers(), pm.handlers()
    common = {"method": args.method, "password": password, "plugins": args.plugin or None}
    remote = build_config("remote", {}, {**common, "listen": "127.0.0.1:0", "allow_private": True}, ciphers=ciphers, handlers=handlers, options=args)
    runner = Runner(pm)
    with _stopping(runner):
        (remote_server,) = runner.start(remote)
        local_flags = {**common, "server": str(remote_server.address), "listen": args.listen or "127.0.0.1:1080"}
        local = build_config("local", {}, local_flags, ciphers=ciphers, handlers=handlers, options=args)
        try:
            (local_server,) = runner.start(local)
        except ConfigError:
            if args.listen:
                raise
            log.warning("127.0.0.1:1080 is taken; the SOCKS5 proxy takes a free port instead")
            local = build_config("local", {}, {**local_flags, "listen": "127.0.0.1:0"}, ciphers=ciphers, handlers=handlers, options=args)
            (local_server,) = runner.start(local)
        socks = local_server.address
        url = format_ss_url(remote.method or "", password, remote_server.address, "relay-demo")
        print(
            "relay demo: a remote and a local relay on loopback; Ctrl-C stops both.\n"
            f"  SOCKS5 proxy   {socks}\n"
            f"  remote         {url}\n"
            f"  try            curl --socks5-hostname {socks} http://127.0.0.1:8000/\n"
            "                 (with a web server there, e.g. python3 -m http.server 8000)",
            flush=True,
        )
        _wait_for_signal()
    return 0


def _run_genkey(args: argparse.Namespace, pm: RelayPluginManager, file: dict[str, Any]) -> int:
    """A 2022 method takes a base64 key of exactly its size; any other a password (random, here)."""
    ciphers = pm.ciphers()
    cipher = ciphers.get(args.method.lower())
    if cipher is None:
        raise ConfigError(f"unknown method {args.method!r} (known: {', '.join(sorted(ciphers))})")
    generate = getattr(cipher, "generate_key", None)
    print(generate() if generate is not None else secrets.token_urlsafe(24))
    return 0


def _run_check(args: argparse.Namespace, pm: RelayPluginManager, file: dict[str, Any]) -> int:
    problems, notes = check_config(file, args.role, pm)
    for note in notes:
        print(note)
    for problem in problems:
        print(f"relay: error: {problem}", file=sys.stderr)
    return EXIT_USAGE if problems else 0


def check_config(file: dict[str, Any], role: str | None, pm: RelayPluginManager) -> tuple[list[str], list[str]]:
    """Every problem of a config file (one line each), and what it would start."""
    role = role or ("local" if {"local_port", "local_address", "locals"} & set(file) else "remote")
    ciphers, handlers = pm.ciphers(), pm.handlers()
    entries = file.get("locals") if role == "local" and isinstance(file.get("locals"), list) else None
    problems: list[str] = []
    configs: list[Config] = []
    for index, entry in enumerate(entries if entries is not None else [None]):
        part = file if entry is None else {**{k: v for k, v in file.items() if k not in ("locals", "local_address", "local_port")}, **entry}
        try:
            config = build_config(role, part, {}, ciphers=ciphers, handlers=handlers)
            pm.hook.relay_configure(config=config)  # the plugins' own checks
            configs.append(config)
        except ConfigError as e:
            problems.append(f'"locals"[{index}]: {e}' if entry is not None else str(e))
    # Two front-ends on one port, or a local in front of itself.
    seen: dict[tuple[str, int, str], int] = {}
    for index, config in enumerate(configs):
        kinds = [kind for kind, on in (("tcp", config.tcp), ("udp", config.udp)) if on]
        for address in config.listen:
            for kind in kinds:
                key = (address.host, address.port, kind)
                if address.port and key in seen:
                    problems.append(f"front-ends {seen[key]} and {index} both listen on {address} ({kind})")
                seen.setdefault(key, index)
            if config.server is not None and config.server.port == address.port and config.server.host in (address.host, "127.0.0.1", "localhost", "::1"):
                problems.append(f"the local on {address} would relay to itself: server is {config.server}")
    warnings = sorted({warning for config in configs for warning in config.warnings})
    notes = [f"warning: {warning}" for warning in warnings]
    if not problems:
        for config in configs:
            where = ", ".join(str(a) for a in config.listen)
            notes.append(f"ok: {config.role} ({config.handler.name}, {config.method or 'no cipher'}, {config.mode}) on {where}")
    return problems, notes


def _run_url(args: argparse.Namespace, pm: RelayPluginManager, file: dict[str, Any]) -> int:
    flags = {"method": args.method, "password": args.password, "key": args.key, "listen": None}
    remote = build_config("remote", file, flags, ciphers=pm.ciphers(), handlers=pm.handlers(), options=args)
    if remote.password is None:
        raise ConfigError("an ss:// URL carries the password: the config gives only a key")
    listen = remote.listen[0]
    host = args.host or ("" if listen.host in ("0.0.0.0", "::", "") else listen.host)
    if not host:
        raise ConfigError(f"the remote listens on {listen.host}, which clients cannot dial: give --host with its public address")
    server = Address(host, args.port or listen.port)
    if remote.users:
        names = [args.user] if args.user else list(remote.users)
        if args.user not in (None, *remote.users):
            raise ConfigError(f"--user {args.user!r}: the config has no such user (it has {', '.join(remote.users)})")
        client_password = remote.cipher.client_password  # type: ignore[union-attr]  # key_for_users's partner
        urls = [format_ss_url(remote.method or "", client_password(remote.password, remote.users[name]), server, args.tag or name) for name in names]
    elif args.user:
        raise ConfigError('--user: the config has no "users"')
    else:
        urls = [format_ss_url(remote.method or "", remote.password, server, args.tag)]
    print("\n".join(urls))
    url = urls[0]
    if not args.no_qr and len(urls) == 1:
        try:
            import segno  # noqa: PLC0415 - optional: pip install 'relay-proxy[qr]'
        except ImportError:
            print("(for a QR code in the terminal: pip install 'relay-proxy[qr]')", file=sys.stderr)
        else:
            segno.make(url, error="m").terminal(compact=True)
    return 0


def _run_plugins(args: argparse.Namespace, pm: RelayPluginManager, file: dict[str, Any]) -> int:
    infos = pm.describe()
    width = max(len(i.name) for i in infos)
    source_width = max(len(i.source) for i in infos)
    print("plugins:")
    for info in infos:
        print(f"  {info.name:<{width}}  {info.source:<{source_width}}  {info.version:<8}  {info.module}")
        print(f"  {'':<{width}}  hooks: {', '.join(info.hooks) or '-'}")
    print("handlers:")
    for name, spec in sorted(pm.handlers().items()):
        print(f"  {name:<12} {spec.description}")
    print("ciphers:")
    print("  " + ", ".join(sorted(pm.ciphers())))
    return 0


def _raise_descriptor_limit() -> None:
    """Every session holds two sockets: take the hard limit on open files, not the soft 1024."""
    try:
        import resource  # noqa: PLC0415 - POSIX only

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
        if soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ImportError, ValueError, OSError):
        pass  # keep what we have: accept() backs off when it runs out


def _serve(pm: RelayPluginManager, configs: list[Config]) -> int:
    _raise_descriptor_limit()
    workers = max(config.workers for config in configs)
    if workers > 1:
        return run_workers(workers, lambda: _serve_here(pm, configs))
    return _serve_here(pm, configs)


def _serve_here(pm: RelayPluginManager, configs: list[Config]) -> int:
    runner = Runner(pm)
    with _stopping(runner):
        for config in configs:
            runner.start(config)
        # What startup made (modules, plugins, configs, replay filters) lives as long as the
        # process: keep the cyclic collector from walking it again on every full collection.
        gc.freeze()
        _wait_for_signal()
    return 0


class _stopping:
    """Stop the runner however the block ends."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def __enter__(self) -> Runner:
        return self.runner

    def __exit__(self, *exc: object) -> None:
        if self.runner.servers:
            self.runner.stop()
            log.info("stopped")


def _wait_for_signal() -> None:
    stop = threading.Event()

    def handle(signum: int, frame: Any) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    while not stop.wait(1.0):
        pass
