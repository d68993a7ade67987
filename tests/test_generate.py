"""The generation stage: requests, seeds, leakage guard, quality flags, resumable shards, errors, both engines."""

from __future__ import annotations

import concurrent.futures
import shutil
import threading
from functools import partial
from pathlib import Path

import pyarrow as pa
import pytest

from rlrf4rec.cli import main
from rlrf4rec.core import engines as E
from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import MARKER, read_marker, read_parquet
from rlrf4rec.core.config import ConfigError, GenerateConfig, RunConfig, from_dict
from rlrf4rec.stages import generate as G
from rlrf4rec.stages.data import run_data

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "recbole"


def render(messages: list[dict[str, str]]) -> str:
    return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"


def synthetic_tables() -> tuple[pa.Table, pa.Table]:
    """Three users of 8 items each; the window is items [1, 4), so SEEN-1..3 may appear and nothing else may."""
    items = pa.Table.from_pylist(
        [{S.ITEM_ID: f"{u}{i}", S.TITLE: f"{'SEEN' if 1 <= i < 4 else 'HIDDEN'}-{u}{i}", S.YEAR: 2000, S.GENRES: []}
         for u in "abcd" for i in range(8)],
        schema=S.ITEMS,
    )  # fmt: skip
    sequences = pa.Table.from_pylist(
        [
            {
                S.USER_ID: user,
                S.SPLIT: split,
                S.ITEM_IDS: [f"{user}{i}" for i in range(8)],
                S.RATINGS: [4.0] * 8,
                S.TIMESTAMPS: list(range(8)),
                S.HISTORY_START: 1,
                S.HISTORY_END: 4,
            }
            for user, split in [("c", "train"), ("a", "train"), ("b", "valid"), ("d", "test")]
        ],
        schema=S.SEQUENCES,
    )
    return sequences, items


def requests(num_samples: int = 3, **cfg) -> pa.Table:
    sequences, items = synthetic_tables()
    return G.build_requests(sequences, items, None, render, GenerateConfig(num_samples=num_samples, **cfg), 7)


class FakeEngine:
    """Deterministic text from the seed; raises for one seed, or interrupts (like a kill) after `kill_after` calls."""

    calls: list[int] = []

    def __init__(self, bad_seed: int | None = None, kill_after: int | None = None):
        self.bad_seed, self.kill_after = bad_seed, kill_after

    def generate(self, prompts, seeds):
        FakeEngine.calls.append(len(prompts))
        if self.kill_after is not None and len(FakeEngine.calls) > self.kill_after:
            raise KeyboardInterrupt
        if self.bad_seed in seeds:
            raise ValueError(f"cannot sample seed {self.bad_seed}")
        return [E.Completion(f"the user likes films number {s} with calm moods", 10, 9, "stop") for s in seeds]


class ThreadEngine(FakeEngine):
    """Records the OS thread it is built on and each thread it generates on."""

    def __init__(self):
        super().__init__()
        self.threads = [threading.get_ident()]

    def generate(self, prompts, seeds):
        self.threads.append(threading.get_ident())
        return super().generate(prompts, seeds)


def test_engine_is_built_and_called_on_one_thread_whatever_thread_calls():
    """A Ray Data actor builds its UDF on one thread and calls it on another; OpenMP keeps a team of workers per
    calling thread, so the engine's CPU work must stay on one thread (vllm_settings.py: 0.5x with two teams)."""
    generate = G.GenerateBatch(ThreadEngine)
    batch = requests(num_samples=2).slice(0, 4)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        outs = [pool.submit(generate, batch).result() for _ in range(3)]
    generate(batch)  # and from this thread
    assert len(set(generate.engine.threads)) == 1 and len(generate.engine.threads) == 5
    assert generate.engine.threads[0] != threading.get_ident()
    assert all(o.column(S.ERROR).null_count == 4 for o in outs)
    bad = G.GenerateBatch(partial(FakeEngine, bad_seed=batch.column(S.SEED)[1].as_py()))(batch)  # row by row too
    assert bad.column(S.ERROR).null_count == 3


