"""The GPU pack (benchmarks/pack.py), built without the network: size, the float16 round trip of the
bundled backbone, and the unpacked folder (model package, data, launcher)."""

import importlib.resources

import pytest
import torch
from safetensors.torch import load_file

from conftest import load_benchmark


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pack = load_benchmark("pack")
    root = tmp_path_factory.mktemp("pack")
    data = root / "shared-data"
    (data / "glue" / "RTE").mkdir(parents=True)
    (data / "glue" / "RTE" / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    manifest = pack.build(root / "gpu-pack", data, wheels=False)
    return pack, root, manifest


def test_the_pack_fits_and_holds_a_float16_model(built):
    pack, root, manifest = built
    assert manifest["total_bytes"] <= pack.LIMIT_BYTES
    original = load_file(str(importlib.resources.files(pack.PACKAGE) / "model" / "model.safetensors"))
    half = load_file(str(root / "gpu-pack" / "model" / "model.safetensors"))
    assert set(half) == set(original)
    assert all(v.dtype == torch.float16 for k, v in half.items() if original[k].is_floating_point())
    assert 40e6 < manifest["files"]["model/model.safetensors"]["bytes"] < 50e6  # half of float32's 91 MB


def test_unpack_upcasts_and_the_model_answers_as_the_original(built):
    pack, root, _ = built
    into = root / "local"
    pack.unpack(root / "gpu-pack", into)
    upcast = load_file(str(into / pack.PACKAGE / "model" / "model.safetensors"))
    half = load_file(str(root / "gpu-pack" / "model" / "model.safetensors"))
    assert all(torch.equal(upcast[k], half[k].float()) for k in half if half[k].is_floating_point())
    assert (into / pack.PACKAGE / "__init__.py").is_file() and (into / pack.PACKAGE / "model" / "vocab.txt").is_file()
    assert (into / "data" / "glue" / "RTE" / "train.tsv").read_text().endswith("entailment\n")
    assert "-m eptkit.cli" in (into / "bin" / "eptkit").read_text()
    # Features of the upcast model within float16 rounding of the original's (and not identical to them).
    assert 0 < pack.verify(root / "gpu-pack") < 5e-3


def test_unpack_refuses_a_corrupted_pack(built, tmp_path):
    pack, root, _ = built
    import shutil

    copy = tmp_path / "pack"
    shutil.copytree(root / "gpu-pack", copy)
    with open(copy / "data.tar.xz", "ab") as f:
        f.write(b"x")
    with pytest.raises(SystemExit, match="corrupted"):
        pack.unpack(copy, tmp_path / "local")
