"""One answer for location kinds and one form for error texts (no Spark, no S3 server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from image_embeddings.core.backbones import is_weights_spec
from image_embeddings.core.errors import EMPTY, REASONS, as_error, error, error_reason
from image_embeddings.core.uri import is_local, is_s3, local_path, location_problem, qualify, scheme, split_s3


@pytest.mark.parametrize(("location", "kind", "s3", "local"), [
    ("s3://b/k", "s3", True, False), ("S3A://b/k", "s3a", True, False), ("s3n://b/k", "s3n", False, False),
    ("file:///x", "file", False, True), ("file:/x", "file", False, True), ("/x/y", None, False, True),
    ("rel/x", None, False, True), ("dbfs:/mnt/x", "dbfs", False, False), ("hdfs://nn/x", "hdfs", False, False),
])
def test_location_kinds(location: str, kind: str | None, s3: bool, local: bool) -> None:
    assert (scheme(location), is_s3(location), is_local(location)) == (kind, s3, local)


def test_local_paths_and_s3_keys() -> None:
    assert local_path("file:///x/y") == local_path("file:/x/y") == local_path("/x/y") == Path("/x/y")
    assert split_s3("s3a://bucket/a/b.pth") == ("bucket", "a/b.pth")
    with pytest.raises(ValueError, match="not an s3://bucket/key URI"):
        split_s3("s3://bucket")
    with pytest.raises(ValueError, match="not a local path"):
        local_path("s3://b/k")
    assert qualify("s3a://b/p/") == "s3a://b/p" and qualify("file:///x/") == "file:/x"


def test_one_answer_for_s3n_and_file_uris_everywhere() -> None:
    """Config locations and model weights agree: s3n:// is refused with the way out, file:// is a local path."""
    assert location_problem("s3n://bucket/x") == "s3n:// is not supported (Hadoop 3 removed it): use s3a:// or s3://"
    assert not is_weights_spec("s3n://bucket/w.pth")
    assert location_problem("file:///tmp/x") is None and is_weights_spec("file:///tmp/w.pth")
    assert location_problem("s3a://key:secret@bucket/x").startswith("credentials must not be embedded in the URI")
    assert location_problem("ftp://host/x") is not None and not is_weights_spec("ftp://host/w.pth")
    assert location_problem(" ") == "must not be empty"


def test_error_texts_have_one_form() -> None:
    assert EMPTY == "empty: no bytes" and error_reason(EMPTY) == "empty"
    assert error("truncated", "  two\nlines ") == "truncated: two lines"
    assert len(error("decode_error", "x" * 1000)) == 300
    with pytest.raises(ValueError, match="unknown error reason 'oops'"):
        error("oops", "x")
    assert as_error(ValueError("wrong_size: 10x10")) == "wrong_size: 10x10"
    assert as_error(ValueError("no reason here")) == "decode_error: ValueError: no reason here"
    assert as_error(OSError("nothing: known")) == "decode_error: OSError: nothing: known"
    assert error_reason(None) is None and error_reason("too_large: 5 bytes") == "too_large"
    assert set(REASONS) >= {"empty", "not_an_image", "too_large", "too_many_pixels", "truncated", "decode_error",
                            "unreadable", "no_image_id", "wrong_size"}
