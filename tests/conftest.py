import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_DIR = os.path.join(REPO_ROOT, "..", "shared", "fixtures", "megatron")
FIXTURE_PREFIX = os.path.join(FIXTURE_DIR, "meg-gpt2-openwebtext_text_document")

if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import collective_guard  # noqa: E402

collective_guard.install()  # this process's collectives; tests/launch.py: the launched ones'


SHARED_FIXTURES = os.path.join(REPO_ROOT, "..", "shared", "fixtures")


def shared_fixture(*parts: str) -> str:
    """The path of a file under ../shared/fixtures (read-only, beside the repository), or: a skip
    with the reason for a user who has none, and a failure under CI=true, where a missing
    fixture means the tests that need it did not run."""
    path = os.path.normpath(os.path.join(SHARED_FIXTURES, *parts))
    if not os.path.exists(path):
        message = (f"shared test fixture {path} not found (../shared/fixtures beside the "
                   f"repository)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; with CI=true a missing fixture is a failure", pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture
def megatron_fixture():
    """Prefix of the Megatron-written test dataset in ../shared/fixtures/megatron (read-only)."""
    shared_fixture("megatron", os.path.basename(FIXTURE_PREFIX) + ".bin")
    return shared_fixture("megatron", os.path.basename(FIXTURE_PREFIX) + ".idx")[:-len(".idx")]


from launch import kill_process_tree  # noqa: E402,F401 (one copy, in tests/launch.py)
