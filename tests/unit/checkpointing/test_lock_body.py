"""The S3 lock object is data from outside: any body but the program's own shape (a JSON object with a string
holder and a finite expiry in range) is refused as unreadable, in one line naming the object's URL and the
command that removes it; never a traceback, never taken over."""

from __future__ import annotations

import time

import pytest

from brain_trainer.checkpointing import CheckpointError
from brain_trainer.checkpointing.object_store import check_lock_body

URL = "s3://bucket/run/.brain_run.lock"
NOW = time.time()
JUNK = [
    None,
    "a string",
    [1, 2],
    42,
    {},
    {"holder": "run", "expires": None},
    {"holder": "run", "expires": "tomorrow"},
    {"holder": "run", "expires": float("nan")},
    {"holder": "run", "expires": float("inf")},
    {"holder": "run", "expires": 1e300},
    {"holder": "run", "expires": -1},
    {"holder": "run", "expires": True},
    {"holder": "run", "expires": [NOW]},
    {"holder": None, "expires": NOW},
    {"holder": 7, "expires": NOW},
    {"holder": {"a": {"b": []}}, "expires": NOW},
    {"expires": NOW},
    {"holder": "run"},
]


@pytest.mark.parametrize("body", JUNK, ids=repr)
def test_a_lock_body_not_of_the_programs_shape_is_unreadable_in_one_line(body):
    with pytest.raises(CheckpointError) as refused:
        check_lock_body(body, URL)
    line = str(refused.value)
    assert "\n" not in line and line.startswith(f"{URL}: the lock object is unreadable")
    assert f"aws s3 rm {URL}" in line


@pytest.mark.parametrize("expires", [0, NOW - 5, NOW + 120, int(NOW) + 3600])
def test_the_programs_own_lock_bodies_pass(expires):
    check_lock_body({"token": "t", "holder": "run", "host": "h", "pid": 1, "expires": expires}, URL)
