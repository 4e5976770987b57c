"""Other tools open a feature store: xarray through the Zarr dimension names, and the README's valid-row
selection with pandas and duckdb (run as written in the README)."""

import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import xarray
import zarr

from tests.conftest import PHOTOS, TINY_TEACHER
from zeroseg.pipeline.build import run_build
from zeroseg.pipeline.options import BuildOptions
from zeroseg.pipeline.store import FeatureStore

README = Path(__file__).parents[1] / "README.md"


def _store_with_a_failed_image(tmp_path: Path) -> Path:
    """A store of 3 photos and a file that is not an image, grown by a second build of 3 more photos."""
    source = tmp_path / "photos"
    source.mkdir()
    for path in PHOTOS[:3]:
        shutil.copy(path, source / path.name)
    (source / "broken.jpg").write_bytes(b"not an image")
    _build(source, tmp_path / "store")
    for path in PHOTOS[3:6]:
        shutil.copy(path, source / path.name)
    _build(source, tmp_path / "store")
    return tmp_path / "store"


def _build(source: Path, store: Path) -> None:
    options = BuildOptions(
        source=str(source), store=str(store), teacher=str(TINY_TEACHER), pretrained="none",
        device="cpu", batch_size=4, image_size=32, shard_size=4, chunk_size=2, store_crops=True,
        max_error_fraction=1.0, progress=False,
    )  # fmt: skip
    run_build(options, log=lambda line: None)


def test_xarray_opens_the_store_and_the_readme_selects_only_valid_rows(tmp_path):
    store_path = _store_with_a_failed_image(tmp_path)
    store = FeatureStore.open(store_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Object at manifest is not recognized as a component of a Zarr hierarchy"
        dataset = xarray.open_zarr(store_path)
        assert zarr.open_group(store_path, mode="r")["features"].shape == store.features.shape == (7, 30, 32)
    assert dataset["features"].dims == ("image", "view", "dim")
    assert dataset["crops"].dims == ("image", "y", "x", "channel")
    assert np.array_equal(dataset["features"].values, store.features[:])

    manifest = store.manifest().to_pylist()
    ok_rows = sorted(record["row"] for record in manifest if record["status"] == "ok")
    assert len(ok_rows) == 6 and len(manifest) == 7
    gap = sorted(set(range(store.features.shape[0])) - set(ok_rows))
    assert gap and not store.features.get_orthogonal_selection((np.array(gap),)).any()  # failed rows are zeros

    (snippet,) = re.findall(r"<!-- valid-rows:.*?-->\n\s*```python\n(.*?)```", README.read_text(), re.S)
    code = "\n".join(line.removeprefix("  ") for line in snippet.splitlines())
    namespace: dict = {}
    exec(code.replace('"/data/zs-store"', repr(str(store_path))), namespace)
    assert namespace["rows"].tolist() == ok_rows
    assert np.array_equal(namespace["valid"], store.features[:][ok_rows])
    assert all(np.abs(view).sum() > 0 for view in namespace["valid"])

    killed = FeatureStore.open(store_path, writable=True)  # a build killed between its resize and its consolidation
    for array in killed.arrays().values():
        array.resize((12, *array.shape[1:]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert xarray.open_zarr(store_path)["features"].shape == (7, 30, 32)  # the last consolidated rows: fewer
        namespace = {}
        exec(code.replace('"/data/zs-store"', repr(str(store_path))), namespace)  # than exist, every committed one
    assert namespace["rows"].tolist() == ok_rows
