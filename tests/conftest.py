import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_DIR = os.path.join(REPO_ROOT, "..", "shared", "fixtures", "megatron")
FIXTURE_PREFIX = os.path.join(FIXTURE_DIR, "meg-gpt2-openwebtext_text_document")

if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


@pytest.fixture
def megatron_fixture():
    """Prefix of the Megatron-written test dataset in ../shared/fixtures/megatron (read-only)."""
    if not os.path.exists(FIXTURE_PREFIX + ".idx"):
        pytest.skip(f"Megatron fixture not found at {FIXTURE_DIR} (expected beside the repo)")
    return FIXTURE_PREFIX
