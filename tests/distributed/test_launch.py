"""The harness itself: a failing rank fails the test quickly instead of hanging it."""

from __future__ import annotations

import pytest
from torch.multiprocessing import ProcessRaisedException

from .harness import failing_job, launch


def test_a_failing_rank_fails_the_launch(tmp_path):
    with pytest.raises(ProcessRaisedException, match="rank 1 fails on purpose"):
        launch(failing_job, tmp_path, timeout=120)
