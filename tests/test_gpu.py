"""On one CUDA GPU, the shipped GPU settings (configs/ml1m-gpu.yaml) on tiny data and the embedded models: a vLLM
replica per GPU in bf16 on Ray Data, the re-ranker trained on the GPU under Ray Train, DPO under Ray Train with
DeepSpeed ZeRO-3 in bf16 (full fine-tune), the Serve application with its re-ranker on the GPU, and one round of
the loop that chains them. Skipped without CUDA (conftest.py); benchmarks/gpu_smoke.sh runs them.

Mirrors the CPU tests (test_online, test_generate, test_train, test_dpo, test_serve, test_ray_head's pipeline job).
Every test takes the GPU config's sections, shrinks the sizes (users, samples, tokens, epochs, steps) and says
where it changes anything else.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import yaml
from raytools import free_port
from synthetic import NUM_ITEMS, write_dataset
from test_dpo import _pair_logratio, make_pairs

from rlrf4rec.core import assets
from rlrf4rec.core import engines as E
from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import read_marker, read_parquet, write_parquet
from rlrf4rec.core.config import RunConfig, from_dict
from rlrf4rec.serving import online
from rlrf4rec.stages import generate as G

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
GPU_CONFIG = ROOT / "configs" / "ml1m-gpu.yaml"
GENRE_A = [str(i) for i in range(1, NUM_ITEMS // 2 + 1)]
GENRE_B = [str(i) for i in range(NUM_ITEMS // 2 + 1, NUM_ITEMS + 1)]
CANDIDATES = GENRE_A[:10] + GENRE_B[:10]


def tiny_gpu_config(tmp_path: Path, asset_home: Path, **sections: dict) -> RunConfig:
    """configs/ml1m-gpu.yaml on 40 synthetic users and the embedded SmolLM2 / MiniLM: bf16 vLLM with one replica on
    the one GPU, the re-ranker and ZeRO-3 bf16 DPO on it. `sections` update the named sections afterwards."""
    raw = yaml.safe_load(GPU_CONFIG.read_text())
    write_dataset(tmp_path / "raw", num_users=40, length=24, liked_fraction=0.5)
    raw.update(name="tiny-gpu", run_dir=str(tmp_path / "run"))
    raw["assets"]["home"] = str(asset_home)
    raw["models"].update(llm="embedded:smollm2-135m-instruct", encoder="embedded:all-minilm-l6-v2")
    raw["data"].update(format="parquet", path=str(tmp_path / "raw"))
    # One replica for the one GPU; eager: CUDA graph capture would cost more than a tiny run's generation.
    raw["generate"].update(num_samples=4, max_new_tokens=32, batch_size=16, concurrency=1, enforce_eager=True)
    raw["encode"].update(max_length=64)
    raw["recommender"].update(max_epochs=2, warmup_epochs=1, batch_size=32)
    raw["dpo"].update(max_steps=2, save_steps=2, grad_accum=1, num_workers=1, max_length=768, max_prompt_length=640)
    raw["reward"].update(min_margin=0.0)  # a tiny run keeps every untied best-worst pair
    raw["loop"].update(rounds=1, train_users=16, eval_users=4, bootstrap_samples=100)
    for name, values in sections.items():
        raw[name].update(values)
    return from_dict(RunConfig, raw)


@pytest.fixture(scope="module")
def gpu_ray():
    import ray

    ray.init(num_cpus=min(8, os.cpu_count() or 1), num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _wait_for(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.5)


# --------------------------------------------------------------------------------------------------- serving core


def test_online_reranker_on_the_gpu_scores_as_on_the_cpu(serving_run):
    run, tastes = serving_run
    version = online.resolve_version(run, "latest")
    cpu = online.Reranker(run, version)
    gpu = online.Reranker(run, version, catalog=cpu.catalog, device="cuda")
    for loaded in (gpu.knowledge_model, gpu.id_model):
        assert all(p.is_cuda for p in loaded.ckpt.model.parameters())
    # Both paths (known users, an unknown one), and a list longer than the trained length (windows).
    queries = [online.Query(CANDIDATES, user, []) for user in sorted(tastes)[:16]]
    queries += [online.Query(GENRE_A + GENRE_B, None, ["3"])]
    for on_cpu, on_gpu in zip(cpu.score(queries), gpu.score(queries), strict=True):
        assert on_gpu.model_version == on_cpu.model_version
        np.testing.assert_allclose(on_gpu.scores, on_cpu.scores, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------- serving


# First of the Ray tests: the GPU memory it measures is this process's and the replica's alone.
def test_serve_answers_with_its_reranker_on_the_gpu(gpu_ray, serving_run):
    import httpx
    import ray
    import torch
    from ray import serve

    from rlrf4rec.serving.serve import build_app

    run, tastes = serving_run
    free_before, _ = torch.cuda.mem_get_info()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        app = build_app({"run_dir": str(run), "reranker_gpus": 0.5, "reranker_replicas": 1})  # one replica's memory
        serve.run(app, name="gpu", route_prefix="/")
        _wait_for(lambda: ray.available_resources().get("GPU", 0.0) == 0.5, "half the GPU reserved by the Reranker")
        cpu = online.Reranker(run, online.resolve_version(run, "latest"))
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            for user in sorted(tastes)[:8]:
                r = client.post("/rank", json={"user_id": user, "history": [], "candidates": CANDIDATES})
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["path"] == "knowledge" and body["model_version"] == "round1"
                (expected,) = cpu.score([online.Query(CANDIDATES, user, [])])
                got = {i["item_id"]: i["score"] for i in body["items"]}
                np.testing.assert_allclose([got[c] for c in CANDIDATES], expected.scores, rtol=1e-4, atol=1e-4)
                if user == "u4":  # as test_serve checks on the CPU
                    liked = set(GENRE_A if tastes[user] == 0 else GENRE_B)
                    assert sum(i["item_id"] in liked for i in body["items"][:8]) >= 7

            query = {"user_id": "someone-new", "history": [{"item_id": "3"}], "candidates": CANDIDATES}
            body = client.post("/rank", json=query).json()
            assert (body["path"], body["fallback_reason"], body["model_version"]) == ("fallback", "no_knowledge", "id")
            (expected,) = cpu.score([online.Query(CANDIDATES, "someone-new", ["3"])])
            got = {i["item_id"]: i["score"] for i in body["items"]}
            np.testing.assert_allclose([got[c] for c in CANDIDATES], expected.scores, rtol=1e-4, atol=1e-4)
        # The replica scored on the GPU: its process holds a CUDA context and the models' weights there.
        assert torch.cuda.mem_get_info()[0] < free_before - 100 * 2**20
    finally:
        serve.shutdown()


# --------------------------------------------------------------------------------------------------- generation


class ProbedVLLM:
    """VLLMEngine that writes down, from inside its Ray Data actor, where vLLM runs and in which dtype."""

    def __init__(self, model: str, cfg, record: str):
        import ray
        from vllm.platforms import current_platform

        probe = {"gpu_ids": [str(i) for i in ray.get_gpu_ids()], "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}
        self.engine = E.VLLMEngine(model, cfg)
        probe.update(cuda=current_platform.is_cuda(), dtype=str(self.engine.llm.llm_engine.model_config.dtype))
        Path(record).write_text(json.dumps(probe))

    def generate(self, prompts, seeds):
        return self.engine.generate(prompts, seeds)


def test_vllm_replica_generates_on_its_own_gpu_in_bf16(gpu_ray, asset_home, tmp_path):
    import ray
    from ray import cloudpickle

    from rlrf4rec.stages.data import run_data

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actor cannot import this test module
    cfg = tiny_gpu_config(tmp_path, asset_home)
    data_dir = run_data(cfg)
    record = tmp_path / "engine.json"
    model = assets.resolve(cfg.models.llm, asset_home)
    stage = G.run_generate(cfg, make_engine=partial(ProbedVLLM, model, cfg.generate, str(record)))

    probe = json.loads(record.read_text())
    assert probe["cuda"] and probe["dtype"] == "torch.bfloat16"
    assert len(probe["gpu_ids"]) == 1 and probe["visible"] == probe["gpu_ids"][0]  # Ray's GPU, and only it
    _wait_for(lambda: ray.available_resources().get("GPU", 0.0) == 1.0, "the replica's GPU back")  # for the next stage
    gens = read_parquet(stage / "generations.parquet", S.GENERATIONS)
    assert read_parquet(stage / "generation_errors.parquet").num_rows == 0
    sequences = read_parquet(data_dir / "sequences.parquet", S.SEQUENCES).to_pylist()
    users = sorted(r[S.USER_ID] for r in sequences if r[S.SPLIT] in cfg.generate.splits)
    assert G.keys(gens) == [(u, k) for u in users for k in range(cfg.generate.num_samples)]  # N rows per user
    for row in gens.to_pylist():
        assert row[S.PREFERENCE_TEXT] and 0 < row[S.COMPLETION_TOKENS] <= cfg.generate.max_new_tokens


# --------------------------------------------------------------------------------------------------- recommender


def test_recommender_trains_on_the_gpu_as_on_the_cpu(gpu_ray, asset_home, tmp_path):
    import torch

    from rlrf4rec.core.recommender import fit, model_spec
    from rlrf4rec.stages.data import run_data
    from rlrf4rec.stages.train import build, run_recommender

    # No dropout: CPU and GPU draw different masks; everything else is the same arithmetic up to rounding.
    cfg = tiny_gpu_config(
        tmp_path, asset_home, recommender={"max_epochs": 3, "patience": 10, "dropout": 0.0}, knowledge={"item": "none"}
    )
    assert cfg.recommender.use_gpu and cfg.recommender.num_workers == 1
    data_dir = run_data(cfg)
    stage = run_recommender(cfg, "id", data_dir, None)
    stats = read_marker(stage)["stats"]
    history = json.loads((stage / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2] and stats["resumed_after"] == []
    assert 0.0 <= stats["valid/ndcg@5"] <= 1.0 and (stage / "model.pt").is_file()

    # The worker's model lived on the GPU: its checkpoints hold CUDA tensors (loaded without map_location).
    checkpoints = sorted((cfg.run_path / "ray_train").rglob("state.pt"))
    assert checkpoints
    saved = torch.load(checkpoints[-1], weights_only=False)
    assert all(t.is_cuda for t in saved["model"].values())

    # The same model trained on the CPU in this process: same seed, same data order, same AdamW.
    task, knowledge, model = build(data_dir, None, model_spec(cfg.recommender), cfg.seed)
    reference = fit(task, model, knowledge, seed=cfg.seed)
    for on_cpu, on_gpu in zip(reference.history, history, strict=True):
        assert on_gpu["train/loss"] == pytest.approx(on_cpu["train/loss"], rel=1e-3)
        assert on_gpu["valid/ndcg@5"] == pytest.approx(on_cpu["valid/ndcg@5"], abs=0.02)


# --------------------------------------------------------------------------------------------------- DPO


def test_dpo_zero3_bf16_full_fine_tune_under_ray_train(gpu_ray, asset_home, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlrf4rec.stages.dpo import run_dpo

    dpo = {
        "beta": 0.1, "lr": 2e-4, "per_device_batch_size": 2, "max_steps": 3, "save_steps": 3,
        "max_length": 96, "max_prompt_length": 80, "eval_fraction": 0.25,
    }  # fmt: skip
    cfg = tiny_gpu_config(tmp_path, asset_home, dpo=dpo)
    d = cfg.dpo
    assert (d.deepspeed, d.bf16, d.lora, d.use_gpu, d.gradient_checkpointing) == ("zero3", True, False, True, True)
    pairs = tmp_path / "pairs.parquet"
    write_parquet(make_pairs(), pairs, S.PAIRS)
    policy = assets.asset_dir("smollm2-135m-instruct", asset_home)
    stage = run_dpo(cfg, pairs, policy, "round0")

    stats = read_marker(stage)["stats"]
    assert (stats["pairs/train"], stats["pairs/eval"], stats["steps"]) == (6, 2, 3)
    assert stats["on_ray"] and stats["checkpoint_deepspeed_shards"] and not stats["checkpoint_adapter"]
    assert stats["train/dpo_loss_first"] == pytest.approx(math.log(2), abs=0.02)  # policy == reference, bf16
    assert stats["train/dpo_loss_last"] < stats["train/dpo_loss_first"]
    assert stats["eval/rewards/margins"] > 0

    # ZeRO-3 gathered the 16-bit weights at save: bf16, and a full fine-tune moved the MLPs too, not only attention.
    base = load_file(policy / "model.safetensors")
    tuned = {k: v for f in sorted((stage / "model").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert set(base) ^ set(tuned) <= {"lm_head.weight"}  # a tied output layer may be written or left out
    assert {t.dtype for t in tuned.values()} == {torch.bfloat16}
    changed = {k for k in set(base) & set(tuned) if not torch.equal(base[k].to(torch.bfloat16), tuned[k])}
    assert any(".mlp." in k for k in changed) and any(".self_attn." in k for k in changed)

    # It loads as a plain model and prefers the chosen answer more than the base does (both rounded to bf16).
    tokenizer = AutoTokenizer.from_pretrained(stage / "model")
    model = AutoModelForCausalLM.from_pretrained(stage / "model", dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.bfloat16).float().eval()
    pair = make_pairs(1).to_pylist()[0]
    assert _pair_logratio(model, tokenizer, pair) > _pair_logratio(reference, tokenizer, pair)


# --------------------------------------------------------------------------------------------------- GRPO


def test_one_grpo_step_samples_with_colocated_vllm_under_zero3(gpu_ray, asset_home, tmp_path):
    """The GPU config's GRPO (LoRA, ZeRO-3, bf16, vLLM colocated on the worker's GPU), one step of one group on the
    synthetic reward (no re-ranker needed): the completions come from vLLM and the step updates and exports."""
    pytest.importorskip("vllm", reason="TRL's colocated generation needs CUDA vLLM")
    from rlrf4rec.stages.data import run_data
    from rlrf4rec.stages.grpo import run_grpo
    from rlrf4rec.stages.reward import rewarded_train_users

    grpo = {"per_device_batch_size": 4, "grad_accum": 1, "max_steps": 1, "save_steps": 1, "num_workers": 1}
    cfg = tiny_gpu_config(tmp_path, asset_home, grpo=grpo, reward={"metric": "synthetic-genres"})
    g = cfg.grpo
    assert (g.generation, g.deepspeed, g.bf16, g.lora, g.use_gpu) == ("vllm", "zero3", True, True, True)
    run_data(cfg)
    users = rewarded_train_users(cfg)[:4]
    stage = run_grpo(cfg, users, assets.asset_dir("smollm2-135m-instruct", asset_home), "round0", [])
    stats = read_marker(stage)["stats"]
    assert (stats["steps"], stats["num_generations"], stats["on_ray"]) == (1, 4, True)
    assert 0 < stats["train/completions/mean_length_first"] <= 32  # generate.max_new_tokens of the tiny config
    assert "train/reward_first" in stats and "train/kl_first" in stats
    assert (stage / "model" / "config.json").is_file()


# --------------------------------------------------------------------------------------------------- the loop


def test_one_round_of_the_loop_on_one_gpu(gpu_ray, asset_home, tmp_path):
    from rlrf4rec.stages.data import run_data
    from rlrf4rec.stages.encode import run_encode
    from rlrf4rec.stages.loop import run_loop
    from rlrf4rec.stages.train import run_recommender

    # In-sample rewards: cross-fitting trains more re-rankers on the same GPU path the recommender test covers.
    cfg = tiny_gpu_config(tmp_path, asset_home, reward={"cross_fit_folds": 0})
    data_dir = run_data(cfg)
    run_encode(cfg)  # knowledge.user = llm: the base policy's text per train and valid user, on the GPU
    run_recommender(cfg, "base", data_dir, cfg.run_path / "knowledge" / "base" / "user_knowledge.parquet")
    manifest = json.loads((run_loop(cfg) / "manifest.json").read_text())

    (round0,) = manifest["rounds"]
    assert round0["pairs"]["train/pairs"] >= 1
    dpo = round0["dpo"]
    assert dpo["on_ray"] and dpo["steps"] == cfg.dpo.max_steps and dpo["checkpoint_deepspeed_shards"]
    stages = {name: Path(path) for name, path in round0["stages"].items()}
    for name, stage in stages.items():
        if name.startswith("generate"):
            assert read_marker(stage)["stats"]["errors"] == 0, name
    train = read_parquet(stages["generate_train"] / "generations.parquet", S.GENERATIONS)
    users = sorted(set(train.column(S.USER_ID).to_pylist()))
    assert len(users) == cfg.loop.train_users
    assert G.keys(train) == [(u, k) for u in users for k in range(cfg.generate.num_samples)]
    # vLLM loaded the ZeRO-3 bf16 export for the tuned policy's valid texts and its knowledge texts.
    tuned = read_parquet(stages["generate_valid_tuned"] / "generations.parquet", S.GENERATIONS)
    assert set(tuned.column(S.MODEL).to_pylist()) == {round0["policy_out"]}
    assert all(tuned.column(S.PREFERENCE_TEXT).to_pylist())
    sequences = read_parquet(data_dir / "sequences.parquet", S.SEQUENCES).to_pylist()
    train_and_valid = {r[S.USER_ID] for r in sequences if r[S.SPLIT] in ("train", "valid")}
    knowledge = read_parquet(stages["generate_knowledge"] / "generations.parquet", S.GENERATIONS)
    assert set(knowledge.column(S.USER_ID).to_pylist()) == train_and_valid
    valid_users = sum(r[S.SPLIT] == "valid" for r in sequences)
    assert round0["valid_reward"]["users"] == min(cfg.loop.eval_users, valid_users)
    assert 0.0 <= round0["recommender_metrics"]["valid/ndcg@5"] <= 1.0
