"""The settings of a simulated device: a frozen dataclass that builds from a plain dict."""

from __future__ import annotations

import dataclasses
from typing import ClassVar


class DeviceOptions:
    """Mixin for a device's options dataclass; ``device`` names it in error messages."""

    device: ClassVar[str] = "device"

    @classmethod
    def from_dict(cls, options: dict | None):
        """Options from a plain dict (a config's ``feedback_options``); an unknown key is a clear
        error that lists the known ones."""
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"unknown {cls.device} option(s) {', '.join(unknown)}; "
                f"options: {', '.join(sorted(known))}"
            )
        return cls(**options)