META = {S.TEMPERATURE: 1.0, S.TOP_P: 0.95, S.MAX_NEW_TOKENS: 16, S.MODEL: "fake", S.POLICY_VERSION: "base"}


def run(reqs: pa.Table, parts: Path, batch_size: int = 2, **engine) -> dict:
    FakeEngine.calls = []
    G.open_parts(parts, "work-fp")
    return G.generate_missing(
        reqs, parts, partial(G.run_local, make_engine=partial(FakeEngine, **engine), batch_size=batch_size), META
    )


# --------------------------------------------------------------------------------------------------- requests


def test_requests_are_users_times_n_with_unique_keys_in_the_chosen_splits():
    reqs = requests(num_samples=3)
    assert reqs.column_names == G.REQUEST_COLUMNS
    assert G.keys(reqs) == [(u, k) for u in "abc" for k in range(3)]  # sorted by user, test user "d" left out
    assert reqs.column(S.SPLIT).to_pylist() == ["train"] * 3 + ["valid"] * 3 + ["train"] * 3
    assert G.keys(requests(num_samples=2, max_users=2)) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert {u for u, _ in G.keys(requests(splits=("test",)))} == {"d"}


def test_every_sample_of_a_user_shares_one_prompt_with_the_window_only():
    reqs = requests().to_pylist()
    for row in reqs:
        user = row[S.USER_ID]
        for i in range(8):
            assert (f"-{user}{i}" in row[S.PROMPT]) == (1 <= i < 4), (user, i)
        assert "HIDDEN" not in row[S.PROMPT]
    assert len({r[S.PROMPT] for r in reqs}) == 3


def test_seeds_are_deterministic_31_bit_and_distinct_per_user_and_sample():
    reqs = requests(num_samples=5)
    seeds = reqs.column(S.SEED).to_pylist()
    assert seeds == requests(num_samples=5).column(S.SEED).to_pylist()
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**31 for s in seeds)
    assert seeds[0] == G.request_seed(7, "a", 0) != G.request_seed(8, "a", 0)
    assert requests(num_samples=2).column(S.SEED).to_pylist() == [s for s, (_, k) in zip(seeds, G.keys(reqs)) if k < 2]


def test_quality_flags():
    assert G.quality_flags("", "stop") == ["empty"]
    assert G.quality_flags("   ", "length") == ["empty", "truncated"]
    assert G.quality_flags("Likes dark comedies.", "stop") == ["degenerate"]  # under 5 words
    assert G.quality_flags("the the the " * 20, "length") == ["truncated", "degenerate", "off_topic"]
    assert G.quality_flags("I like it a lot " * 6, "stop") == ["degenerate", "off_topic"]
    # Fluent but about nothing the prompt asked for: no factor, no genre.
    assert G.quality_flags("cgv11, Janee Cohen, who lives in Ohio and works at a bank", "stop") == ["off_topic"]
    assert G.quality_flags("Prefers crime novels with a strong author voice", "stop", "products") == []
    assert G.quality_flags("The user enjoys character-driven dramas from the nineties, rates action low.", "stop") == []


# --------------------------------------------------------------------------------------------------- shards


def test_a_killed_run_resumes_with_the_same_keys_and_no_duplicates(tmp_path):
    reqs = requests(num_samples=3)  # 9 requests -> batches of 2
    with pytest.raises(KeyboardInterrupt):
        run(reqs, tmp_path / "parts", kill_after=2)
    assert len(list((tmp_path / "parts").glob("gen-*.parquet"))) == 2
    stats = run(reqs, tmp_path / "parts")
    assert stats["generated_now"] == 5 and FakeEngine.calls == [2, 2, 1]  # only the missing keys
    gens, errs = G.consolidate(tmp_path / "parts", reqs)
    assert G.keys(gens) == G.keys(reqs) and errs.num_rows == 0

    run(reqs, tmp_path / "fresh")
    fresh, _ = G.consolidate(tmp_path / "fresh", reqs)
    assert fresh.to_pylist() == gens.to_pylist()
    assert gens.schema == S.GENERATIONS


