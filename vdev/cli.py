"""The ``vdev`` command line: serve, devices, inspect, doctor, proxy, replay, guest.

Wrong arguments get one line on stderr and exit status 2 — never a
traceback — because people type these commands by hand while debugging
something else.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

import trio

from vdev import doctor, plugins, sockets
from vdev.libvfio_user.bindings import LibraryError
from vdev.model.device import Device
from vdev.model.faults import DeviceFaultPlan, DeviceFaultPlanError
from vdev.runtime import ServeError, serve
from vdev.runtime.activation import activated_fd
from vdev.runtime.context import listening_socket_path


class UsageError(Exception):
    """A mistake in the command line (exit status 2)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but errors are a single line."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _parse_params(device_class: type[Device], pairs: Sequence[str]) -> dict[str, object]:
    specs = device_class.param_specs()
    values: dict[str, object] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep:
            raise UsageError(f"--param expects name=value, got {pair!r}")
        if name not in specs:
            known = ", ".join(sorted(specs)) or "none"
            raise UsageError(f"{device_class.__name__} has no parameter {name!r} (parameters: {known})")
        try:
            values[name] = specs[name].parse(text)
        except ValueError as exc:
            raise UsageError(f"{device_class.__name__}: bad value for --param {name}={text}: {exc}") from None
    return values


def _load_device(reference: str) -> type[Device]:
    # Like `python -m`, find device modules in the current directory.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return plugins.load(reference)
    except plugins.PluginError as exc:
        raise UsageError(str(exc)) from None


def _check_socket_path(path: str) -> None:
    try:
        sockets.prepare_socket_path(path)
    except sockets.SocketPathError as exc:
        raise UsageError(str(exc)) from None


def _open_output(path: str, what: str, mode: str = "w") -> IO[str]:
    try:
        return open(path, mode, encoding="utf-8")  # noqa: SIM115 - closed by the caller
    except OSError as exc:
        raise UsageError(f"cannot open {what} {path}: {exc.strerror}") from None


def _cmd_serve(args: argparse.Namespace) -> int:
    device_class = _load_device(args.device)
    params = _parse_params(device_class, args.param)
    try:
        device = device_class(name=args.name, **params)
    except Exception as exc:  # the device's own __init__ or declaration: one line, never a traceback
        raise UsageError(f"cannot create {args.device}: {plugins.describe_failure(exc)}") from None
    try:
        if args.device_faults:
            try:
                device.faults = DeviceFaultPlan.load(args.device_faults)
            except DeviceFaultPlanError as exc:
                raise UsageError(str(exc)) from None
        where: Path | int
        if args.socket_path:
            _check_socket_path(args.socket_path)
            where = Path(args.socket_path)
        else:
            where = _inherited_socket(args.fd)
        trace: IO[str] | None = None
        if args.trace:
            trace = sys.stdout if args.trace == "-" else _open_output(args.trace, "trace file")
            device.events.write_to(trace)
        try:
            return _serve_until_stopped(device, args, where)
        finally:
            if trace is not None and trace is not sys.stdout:
                trace.close()
    finally:
        device.close()


def _serve_until_stopped(device: Device, args: argparse.Namespace, where: Path | int) -> int:
    allowed = frozenset(args.allow_uid) if args.allow_uid else None

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve, [(device, where)], allowed_uids=allowed))
            print(f"vdev: serving {device.name} ({args.device}) on {_describe(where)}", file=sys.stderr, flush=True)

    try:
        trio.run(run)
    except BaseException as exc:
        failure = _single(exc)
        if not isinstance(failure, (ServeError, LibraryError)):
            raise
        print(f"vdev: error: {failure}", file=sys.stderr)
        return 1
    return 0


