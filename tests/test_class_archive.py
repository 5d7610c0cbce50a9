"""The driver JVM's class-data-sharing archive of local sessions: made by one run, adopted and used by the next."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from image_embeddings.core.spark import class_archive_options

SETTINGS = {"spark.jars.packages": "io.delta:delta-spark_2.13:4.0.1",
            "spark.driver.extraJavaOptions": "-XX:TieredStopAtLevel=1"}


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_first_run_dumps_to_a_file_of_its_own_and_a_later_run_adopts_it_once_its_jvm_exited(tmp_path: Path) -> None:
    options, dump = class_archive_options(tmp_path, SETTINGS)
    assert dump is not None and dump.parent == tmp_path and dump.name.endswith(f".{os.getpid()}.tmp")
    assert options == f"-XX:ArchiveClassesAtExit={dump} -Xlog:cds*=off"

    # The JVM is still writing it (its pid is alive: this process stands in for it): not adopted.
    dump.write_bytes(b"\0" * 2048)
    dump.with_name(dump.name + ".jvm").write_text(str(os.getpid()))
    again, second = class_archive_options(tmp_path, SETTINGS)
    assert again.startswith("-XX:ArchiveClassesAtExit=") and second is not None and dump.exists()

    # Once that JVM has exited, the next start renames its dump into place and uses it.
    dump.with_name(dump.name + ".jvm").write_text(str(_dead_pid()))
    used, none = class_archive_options(tmp_path, SETTINGS)
    archive = dump.with_name(dump.name.split(".jsa.")[0] + ".jsa")
    assert none is None and used == f"-XX:SharedArchiveFile={archive} -Xlog:cds*=off"
    assert archive.read_bytes() == b"\0" * 2048
    assert sorted(p.name for p in tmp_path.iterdir()) == [archive.name]


def test_a_second_finished_dump_is_deleted_and_other_setups_get_their_own_archive(tmp_path: Path) -> None:
    _, dump = class_archive_options(tmp_path, SETTINGS)
    assert dump is not None
    archive = dump.with_name(dump.name.split(".jsa.")[0] + ".jsa")
    archive.write_bytes(b"first")
    late = dump.with_name(dump.name.replace(f".{os.getpid()}.", ".1.", 1))
    late.write_bytes(b"second")
    late.with_name(late.name + ".jvm").write_text(str(_dead_pid()))
    used, _ = class_archive_options(tmp_path, SETTINGS)
    assert used.startswith(f"-XX:SharedArchiveFile={archive} ")
    assert sorted(p.name for p in tmp_path.iterdir()) == [archive.name] and archive.read_bytes() == b"first"

    # Another package list or JVM options (another classpath): another archive name, to be made anew.
    other, other_dump = class_archive_options(tmp_path, {**SETTINGS, "spark.jars.packages": "x:y:1"})
    assert other.startswith("-XX:ArchiveClassesAtExit=") and other_dump is not None
    assert other_dump.name.split(".jsa.")[0] != archive.name.removesuffix(".jsa")


def test_an_unusable_folder_means_no_archive_not_a_failure(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert class_archive_options(blocker / "jvm", SETTINGS) == ("", None)
