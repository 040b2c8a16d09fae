"""`python -m tsukimi.colocated` (how `tsukimi up --colocated` starts a colocated worker), configured like every
service by TSUKIMI_* variables."""

from __future__ import annotations

import sys

from pydantic import ValidationError

from tsukimi.colocated.service import main
from tsukimi.common.logs import setup_logging
from tsukimi.common.settings import Settings
from tsukimi.model.resolve import ModelUnavailable, resolve_settings


def _cli() -> int:
    try:
        settings = resolve_settings(Settings(), can_pull=True)
    except ValidationError as exc:
        print(f"tsukimi colocated: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    except ModelUnavailable as exc:
        print(f"tsukimi colocated: {exc}", file=sys.stderr)
        return 2
    setup_logging("colocated", settings.log_level)
    main(settings)
    return 0


sys.exit(_cli())
