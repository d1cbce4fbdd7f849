"""A checkpoint handed to a Ray Train loop as bytes (teacher.resume_from) is written where and as the loop's own
are named, so that the attempt counter reads its kimg (the real run: tests/integration/test_pipeline.py)."""

from pathlib import Path

from orchestrator.stages.reporting import given_checkpoint


def test_a_given_checkpoint_is_written_under_the_name_its_kimg_is_read_from(tmp_path):
    path = given_checkpoint(tmp_path, b"bytes", 1234.5)
    assert Path(path).read_bytes() == b"bytes" and Path(path).parent != tmp_path  # apart from the loop's own
    assert float(Path(path).stem.split("-", 1)[1]) == 1234.5  # as count_attempt reads it
