"""`modeld`: the daemon (`serve`), `config show`, client verbs for people, and `gateway`.

Client verbs reach the daemon at --addr, else $MODELD_ADDR, else the socket
/run/modeld/modeld.sock if it exists, else 127.0.0.1:50051. Every verb takes
--json. A failed call prints `modeld: CODE: message` and exits 1; a bad
configuration or flag exits 2. With --json, errors are JSON too (`cli.failure`).
"""

import argparse
import gc
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from modeld import __version__
from modeld.errors import ConfigError, RegistryError

# What only some verbs need is imported where they need it: `serve` turns the
# cyclic GC off for its start before most of its imports run (see `main`).
if TYPE_CHECKING:
    from modeld.config import Config


class _Parser(argparse.ArgumentParser):
    """Reports a bad flag as JSON when the command line asked for --json."""

    json_errors = False

    def error(self, message: str) -> Any:
        if self.json_errors:
            from modeld.cli import failure

            sys.exit(failure.usage(f"{self.prog}: {message}").report(as_json=True))
        super().error(message)


def _serve_args(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the daemon in the foreground")
    _config_flags(p)
    p.set_defaults(func=_serve)


def _config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config file (also MODELD_CONFIG)")
    p.add_argument("--listen", action="append", help="address to serve on; repeatable")
    p.add_argument("--state-dir", help="directory of the registry database")
    p.add_argument("--models-dir", help="directory model files are resolved in")
    p.add_argument("--log-level", help="debug, info, warning or error")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    pairs = {
        "listen": args.listen,
        "state_dir": args.state_dir,
        "models_dir": args.models_dir,
        "log_level": args.log_level,
    }
    return {k: v for k, v in pairs.items() if v is not None}


def _load_config(args: argparse.Namespace) -> "Config":
    from modeld import config

    return config.load(args.config, overrides=_overrides(args))


def _serve(args: argparse.Namespace) -> int:
    from modeld.ops import logconfig

    cfg = _load_config(args)
    logconfig.configure(cfg.log_level, cfg.log_format)
    from modeld.supervisor.containment import choose_soon

    # The probe mostly waits on the kernel: it runs while the daemon's modules import.
    containment = choose_soon(cfg.state_dir, cfg.containment, cfg.cgroup_dir)
    from modeld.cli.serve import run

    return run(cfg, containment)


def _config_show(args: argparse.Namespace) -> int:
    from modeld.supervisor.containment import choose

    cfg = _load_config(args)
    data = cfg.to_dict()
    try:
        # What this user on this host would get now: the same probe `serve` runs.
        chosen = choose(cfg.state_dir, cfg.containment, cfg.cgroup_dir)
        in_use = chosen.describe()
        chosen.close()
    except ConfigError as exc:
        in_use = {"mechanism": "none", "why": str(exc)}
    data["containment_in_use"] = in_use
    print(json.dumps(data, indent=2, default=str))
    return 0


def build_parser(daemon_only: bool = False) -> argparse.ArgumentParser:
    """Every verb, or with `daemon_only` just `serve` and `config`: enough to parse their
    command lines, without importing the client verbs and the Python client they run on."""
    parser = _Parser(
        prog="modeld", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"modeld {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    _serve_args(sub)
    cfg = sub.add_parser("config", help="inspect the configuration")
    cfg_sub = cfg.add_subparsers(dest="config_verb", required=True, metavar="VERB")
    show = cfg_sub.add_parser("show", help="print the effective configuration")
    _config_flags(show)
    show.set_defaults(func=_config_show)
    if daemon_only:
        return parser
    from modeld.cli.client import add_client_verbs
    from modeld.cli.gateway import add_gateway_verb

    add_client_verbs(sub)
    add_gateway_verb(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        # The daemon's start makes ~60k objects that live as long as it does (modules,
        # classes, functions); the cyclic GC would scan them again and again while
        # they load (~14 ms of the start). `serve` freezes them once started.
        gc.disable()
    _Parser.json_errors = "--json" in argv
    # A verb's own parser does all the parsing past its name, so `serve` and `config`
    # parse alike without their siblings; sparing the daemon the client's imports.
    daemon_only = argv[:1] in (["serve"], ["config"])
    args = build_parser(daemon_only).parse_args(argv)
    try:
        code: int = args.func(args)
    except (ConfigError, RegistryError) as exc:
        from modeld.cli import failure

        return failure.usage(str(exc)).report(getattr(args, "json", False))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `modeld logs -f | head`: the reader left; exit quietly, as other tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return code


if __name__ == "__main__":
    sys.exit(main())
