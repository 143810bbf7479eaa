"""The dense baseline: every linear runs as it is (the report still lists them)."""
from __future__ import annotations

from wina_fx.passes.find_linears import LinearSite

from .base import Method
from .plan import Plan, row


class Dense(Method):
    name = "dense"
    calibrated = False

    def plan(self, config, sites: list[LinearSite]) -> Plan:
        return Plan({}, [row(site, site.problem or "method is 'dense'", None) for site in sites])