def test_consolidate_drops_duplicate_and_unrequested_keys(tmp_path):
    reqs = requests(num_samples=2)
    parts = tmp_path / "parts"
    run(reqs, parts)
    shutil.copy(parts / "gen-000000.parquet", parts / "gen-000099.parquet")
    gens, _ = G.consolidate(parts, reqs)
    assert G.keys(gens) == G.keys(reqs)
    fewer = requests(num_samples=1)
    assert G.keys(G.consolidate(parts, fewer)[0]) == G.keys(fewer)


def test_a_failing_request_goes_to_the_errors_table_and_spares_its_batch(tmp_path):
    reqs = requests(num_samples=3)
    bad_seed = G.request_seed(7, "b", 1)
    stats = run(reqs, tmp_path / "parts", batch_size=3, bad_seed=bad_seed)
    assert stats["failed_now"] == 1
    gens, errs = G.consolidate(tmp_path / "parts", reqs)
    assert errs.to_pylist() == [
        {S.USER_ID: "b", S.SAMPLE_IDX: 1, S.ERROR: f"ValueError: cannot sample seed {bad_seed}"}
    ]
    assert set(G.keys(gens)) == set(G.keys(reqs)) - {("b", 1)}

    run(reqs, tmp_path / "parts")  # a re-run retries the failed request only
    assert FakeEngine.calls == [1]
    gens, errs = G.consolidate(tmp_path / "parts", reqs)
    assert G.keys(gens) == G.keys(reqs) and errs.num_rows == 0


def test_shards_for_other_settings_are_discarded(tmp_path):
    reqs = requests(num_samples=1)
    run(reqs, tmp_path / "parts")
    G.open_parts(tmp_path / "parts", "work-fp")
    assert list((tmp_path / "parts").glob("gen-*"))
    G.open_parts(tmp_path / "parts", "other-fp")
    assert not list((tmp_path / "parts").glob("gen-*"))


# --------------------------------------------------------------------------------------------------- the stage


def stage_cfg(tmp_path: Path, **generate) -> RunConfig:
    return from_dict(
        RunConfig,
        {
            "name": "t",
            "run_dir": str(tmp_path / "run"),
            "data": {"format": "recbole", "path": str(FIXTURE)},
            "generate": {"engine": "transformers", "num_samples": 2, "batch_size": 4, **generate},
        },
    )


def test_stage_publishes_once_and_grows_incrementally(tmp_path, monkeypatch):
    monkeypatch.setattr(G, "chat_renderer", lambda model_path: render)
    monkeypatch.setattr(G.assets, "resolve", lambda ref, home, fetch=True: ref)
    cfg = stage_cfg(tmp_path, max_users=1)  # the fixture has one train and one valid user
    run_data(cfg)
    FakeEngine.calls = []
    stage = G.run_generate(cfg, make_engine=FakeEngine)
    gens = read_parquet(stage / "generations.parquet", S.GENERATIONS)
    assert gens.num_rows == 2 and read_marker(stage)["stats"]["rows"] == 2
    assert set(gens.column(S.POLICY_VERSION).to_pylist()) == {"base"}
    assert not (tmp_path / "run" / "generate.parts").exists()

    marker = (stage / MARKER).read_text()
    assert G.run_generate(cfg, make_engine=FakeEngine) == stage and (stage / MARKER).read_text() == marker

    FakeEngine.calls = []
    more = G.run_generate(stage_cfg(tmp_path, max_users=2), make_engine=FakeEngine)
    assert FakeEngine.calls == [2]  # only the new user's two samples
    grown = read_parquet(more / "generations.parquet", S.GENERATIONS)
    assert grown.num_rows == 4 and grown.slice(0, 2).to_pylist() == gens.to_pylist()


