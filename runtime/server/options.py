"""How the HTTP layer behaves beyond the request limits (a1111.Limits); importable without FastAPI."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InvalidRequestError


@dataclass(frozen=True)
class ServerOptions:
    """A1111's --cors-allow-origins (comma-separated) and --cors-allow-origins-regex, the read timeout of a request
    body, and the prompt styles /sdapi/v1/prompt-styles lists (each {name, prompt, negative_prompt})."""

    cors_allow_origins: tuple[str, ...] = ()
    cors_allow_origins_regex: str | None = None
    read_timeout: float = 30.0  # seconds a request body may stall between two chunks before a 408
    styles: tuple[dict, ...] = ()

    def __post_init__(self):
        if isinstance(self.read_timeout, bool) or not isinstance(self.read_timeout, (int, float)):
            raise InvalidRequestError(f"the read timeout must be a number of seconds, not {self.read_timeout!r}")
        if not self.read_timeout > 0:
            raise InvalidRequestError(f"the read timeout must be more than 0 seconds, not {self.read_timeout}")
        if self.cors_allow_origins_regex is not None:
            try:
                re.compile(self.cors_allow_origins_regex)
            except re.error as exc:
                raise InvalidRequestError(f"the CORS origin regex {self.cors_allow_origins_regex!r}: {exc}") from None
        if isinstance(self.cors_allow_origins, str):
            origins = tuple(o.strip() for o in self.cors_allow_origins.split(",") if o.strip())
            object.__setattr__(self, "cors_allow_origins", origins)
        else:
            object.__setattr__(self, "cors_allow_origins", tuple(self.cors_allow_origins))
        object.__setattr__(self, "styles", tuple(dict(style) for style in self.styles))
