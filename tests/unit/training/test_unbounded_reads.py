"""docs/faults.md "Waiting for data": with data.num_workers=0 the shards are read in the main process, where a
stalled read of a local file cannot be bounded; the run says so at start (a URL or pipe: read keeps its own bound)."""
from __future__ import annotations

import logging

from trainer.config.schema import DataConfig
from trainer.training.loop import warn_unbounded_reads


def test_num_workers_zero_on_a_local_set_warns_that_a_stalled_read_is_not_bounded(caplog):
    with caplog.at_level(logging.WARNING, logger="trainer"):
        assert warn_unbounded_reads(DataConfig(shards="data/set", num_workers=0))
    assert "data.num_workers>=1" in caplog.text and "data/set" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer"):
        assert not warn_unbounded_reads(DataConfig(shards="data/set", num_workers=1))
        assert not warn_unbounded_reads(DataConfig(shards="s3://bucket/set", num_workers=0))
    assert not caplog.text