def test_a_run_directory_moved_elsewhere_keeps_the_texts_of_the_models_it_trained(tmp_path):
    """A policy this run trained is named in a generation fingerprint by its place in the run, so a copied or moved
    run directory finds its texts complete; a model outside the run by its path, so another one is another key."""
    a, b = stage_cfg(tmp_path / "a"), stage_cfg(tmp_path / "b")
    for cfg in (a, b):  # a trained policy as the DPO stage leaves it: a model directory in a complete stage
        (cfg.run_path / "dpo" / "round0" / "model").mkdir(parents=True)
        (cfg.run_path / "dpo" / "round0" / MARKER).write_text('{"fingerprint": "dpo-fp"}')

    def key(cfg: RunConfig, model: Path) -> str:
        return G.fingerprint(cfg, cfg.generate, "data-fp", str(model), "round1").key

    policy = Path("dpo") / "round0" / "model"
    assert key(a, a.run_path / policy) == key(b, b.run_path / policy)
    assert G.run_relative_model(a, str(a.run_path / policy)) == "<run>/dpo/round0/model"
    outside = tmp_path / "elsewhere" / "model"
    outside.mkdir(parents=True)
    assert G.run_relative_model(a, str(outside)) == str(outside)
    assert key(a, outside) != key(a, tmp_path / "other")
    (b.run_path / "dpo" / "round0" / MARKER).write_text('{"fingerprint": "retrained"}')  # retrained: stale texts
    assert key(a, a.run_path / policy) != key(b, b.run_path / policy)


def test_generate_config_errors_name_the_field():
    for bad, field in [
        ({"engine": "tgi"}, "generate.engine"),
        ({"num_samples": 0}, "generate.num_samples"),
        ({"top_p": 0.0}, "generate.top_p"),
        ({"splits": ["train", "train"]}, "generate.splits"),
        ({"tensor_parallel_size": 2}, "generate.num_gpus_per_replica"),
        ({"dtype": "int8"}, "generate.dtype"),
        ({"max_model_len": 64, "max_new_tokens": 64}, "generate.max_model_len"),
        ({"domain": "music"}, "generate.domain"),
        ({"max_users": 0}, "generate.max_users"),
    ]:
        with pytest.raises(ConfigError, match=f"^{field}="):
            from_dict(RunConfig, {"name": "t", "generate": bad})


def test_cli_dry_run_and_overrides(tmp_path, capsys):
    rc = main(["generate", "--config", str(ROOT / "configs/ml100k-cpu.yaml"), "--dry-run", "--generate.num_samples=8"])
    assert rc == 0 and "num_samples: 8" in capsys.readouterr().out
    assert main(["generate", "--config", str(ROOT / "configs/ml100k-cpu.yaml"), "--generate.top_p=2"]) == 2


# --------------------------------------------------------------------------------------------------- real engines


@pytest.fixture(scope="module")
def model_requests(asset_home, tmp_path_factory):
    """Two users of the RecBole fixture, rendered with SmolLM2's own chat template."""
    cfg = stage_cfg(tmp_path_factory.mktemp("real"))
    data = run_data(cfg)
    model = str(asset_home / "models" / "smollm2-135m-instruct")
    sequences = read_parquet(data / "sequences.parquet", S.SEQUENCES)
    gen_cfg = GenerateConfig(engine="transformers", num_samples=1, max_users=2, temperature=0.0, max_new_tokens=24)
    reqs = G.build_requests(sequences, read_parquet(data / "items.parquet"), None, E.chat_renderer(model), gen_cfg, 1)
    return model, gen_cfg, reqs


@pytest.mark.slow
def test_transformers_greedy_is_identical_twice(model_requests):
    model, gen_cfg, reqs = model_requests
    generate = G.GenerateBatch(partial(E.TransformersEngine, model, gen_cfg))
    first, second = generate(reqs), generate(reqs)
    assert first.column(S.ERROR).null_count == reqs.num_rows
    assert first.column(S.PREFERENCE_TEXT).to_pylist() == second.column(S.PREFERENCE_TEXT).to_pylist()
    assert all(first.column(S.PREFERENCE_TEXT).to_pylist())
    assert all(0 < n <= 24 for n in first.column(S.COMPLETION_TOKENS).to_pylist())


