"""The shared test fixtures (../shared/fixtures): a missing one skips the tests that need it,
with the reason, for a user who has none; under CI=true it fails them (a skipped fixture test
in CI would be a test that silently never runs)."""
import pytest

from conftest import shared_fixture


def test_missing_fixture_skips_with_the_reason(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-such-fixture.bin not found"):
        shared_fixture("megatron", "no-such-fixture.bin")


@pytest.mark.parametrize("value", ["true", "TRUE"])
def test_missing_fixture_fails_under_ci(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match="with CI=true a missing fixture is a failure"):
        shared_fixture("megatron", "no-such-fixture.bin")