def _single(exc: BaseException) -> BaseException:
    """The one exception inside nested exception groups of one member each (Trio nurseries make them)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _inherited_socket(fd: int | None) -> int:
    """The listening socket to serve on: ``--fd``, else one passed by socket activation."""
    try:
        if fd is None:
            fd = activated_fd()
        if fd is None:
            raise UsageError("one of --socket-path or --fd is required (or socket activation: LISTEN_FDS, LISTEN_PID)")
        listening_socket_path(fd)
    except ServeError as exc:
        raise UsageError(str(exc)) from None
    return fd


def _describe(where: Path | int) -> str:
    return f"fd {where} ({listening_socket_path(where)})" if isinstance(where, int) else str(where)


def _cmd_devices(args: argparse.Namespace) -> int:
    listing: list[dict[str, Any]] = []
    for name, reference in sorted(plugins.available().items()):
        try:
            device_class = plugins.load(name)
        except plugins.PluginError as exc:  # a broken plugin must not hide the others
            listing.append({"name": name, "reference": reference, "error": str(exc)})
            continue
        doc = (device_class.__doc__ or "").strip().splitlines()
        listing.append(
            {
                "name": name,
                "reference": reference,
                "id": f"{device_class.vendor_id:04x}:{device_class.device_id:04x}",
                "summary": doc[0] if doc else "",
                "parameters": [
                    {"name": p, "default": spec.default, "help": spec.help}
                    for p, spec in device_class.param_specs().items()
                ],
            }
        )
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    settings = {
        (entry["name"], param["name"]): f"--param {param['name']}={_shown(param['default'])}"
        for entry in listing
        for param in entry.get("parameters", ())
    }
    width = max(map(len, settings.values()), default=0)
    for entry in listing:
        if "error" in entry:
            print(f"{entry['name']:12} BROKEN: {entry['error']}")
            continue
        print(f"{entry['name']:12} {entry['id']}  {entry['summary']}")
        for param in entry["parameters"]:
            print(f"{'':14}{settings[entry['name'], param['name']]:{width}}  {param['help']}")
    return 0


def _shown(default: object) -> str:
    """A parameter's default as one would type it: large integers (IDs, masks, sizes) in hex."""
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, int) and default >= 0x10000:
        return hex(default)
    return str(default)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from vdev import inspect as inspection
    from vdev.client import ServerDisconnected, VfioUserError

    if args.timeout <= 0:
        raise UsageError(f"--timeout must be positive, not {args.timeout}")

    async def gather() -> inspection.Report:
        with trio.fail_after(args.timeout):
            return await inspection.gather(args.socket)

    try:
        report = trio.run(gather)
    except (OSError, ServerDisconnected, VfioUserError) as exc:
        print(f"vdev: error: cannot inspect {args.socket}: {exc}", file=sys.stderr)
        return 1
    except trio.TooSlowError:
        attached, waiting = inspection.holders(args.socket)
        held = ", ".join(str(peer) for peer in attached) or "no client this user can see (is the server stuck?)"
        queue = f"; {waiting} more client(s) waiting" if waiting else ""
        print(
            f"vdev: error: {args.socket} did not answer within {args.timeout:g} s: a vfio-user server serves one"
            f" client at a time, and it is held by {held}{queue}",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(inspection.as_json(report), indent=2))
    else:
        print(inspection.as_text(report))
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    checks = doctor.run_checks()
    if args.json:
        print(json.dumps(doctor.as_json(checks), indent=2))
    else:
        print(doctor.as_text(checks))
    return 0 if doctor.usable(checks) else 1


def _cmd_proxy(args: argparse.Namespace) -> int:
    import signal

    from vdev.proxy import Proxy, WireFaultPlan, WireFaultPlanError

    plan = None
    if args.wire_faults:
        try:
            plan = WireFaultPlan.load(args.wire_faults)
        except WireFaultPlanError as exc:
            raise UsageError(str(exc)) from None
    if sockets.same_socket(args.listen, args.connect):
        raise UsageError(f"--listen and --connect are the same socket ({args.listen})")
    _check_socket_path(args.listen)
    outputs: list[IO[str]] = []
    try:
        transcript = _open_output(args.record, "transcript") if args.record else None
        if transcript is not None:
            outputs.append(transcript)
        fault_log: IO[str] = sys.stderr
        if args.fault_log and args.fault_log != "-":
            fault_log = _open_output(args.fault_log, "fault log", "a")
            outputs.append(fault_log)
    except UsageError:
        for output in outputs:
            output.close()
        raise
    proxy = Proxy(args.listen, args.connect, plan=plan, transcript=transcript, fault_log=fault_log)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve)
            rules = len(plan.rules) if plan is not None else 0
            print(
                f"vdev: proxying {args.listen} -> {args.connect} ({rules} fault rule(s)"
                f"{', recording to ' + args.record if args.record else ''})",
                file=sys.stderr,
                flush=True,
            )
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(run)
    except BaseException as exc:
        failure = _single(exc)
        if not isinstance(failure, (OSError, sockets.SocketPathError)):
            raise
        print(f"vdev: error: proxy {args.listen} -> {args.connect}: {failure}", file=sys.stderr)
        return 1
    finally:
        for output in outputs:
            output.close()
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from vdev.proxy import TranscriptError, load_transcript, replay

    try:
        records = load_transcript(args.transcript)
    except TranscriptError as exc:
        raise UsageError(str(exc)) from None
    if not records:
        raise UsageError(f"{args.transcript} holds no messages")
    if args.timeout <= 0:
        raise UsageError(f"--timeout must be positive, not {args.timeout}")
    run = functools.partial(
        replay, records, args.socket_path, reply_timeout=args.timeout, ignore=args.ignore, pace=args.pace
    )
    try:
        result = trio.run(run)
    except OSError as exc:
        print(f"vdev: error: cannot replay against {args.socket_path}: {exc}", file=sys.stderr)
        return 1
    if result.divergence is not None:
        print(f"divergence at {result.divergence}")
        return 1
    print(
        f"replayed {result.sent} message(s), compared {result.compared} answer(s) "
        f"over {result.connections} connection(s): no divergence"
    )
    return 0