@pytest.mark.slow
def test_vllm_on_ray_data_writes_rows_with_texts_and_token_counts(ray_cluster, model_requests, tmp_path):
    model, _, _ = model_requests
    cfg = stage_cfg(tmp_path, engine="vllm", splits=["train", "valid", "test"], max_new_tokens=24, batch_size=4)
    run_data(cfg)
    cfg = from_dict(RunConfig, {**cfg.to_dict(), "models": {"llm": model}})
    stage = G.run_generate(cfg)
    gens = read_parquet(stage / "generations.parquet", S.GENERATIONS)
    assert G.keys(gens) == [(u, k) for u in sorted(set(gens.column(S.USER_ID).to_pylist())) for k in range(2)]
    assert gens.num_rows == 6 and read_parquet(stage / "generation_errors.parquet").num_rows == 0
    for row in gens.to_pylist():
        assert row[S.PREFERENCE_TEXT] and row[S.PROMPT].endswith("<|im_start|>assistant\n")
        assert row[S.PROMPT_TOKENS] > 50 and 0 < row[S.COMPLETION_TOKENS] <= 24
        assert row[S.FINISH_REASON] in ("stop", "length") and row[S.MODEL] == model


@pytest.mark.slow
def test_vllm_request_seed_gives_the_same_text_in_any_batch(model_requests):
    """One seed per request (SamplingParams.seed): a sampled text depends on its prompt and seed, not on its
    batch-mates, its position in the batch or the prefix cache a previous batch left behind."""
    import gc

    model, _, reqs = model_requests
    engine = E.VLLMEngine(model, GenerateConfig(temperature=1.0, top_p=0.95, max_new_tokens=16))
    try:
        p, q = reqs.column(S.PROMPT).to_pylist()  # the fixture's two users
        seed, q_seed = reqs.column(S.SEED).to_pylist()
        other = E.chat_renderer(model)([{"role": "user", "content": "Name three films set at sea."}])
        in_batch = engine.generate([p, q], [seed, q_seed])[0]
        alone = engine.generate([p], [seed])[0]
        second = engine.generate([other, p], [7, seed])[1]
        reseeded = engine.generate([p], [seed + 1])[0]
    finally:
        del engine
        gc.collect()
    assert in_batch.text and in_batch.completion_tokens > 0
    assert alone.text == in_batch.text and second.text == in_batch.text
    assert (alone.completion_tokens, second.completion_tokens) == (in_batch.completion_tokens,) * 2
    assert reseeded.text != in_batch.text  # it samples: the seed, not greedy decoding, fixes the text


def test_vllm_noise_is_dropped_unless_verbose(monkeypatch, caplog):
    """The per-tensor dtype lines and the CPU worker's thread notice are dropped from vLLM's loggers; anything else
    they say is kept, and `--verbose` (VLLM_LOGGING_LEVEL=INFO) keeps everything."""
    import logging

    worker = logging.getLogger("vllm.v1.worker.cpu_worker")
    loader = logging.getLogger("vllm.model_executor.models.utils")
    for logger in (worker, loader):
        monkeypatch.setattr(logger, "filters", [])
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "INFO")
    E._drop_vllm_noise()
    assert worker.filters == [] and loader.filters == []
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "WARNING")
    E._drop_vllm_noise()
    E._drop_vllm_noise()  # a second engine in the process adds no second filter
    assert len(worker.filters) == len(loader.filters) == 1
    with caplog.at_level(logging.WARNING):
        worker.warning("CPU backend doesn't allow to use `torch.set_num_threads` after the thread binding, skip it.")
        loader.warning("Attempted to load weight %s with dtype %s into parameter with dtype %s", "w", "f32", "bf16")
        worker.warning("KV cache space is too small")
        logging.getLogger("vllm.config.vllm").warning("Enforce eager set, disabling torch.compile and CUDAGraphs.")
        logging.getLogger("vllm.engine.arg_utils").warning("The global random seed is set to %d. Since ...", 0)
        logging.getLogger("vllm.platforms.cpu").warning("Triton is not installed. triton-cpu is expected on x86 CPUs.")
        logging.getLogger("vllm.platforms.cpu").warning("Out of memory in the KV cache")
    assert [r.getMessage() for r in caplog.records] == ["KV cache space is too small", "Out of memory in the KV cache"]


