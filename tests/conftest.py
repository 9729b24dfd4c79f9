"""Shared fixtures. Real faces are read from ../shared/data/faces (never copied into the repo)."""
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ../shared/data/faces beside the checkout (as on developer machines and in CI); IDGUARD_FACES
# names another copy of the same folder.
SHARED_FACES = os.environ.get("IDGUARD_FACES") or os.path.normpath(
    os.path.join(REPO, "..", "shared", "data", "faces"))


@pytest.fixture(scope="session")
def shared_faces_dir():
    path = os.path.join(SHARED_FACES, "celebahq")
    if not os.path.isdir(path):
        pytest.fail(f"{path}: the shared test faces are missing (expected beside the repo)")
    return path


@pytest.fixture(scope="session")
def shared_photos_dir():
    path = os.path.join(SHARED_FACES, "photos")
    if not os.path.isdir(path):
        pytest.fail(f"{path}: the shared test photos are missing (expected beside the repo)")
    return path