class _DeviceAction(argparse.Action):
    """``--device NAME``: a new entry ``[NAME, [params]]`` in ``devices``."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        namespace.devices = [*getattr(namespace, "devices", []), (values, [])]


class _ParamAction(argparse.Action):
    """``--param NAME=VALUE``: a parameter of the ``--device`` before it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        devices = getattr(namespace, "devices", [])
        if not devices:
            parser.error("--param must follow the --device it belongs to")
        devices[-1][1].append(values)


def _cmd_guest(args: argparse.Namespace) -> int:
    from vdev.guest import GuestSetupError, ModuleBuildError, run_on_terminal

    devices: list[Device] = []
    for index, (reference, pairs) in enumerate(args.devices):
        try:
            device_class = plugins.load(reference)
        except plugins.PluginError as exc:
            raise UsageError(str(exc)) from None
        params = _parse_params(device_class, pairs)
        try:
            devices.append(device_class(name=f"{reference.rpartition(':')[2].lower()}{index}", **params))
        except (TypeError, ValueError) as exc:
            raise UsageError(f"cannot create {reference}: {exc}") from None
    if args.memory <= 0 or args.smp <= 0:
        raise UsageError("--memory and --smp must be positive")
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError(f"--timeout must be positive, not {args.timeout}")
    timeout = args.timeout if args.timeout is not None else (600.0 if args.run is not None else None)
    try:
        return run_on_terminal(
            kernel=args.kernel,
            command=args.run,
            devices=devices,
            sockets=args.socket,
            vfio=args.vfio,
            patch=args.patch,
            copies=args.copy,
            memory_mib=args.memory,
            smp=args.smp,
            timeout=timeout,
            append=args.append,
            workdir=args.workdir,
        )
    except (ModuleBuildError, LibraryError, ServeError) as exc:
        print(f"vdev: error: {exc}", file=sys.stderr)
        return 1
    except GuestSetupError as exc:  # a kernel, socket or file named on the command line that is not there
        raise UsageError(str(exc)) from None
    finally:
        for device in devices:
            device.close()


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="vdev", description="Emulated PCI devices served over vfio-user.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: libvfio-user debug)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    serve_parser = commands.add_parser("serve", help="serve a device on a vfio-user socket")
    serve_parser.add_argument("device", help="a device name (see `vdev devices`) or module:Class")
    listen = serve_parser.add_mutually_exclusive_group()
    listen.add_argument("--socket-path", help="where to listen for a vfio-user client")
    listen.add_argument(
        "--fd", type=int, metavar="N", help="serve on listening socket N, inherited from the parent process"
    )
    serve_parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="device parameter")
    serve_parser.add_argument("--name", help="the device's name in logs and traces")
    serve_parser.add_argument("--trace", metavar="FILE", help="write every device event as a JSON line ('-': stdout)")
    serve_parser.add_argument(
        "--device-faults",
        metavar="PLAN",
        help="make the device misbehave as a device-fault plan says (JSON or TOML; rules keyed 'on')",
    )
    serve_parser.add_argument(
        "--allow-uid", type=int, action="append", metavar="UID", help="accept clients of this uid only (repeatable)"
    )
    serve_parser.set_defaults(handler=_cmd_serve)

    devices_parser = commands.add_parser("devices", help="list installed devices and their parameters")
    devices_parser.add_argument("--json", action="store_true")
    devices_parser.set_defaults(handler=_cmd_devices)

    inspect_parser = commands.add_parser("inspect", help="connect to a vfio-user server and describe its device")
    inspect_parser.add_argument("socket", help="the server's socket path")
    inspect_parser.add_argument("--json", action="store_true")
    inspect_parser.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECONDS", help="give up if the server has not answered by then"
    )
    inspect_parser.set_defaults(handler=_cmd_inspect)

    doctor_parser = commands.add_parser("doctor", help="check that libvfio-user and QEMU are usable")
    doctor_parser.add_argument("--json", action="store_true")
    doctor_parser.set_defaults(handler=_cmd_doctor)

    proxy_parser = commands.add_parser(
        "proxy", help="relay a vfio-user client to a server, injecting faults and recording the session"
    )
    proxy_parser.add_argument("--listen", required=True, metavar="PATH", help="socket the client connects to")
    proxy_parser.add_argument("--connect", required=True, metavar="PATH", help="socket of the real server")
    proxy_parser.add_argument(
        "--wire-faults",
        metavar="PLAN",
        help="tamper with messages as a wire-fault plan says (JSON/TOML, rules keyed 'fault'; docs/record-replay.md)",
    )
    proxy_parser.add_argument("--record", metavar="FILE", help="write every message as a JSON line (a transcript)")
    proxy_parser.add_argument(
        "--fault-log", metavar="FILE", help="append a JSON line per injected fault here (default: stderr)"
    )
    proxy_parser.set_defaults(handler=_cmd_proxy)

    replay_parser = commands.add_parser(
        "replay", help="play a transcript's client side against a server and report the first divergence"
    )
    replay_parser.add_argument("transcript", help="a transcript written by `vdev proxy --record`")
    replay_parser.add_argument("--socket-path", required=True, help="the server to replay against")
    replay_parser.add_argument(
        "--timeout", type=float, default=5.0, metavar="SECONDS", help="wait this long for each expected message"
    )
    replay_parser.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="FIELD",
        help="leave a field out of the comparison, e.g. payload.data or REGION_READ:payload.data (repeatable)",
    )
    replay_parser.add_argument(
        "--pace", action="store_true", help="send each client message at its recorded time, not as fast as possible"
    )
    replay_parser.set_defaults(handler=_cmd_replay)

    guest_parser = commands.add_parser(
        "guest", help="boot a Linux guest with devices attached; run a command in it, or get its console"
    )
    guest_parser.add_argument(
        "--kernel",
        default="bookworm",
        metavar="NAME|PATH",
        help="a kernel set of `make guest` (bookworm, trixie, ...), or a path (with a /) to your own build: "
        "a kernel build tree, or a directory with a kernel image and lib/modules/<release>",
    )
    guest_parser.add_argument(
        "--device",
        action=_DeviceAction,
        default=[],
        dest="devices",
        metavar="DEVICE",
        help="serve a device here and attach it (a name from `vdev devices` or module:Class; repeatable)",
    )
    guest_parser.add_argument(
        "--param",
        action=_ParamAction,
        dest="devices",
        metavar="NAME=VALUE",
        help="a parameter of the --device before it",
    )
    guest_parser.add_argument(
        "--socket", action="append", default=[], type=Path, metavar="PATH", help="attach an external vfio-user server"
    )
    guest_parser.add_argument("--vfio", action="store_true", help="bind the attached devices to vfio-pci in the guest")
    guest_parser.add_argument(
        "--run", metavar="CMD", help="run CMD under /bin/sh in the guest; exit with its status (default: a console)"
    )
    guest_parser.add_argument(
        "--copy",
        action="append",
        default=[],
        metavar="HOST[:GUEST]",
        help="put a file or directory into the guest (default: /root/<name>; repeatable)",
    )
    guest_parser.add_argument(
        "--patch",
        type=Path,
        metavar="FILE.diff",
        help="rebuild the modules this kernel patch (-p1) touches from Debian's source and load them instead",
    )
    guest_parser.add_argument("--memory", type=int, default=256, metavar="MiB", help="guest RAM (default 256)")
    guest_parser.add_argument("--smp", type=int, default=1, metavar="N", help="vCPUs (default 1)")
    guest_parser.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="end the guest after this long (default: 600 with --run)"
    )
    guest_parser.add_argument("--append", default="", metavar="WORDS", help="more kernel command-line words")
    guest_parser.add_argument(
        "--workdir", type=Path, metavar="DIR", help="where the console log goes (default: a new temporary directory)"
    )
    guest_parser.set_defaults(handler=_cmd_guest)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")
        return int(args.handler(args))
    except UsageError as exc:
        print(f"vdev: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