def test_auto_dtype_is_bfloat16_only_where_the_hardware_has_it(monkeypatch):
    import torch

    from rlrf4rec.core import engines

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(engines, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    assert engines.resolve_dtype("auto")[0] == "bfloat16"
    monkeypatch.setattr(engines, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})  # bf16 dot, no AMX
    assert engines.resolve_dtype("auto") == ("bfloat16", "auto: the CPU has AVX512_BF16 instructions")
    monkeypatch.setattr(engines, "cpu_flags", lambda: {"avx2", "fma", "f16c"})  # bf16 emulated
    assert engines.resolve_dtype("auto")[0] == "float32"
    monkeypatch.setattr(engines, "cpu_flags", set)  # no /proc/cpuinfo
    assert engines.resolve_dtype("auto")[0] == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert engines.resolve_dtype("auto")[0] == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert engines.resolve_dtype("auto")[0] == "float16"
    for explicit in ("float32", "bfloat16", "float16"):
        assert engines.resolve_dtype(explicit) == (explicit, "set in the config")


def test_auto_dtype_shares_rows_with_the_dtype_it_picks_on_cpu_replicas(monkeypatch):
    """The work fingerprint (what a row's text depends on) keys "auto" on CPU replicas as the dtype it resolves to,
    so switching a config between `auto` and that dtype keeps the generated rows; on GPU replicas it stays "auto"."""
    import dataclasses

    import torch

    from rlrf4rec.core import engines
    from rlrf4rec.core.config import GenerateConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = GenerateConfig(dtype="auto")
    monkeypatch.setattr(engines, "cpu_flags", lambda: {"amx_bf16"})
    assert G.fingerprint_dtype(cpu) == "bfloat16"
    monkeypatch.setattr(engines, "cpu_flags", set)
    assert G.fingerprint_dtype(cpu) == "float32"
    assert G.fingerprint_dtype(dataclasses.replace(cpu, dtype="bfloat16")) == "bfloat16"
    gpu = GenerateConfig(dtype="auto", num_gpus_per_replica=1)
    assert G.fingerprint_dtype(gpu) == "auto"


def test_a_short_prompt_history_never_reaches_before_the_window():
    # The window is items [1, 4): prompt_history 10 is longer than it, 2 keeps its last two entries. Without the
    # lower bound, end - 10 would be a negative start and read held-out items from the end of the sequence.
    for row in requests(prompt_history=10).to_pylist():
        user = row[S.USER_ID]
        assert [i for i in range(8) if f"-{user}{i}" in row[S.PROMPT]] == [1, 2, 3]
    for row in requests(prompt_history=2).to_pylist():
        user = row[S.USER_ID]
        assert [i for i in range(8) if f"-{user}{i}" in row[S.PROMPT]] == [2, 3]


def test_every_dpo_pair_prompt_is_the_prompt_its_texts_were_generated_from(tmp_path, monkeypatch):
    import numpy as np

    from rlrf4rec.core.artifacts import stage_output, write_parquet
    from rlrf4rec.core.layout import REWARDS, pairs_file
    from rlrf4rec.core.scoring import rewards_table
    from rlrf4rec.stages.pairs import run_pairs

    monkeypatch.setattr(G, "chat_renderer", lambda model_path: render)
    monkeypatch.setattr(G.assets, "resolve", lambda ref, home, fetch=True: ref)
    cfg = stage_cfg(tmp_path, prompt_history=3)
    run_data(cfg)
    gen_dir = G.run_generate(cfg, make_engine=FakeEngine)
    gens = read_parquet(gen_dir / "generations.parquet", S.GENERATIONS)
    rewards = np.array([1.0 - k for k in gens.column(S.SAMPLE_IDX).to_pylist()])  # sample 0 beats sample 1
    with stage_output(tmp_path / "rewards", "r", None) as (tmp, _):
        write_parquet(rewards_table(gens, rewards), tmp / REWARDS, S.REWARDS)
    pairs_dir = run_pairs(cfg, [(gen_dir, tmp_path / "rewards")], tmp_path / "pairs", "base", 0)
    generated = dict(zip(gens.column(S.USER_ID).to_pylist(), gens.column(S.PROMPT).to_pylist()))
    rows = [r for split in ("train", "valid") for r in read_parquet(pairs_dir / pairs_file(split)).to_pylist()]
    assert len(rows) == len(generated) == 2
    for r in rows:
        assert render(r[S.PROMPT]) == generated[r[S.USER_ID]]
