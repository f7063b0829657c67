"""The precision controller: one object per compiled model that holds every site's precisions.

Sites read their precision from it at run time through the graph's precision-control nodes, so
schedules (static, PFQ, cyclic, DFQ gates) only ever talk to this object.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator
from typing import Any

from ..config import check_bits
from ..errors import ConfigError
from ..ops.spec import Precision

STATE_VERSION = 1


class PrecisionController:
    """Current :class:`Precision` of each site, settable globally, by fnmatch pattern or per site.

    >>> ctrl.set(a=4, w=4, g=8)            # every site
    >>> ctrl.set("layer3.*", a=6)          # sites whose name matches the pattern
    >>> ctrl["layer1.0.conv1"]             # Precision(a=4, w=4, g=8)
    """

    def __init__(self, sites: Iterable[str], default: Precision = Precision(8, 8, 8)):
        self._prec: dict[str, Precision] = {name: Precision(*default) for name in sites}

    # -- reading ----------------------------------------------------------------------------------
    @property
    def sites(self) -> list[str]:
        return list(self._prec)

    def __getitem__(self, site: str) -> Precision:
        try:
            return self._prec[site]
        except KeyError:
            raise KeyError(f"no site named {site!r}; sites are: {', '.join(self._prec)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._prec)

    def __len__(self) -> int:
        return len(self._prec)

    def items(self):
        return self._prec.items()

    def __repr__(self) -> str:
        distinct = sorted({str(p) for p in self._prec.values()})
        return f"PrecisionController({len(self)} sites, a/w/g in {{{', '.join(distinct)}}})"

    # -- writing ----------------------------------------------------------------------------------
    def match(self, pattern: str) -> list[str]:
        """Site names equal to ``pattern`` or matching it as an fnmatch pattern."""
        if pattern in self._prec:
            return [pattern]
        return [s for s in self._prec if fnmatch.fnmatchcase(s, pattern)]

    def set(
        self, pattern: str | None = None, *, a: int | None = None, w: int | None = None, g: int | None = None
    ) -> list[str]:
        """Set the given precisions on every site (``pattern=None``) or on the sites matching
        ``pattern``; fields left ``None`` keep their value. Returns the names changed."""
        changes = {k: check_bits(k, v) for k, v in (("a", a), ("w", w), ("g", g)) if v is not None}
        names = self.sites if pattern is None else self.match(pattern)
        if pattern is not None and not names:
            raise ConfigError(f"pattern {pattern!r} matches no site; sites are: {', '.join(self._prec)}")
        for name in names:
            self._prec[name] = self._prec[name]._replace(**changes)
        return names

    def set_site(self, site: str, prec: Precision | tuple[int, int, int]) -> None:
        if site not in self._prec:
            raise ConfigError(f"no site named {site!r}; sites are: {', '.join(self._prec)}")
        a, w, g = prec
        self._prec[site] = Precision(check_bits("a", a), check_bits("w", w), check_bits("g", g))

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "sites": {s: list(p) for s, p in self._prec.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ConfigError(
                f"precision state version {state.get('version')!r} is not supported "
                f"(expected {STATE_VERSION})"
            )
        sites = state["sites"]
        if set(sites) != set(self._prec):
            missing = sorted(set(self._prec) - set(sites))
            extra = sorted(set(sites) - set(self._prec))
            raise ConfigError(
                f"precision state does not match this model's sites "
                f"(missing: {missing or 'none'}; unknown: {extra or 'none'})"
            )
        checked = {}
        for name, prec in sites.items():  # validate everything before changing anything
            a, w, g = prec
            checked[name] = Precision(check_bits("a", a), check_bits("w", w), check_bits("g", g))
        self._prec.update(checked)
