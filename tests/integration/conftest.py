"""Fixtures of the integration tests that start servers of their own."""

from tests.integration.pgserver import postgres  # noqa: F401  (a fixture)
