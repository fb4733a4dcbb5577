"""Test tools for hosts and for us: a fake upstream with fault injection."""

from __future__ import annotations

from .upstream import FakeUpstream, Fault, UpstreamDropped

__all__ = ["FakeUpstream", "Fault", "UpstreamDropped"]
