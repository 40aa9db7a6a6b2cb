"""Compose the Hydra config from overrides (train.py, the tools, tests) and word user errors.

The one composition every entry point shares: `conf/` plus the typed schema of gradcycle/config.py.
`user_error` turns what a user can fix (a ValueError from validate(), a bad override) into one
paragraph; the caller exits with EXIT_USAGE.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

from gradcycle.config import register_configs

EXIT_USAGE = 2  # bad config or data: nothing started, nothing written


def default_conf_dir() -> str:
    return str(Path(__file__).resolve().parents[2] / "conf")


def compose(overrides: list[str], conf_dir: str | None = None, config_name: str = "config"):
    """The same composition as train.py: for tools (plan, export) and tests."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir or default_conf_dir(), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def user_error(exc: BaseException) -> str | None:
    """A one-paragraph message for errors the user can fix; None for internal errors."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, ValueError):
        return str(exc)
    if isinstance(exc, (HydraException, OmegaConfBaseException)):
        text = str(exc).strip().splitlines()
        msg = " ".join(
            line.strip() for line in text if line.strip() and not line.startswith("    ")
        )
        msg = re.sub(r"\s*Config search path:.*", "", msg)
        unknown = re.search(r"Could not override '([^']+)'", msg)
        if unknown:
            return (
                f"unknown config key '{unknown.group(1)}': check its spelling against "
                "conf/config.yaml (every key is typed in gradcycle/config.py)"
            )
        cause = exc.__cause__ or exc.__context__
        if cause is not None and str(cause) not in msg:
            msg += f" ({str(cause).splitlines()[0]})"
        return msg + " - see conf/ for the valid groups and keys"
    return None


def tool_main(prog: str, doc: str, argv: list[str] | None, run: Callable, report: Callable) -> int:
    """The command line of a tool (`python -m gradcycle.prepare|plan`): `--help` prints `doc`;
    otherwise `report(run(cfg))` on the composed overrides. A user error inside `run` is one line
    `prog: error: ...` on stderr and EXIT_USAGE; anything else propagates."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(doc)
        return 0
    try:
        result = run(compose(argv))
    except Exception as e:
        message = user_error(e)
        if message is None:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    report(result)
    return 0
