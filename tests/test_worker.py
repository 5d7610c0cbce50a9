"""Set-up of Spark's Python workers: zip archives on the path are not re-read at every task."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path
from typing import Any


def test_a_prepared_worker_keeps_zip_directories_and_still_imports_from_zips(spark: Any, tmp_path: Path) -> None:
    import pandas as pd

    archive = tmp_path / "late.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("late_module_for_test.py", "VALUE = 41\n")

    def probe(batches: Any) -> Any:
        import importlib
        import sys
        import zipimport

        from image_embeddings.worker import prepare_worker

        for _ in batches:
            prepare_worker()
            prepare_worker()  # idempotent
            sys.path.insert(0, str(archive))  # an archive that appears after the worker was prepared
            importlib.invalidate_caches()  # what Spark's worker calls at every task
            module = importlib.import_module("late_module_for_test")
            name = zipimport.zipimporter.invalidate_caches.__name__
            yield pd.DataFrame({"method": [name], "value": [module.VALUE + 1]})

    rows = spark.range(0, 2, 1, 2).mapInPandas(probe, "method STRING, value INT").collect()
    expected = "_keep_directory" if (3, 10) <= sys.version_info < (3, 13) else "invalidate_caches"
    assert [(r.method, r.value) for r in rows] == [(expected, 42)] * 2


def test_jars_without_python_code_are_off_the_python_path(spark: Any) -> None:
    import pandas as pd

    includes = spark.sparkContext._python_includes
    assert any("delta-spark" in name for name in includes)  # it carries the `delta` Python package
    assert not any("awssdk_bundle" in name or "hadoop-aws" in name for name in includes)

    def probe(batches: Any) -> Any:
        import sys

        for _ in batches:
            jars = [p.rsplit("/", 1)[-1] for p in sys.path if p.endswith(".jar") and "userFiles" in p]
            yield pd.DataFrame({"jars": [",".join(sorted(jars))], "delta": [__import__("delta").__name__]})

    rows = spark.range(0, 1, 1, 1).mapInPandas(probe, "jars STRING, delta STRING").collect()
    assert [r.delta for r in rows] == ["delta"]
    assert all("delta-spark" in name for name in rows[0].jars.split(",")), rows[0].jars
    assert "awssdk" not in " ".join(sys.path)
