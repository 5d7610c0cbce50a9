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

        from image_embeddings.core.worker import prepare_worker

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


PAGE_FAULTS_PER_IMAGE = """
import resource, sys, threading
from image_embeddings.embed.embedder import Embedder, EmbedderSettings
from image_embeddings.ingest.images import downscale
from image_embeddings.testing.sample import PHOTOS, encode, photo
from image_embeddings.core.worker import prepare_worker

if sys.argv[1] == "prepared":
    prepare_worker()
loaded = []  # in a thread of its own, as stage 1's warm-up loads it
thread = threading.Thread(target=lambda: loaded.append(Embedder(EmbedderSettings("resnet50", "random:3", device="cpu",
                                                                                  threads=1))))
thread.start()
thread.join()
images = [downscale(encode(photo(name))).image for name in PHOTOS[:8]]
for _ in range(6):  # the heap grows over the first batches
    loaded[0].embed(images)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    loaded[0].embed(images)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (3 * len(images)))
"""


def test_a_prepared_worker_embeds_without_touching_fresh_memory_at_every_batch() -> None:
    """With the model loaded in a background thread, glibc's heuristics gave each ResNet50 batch fresh pages
    (about 1,200 page faults per image, 4 to 8% of the embedding's time); a prepared worker reuses freed memory."""
    import subprocess

    def faults(mode: str) -> float:
        done = subprocess.run([sys.executable, "-c", PAGE_FAULTS_PER_IMAGE, mode], capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return float(done.stdout.strip().splitlines()[-1])

    prepared = faults("prepared")  # the unprepared figure is measured only for a failure's message
    assert prepared < 20, (f"{prepared:.0f} page faults per image in a prepared worker "
                           f"({faults('plain'):.0f} unprepared)")
