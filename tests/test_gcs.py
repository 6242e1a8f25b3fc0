"""gs:// end to end against a local GCS emulator (gcp-storage-emulator on 127.0.0.1): listing and reading
inputs, output folders and parts, and an engine run that writes to a bucket and resumes there."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from conftest import FIXTURE, FIXTURE_CONFIG, ROOT

from engine.sources import InputError, list_inputs, read_bytes
from engine.storage import Folder, filesystem_for

SCENES = sorted(FIXTURE.glob("scene_00*.jpg"))[:3]


def put(bucket: str, key: str, data: bytes) -> str:
    fs, path = filesystem_for(f"gs://{bucket}/{key}")
    with fs.open_output_stream(path) as out:
        out.write(data)
    return f"gs://{bucket}/{key}"


def test_gcs_prefix_lists_reads_and_carries_captions_like_a_local_folder(tmp_path, gcs_bucket):
    files = {
        "z_root.jpg": SCENES[0].read_bytes(),
        "b/scene_001.jpg": SCENES[1].read_bytes(),
        "b/scene_001.txt": b"alt text beside the image",
        "a/deeper/scene_002.jpg": SCENES[2].read_bytes(),
        "a/notes.md": b"not an image",
        "a/.hidden.jpg": b"hidden",
    }
    for rel, data in files.items():
        (tmp_path / "tree" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "tree" / rel).write_bytes(data)
        put(gcs_bucket, f"tree/{rel}", data)
    local = list_inputs([str(tmp_path / "tree")])
    remote = list_inputs([f"gs://{gcs_bucket}/tree"])
    rel = [i.uri.removeprefix(f"gs://{gcs_bucket}/tree/") for i in remote]
    assert rel == [os.path.relpath(i.uri, tmp_path / "tree") for i in local]  # same images, same order
    assert rel == ["z_root.jpg", "a/deeper/scene_002.jpg", "b/scene_001.jpg"]
    assert [i.siblings for i in remote] == [i.siblings for i in local]
    for item, name in zip(remote, rel, strict=True):
        assert read_bytes(item.path, item.offset, item.size, 1 << 20) == files[name]
    with pytest.raises(InputError, match="does not exist"):
        list_inputs([f"gs://{gcs_bucket}/nothing/here"])


def test_globs_match_folders_that_exist_only_as_object_names(gcs_bucket):
    """`gs://b/sets/*` names the folders under sets/ as a local glob would, though GCS has no folders."""
    for key in ("sets/a/1/x.jpg", "sets/b/y.jpg", "sets/c.jpg", "sets/.hidden/z.jpg", "other/d/w.jpg"):
        put(gcs_bucket, key, SCENES[0].read_bytes())
    uris = [i.uri.removeprefix(f"gs://{gcs_bucket}/") for i in list_inputs([f"gs://{gcs_bucket}/sets/*"])]
    assert uris == ["sets/a/1/x.jpg", "sets/b/y.jpg", "sets/c.jpg"]
    deeper = list_inputs([f"gs://{gcs_bucket}/*/b"])
    assert [i.uri.removeprefix(f"gs://{gcs_bucket}/") for i in deeper] == ["sets/b/y.jpg"]


def test_a_gcs_folder_with_only_nested_objects_is_not_empty(gcs_bucket):
    """pyarrow's GCS shows no sub-folder at one level unless Arrow made it; emptiness must look deeper."""
    put(gcs_bucket, "theirs/2024/photo.jpg", b"someone's data")
    assert not Folder(f"gs://{gcs_bucket}/theirs").is_empty()
    assert Folder(f"gs://{gcs_bucket}/nothing").is_empty()


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_engine_writes_to_a_gcs_bucket_resumes_overwrites_and_refuses_foreign_folders(
    gcs_bucket, gcs_env, engine_env
):
    env = {**engine_env, **gcs_env}
    output = f"gs://{gcs_bucket}/run"
    command = [
        sys.executable,
        str(ROOT / "pipelines" / "rexverse2m.py"),
        "--config",
        str(FIXTURE_CONFIG),
        "--input",
        str(FIXTURE),
        "--limit",
        "8",
        "--quiet",
    ]

    def run(out: str, *extra: str) -> subprocess.CompletedProcess:
        argv = [*command, "--output", out, *extra]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)

    first = run(output)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = Folder(output)
    manifest = json.loads(out.read_text("manifest.json"))
    assert manifest["counts"]["records"] + manifest["counts"]["rejects"] == 8
    shards = out.files("shards", ".tar")
    index = pd.concat(pd.read_parquet(out.open_input(rel)) for rel in out.files("index", ".parquet"))
    assert len(index) == manifest["counts"]["records"] > 0 and shards

    again = run(output)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "run: 0 processed" in again.stdout and out.files("shards", ".tar") == shards

    out.write_text("shards/stray.txt", "left by someone")
    fresh = run(output, "--overwrite")  # deletes the output, nested objects included, then runs again
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert not out.exists("shards/stray.txt") and len(json.loads(out.read_text("manifest.json"))["runs"]) == 1

    put(gcs_bucket, "theirs/2024/photo.jpg", b"someone's data")
    for extra in ((), ("--overwrite",)):
        refused = run(f"gs://{gcs_bucket}/theirs", *extra)
        assert refused.returncode != 0 and "not a Rexverse output" in refused.stderr
    assert Folder(f"gs://{gcs_bucket}/theirs").files(recursive=True) == ["2024/photo.jpg"]
