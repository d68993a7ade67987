"""The DPO stage's speed layer (METHOD.md section 7): TRL's DPOTrainer with the same loss, computed faster.

Consumes pairs as TRL tokenizes them (`prompt_ids`, `chosen_ids`, `rejected_ids`). Produces a collator,
`pack_shared_prompt`, that makes each pair one row in which chosen and rejected both continue a single pass over
their prompt (the prompt is most of a pair's tokens; TRL's own layout runs it twice, for policy and reference alike),
with `segment_attention` as that row's attention mask; and `trainer_class`, TRL's DPOTrainer that scores such rows
(answer-only log-probs, DPO's sigmoid loss, TRL's metric names) and computes the reference log-probs once, before
the first step, on every worker's share of the pairs, keeping them in memory. Loss, gradients and reward metrics
stay TRL's (tests/test_dpo_speed.py). Knows nothing about files, Ray or how pairs were chosen: rlrf4rec.stages.dpo maps
the `dpo` config onto it and runs it.
"""

from __future__ import annotations

import functools

# --------------------------------------------------------------------------------------------------- shared prompt


def pack_shared_prompt(examples: list[dict], pad_token_id: int, max_length: int | None) -> dict:
    """Tokenized pairs (TRL's prompt_ids, chosen_ids, rejected_ids) -> one row per pair, the prompt run once.

    A row is `prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected`: each completion segment opens with the prompt's
    last token at that token's own position, so the segment scores its own first token, and it attends to the
    prompt and to itself only (`segment_attention`). Completions are cut to `max_length - len(prompt)` tokens, as
    TRL's collator cuts prompt + completion. Rows are right-padded to the longest. Returns [B, T] tensors:
    `input_ids`; `position_ids` (each segment continues the prompt's positions); `segment_ids` (0 prompt, 1 chosen,
    2 rejected, -1 padding); `shift_labels` (the token each position predicts, -100 where it predicts none), plus
    `ref_chosen_logps` / `ref_rejected_logps` [B] when the examples carry them.
    """
    import torch

    rows = []
    for ex in examples:
        prompt = ex["prompt_ids"]
        assert prompt, "a pair needs a prompt"
        room = None if max_length is None else max_length - len(prompt)
        chosen, rejected = ex["chosen_ids"][:room], ex["rejected_ids"][:room]
        p = len(prompt)
        rows.append(
            (
                prompt + chosen + prompt[-1:] + rejected,
                [*range(p + len(chosen)), *range(p - 1, p + len(rejected))],
                [0] * (p - 1) + [1] * (len(chosen) + 1) + [2] * (len(rejected) + 1),
                [-100] * (p - 1) + chosen + [-100] + rejected + [-100],
            )
        )
    T = max(len(row[0]) for row in rows)

    def padded(field: int, value: int):
        return torch.tensor([row[field] + [value] * (T - len(row[field])) for row in rows])

    batch = {
        "input_ids": padded(0, pad_token_id),
        "position_ids": padded(1, 0),
        "segment_ids": padded(2, -1),
        "shift_labels": padded(3, -100),
    }
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if key in examples[0]:
            batch[key] = torch.tensor([ex[key] for ex in examples])
    return batch


def segment_attention(segment_ids):
    """[B, T] segment ids -> [B, 1, T, T] bool, True where query i sees key j: j <= i, j in the prompt or i's segment.

    Chosen never sees rejected nor the reverse; padding sees the prompt and padding, so no row is empty (no NaN).
    """
    import torch

    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]
    return (causal & ((key == 0) | (key == query)))[:, None]


# --------------------------------------------------------------------------------------------------- trainer

# Config fields with which TRL's fused head scales or caps the logits; the shared-prompt head does neither.
SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
VOCAB_TILE = 32768  # vocabulary entries per LM-head tile (TRL's)


@functools.cache
def trainer_class():
    """TRL's DPOTrainer with the shared-prompt forward (`share_prompt`) and a reference pass kept in memory.

    Built on first use: TRL is a heavy import.
    """
    import time
    from contextlib import nullcontext

    import torch
    import torch.nn.functional as F
    from accelerate.utils import is_peft_model
    from torch.utils.data import DataLoader
    from trl import DPOTrainer
    from trl.kernels import ChunkedLogProbFunction
    from trl.models import prepare_deepspeed
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import maybe_gather_lm_head_ctx, use_adapter

    class RLRFDPOTrainer(DPOTrainer):
        def __init__(self, *args, share_prompt: bool, **kwargs):
            self.share_prompt = share_prompt  # read by the reference pass that runs inside super().__init__
            super().__init__(*args, **kwargs)
            # The shared-prompt loss is DPO's sigmoid loss, TRL's default and the only one trl_args asks for.
            assert self.loss_types == ["sigmoid"] and self.f_divergence_type == "reverse_kl" and self.ld_alpha is None
            assert not self.use_weighting and self.args.label_smoothing == 0
            if share_prompt and self.aux_loss_enabled:
                raise ValueError(
                    "dpo.share_prompt=true does not add this mixture-of-experts model's auxiliary loss; "
                    "set dpo.share_prompt=false"
                )

        def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
            # TRL caches this pass in a file that, for an in-memory dataset like ours, gets a random name in each
            # process: the other ranks never find rank 0's file. The same pass, its result kept in memory.
            started = time.perf_counter()
            columns = [dataset[c] for c in ("prompt_ids", "chosen_ids", "rejected_ids")]
            lengths = [sum(map(len, ex)) for ex in zip(*columns)]
            order = sorted(range(len(dataset)), key=lambda i: -lengths[i])  # batches of like lengths pad least
            loader = DataLoader(dataset.select(order), batch_size=batch_size, collate_fn=self.data_collator)
            if self.ref_model is None and self.is_deepspeed_enabled:
                # As TRL: before `train`, DeepSpeed has not yet placed (ZeRO-2) or gathered (ZeRO-3) the parameters.
                if self._precompute_engine is None:
                    self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
                model = self._precompute_engine
            else:
                model = self.ref_model or self.model
            chosen, rejected = [], []
            for batch in self.accelerator.prepare(loader):  # each rank its share of the batches
                ref_chosen, ref_rejected = self.accelerator.gather_for_metrics(self.compute_ref_log_probs(model, batch))
                chosen.append(ref_chosen.cpu())
                rejected.append(ref_rejected.cpu())
            unsort = torch.as_tensor(order).argsort()
            dataset = dataset.add_column("ref_chosen_logps", torch.cat(chosen)[unsort].tolist())
            dataset = dataset.add_column("ref_rejected_logps", torch.cat(rejected)[unsort].tolist())
            spent = self._metrics["train"]["ref_precompute_s"]  # logged with the first step
            spent[:] = [sum(spent) + time.perf_counter() - started]
            return dataset

        def compute_ref_log_probs(self, model, inputs):
            if not self.share_prompt:
                return super().compute_ref_log_probs(model, inputs)
            adapter = nullcontext()
            if self.ref_model is None and is_peft_model(self.model):
                # With LoRA the reference is the base model: adapters off (or TRL's frozen copy named "ref").
                unwrapped = self.accelerator.unwrap_model(self.model)
                adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
            with (
                torch.no_grad(),
                disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
                adapter,
                self.accelerator.autocast(),
            ):
                return self._shared_prompt_logps(model, inputs)

        def _shared_prompt_logps(self, model, inputs):
            """(chosen_logps, rejected_logps) [B]: summed completion log-probs of one shared-prompt forward."""
            segments, labels = inputs["segment_ids"], inputs["shift_labels"]
            text_config = self.model.config.get_text_config()
            window = getattr(text_config, "sliding_window", None)
            scaled = [k for k in SCALED_LOGITS if getattr(text_config, k, None) is not None]
            if self.model.config._attn_implementation != "sdpa" or (window and segments.shape[1] > window) or scaled:
                raise ValueError(
                    "dpo.share_prompt=true needs SDPA attention over whole rows (a 4D mask) and unscaled logits; this "
                    f"model has {self.model.config._attn_implementation!r} attention, sliding window {window}, "
                    f"logit settings {scaled}: set dpo.share_prompt=false"
                )
            rows = {
                "input_ids": inputs["input_ids"],
                "attention_mask": segment_attention(segments),
                "position_ids": inputs["position_ids"],
                "use_cache": False,
            }
            head = self.accelerator.unwrap_model(model).get_output_embeddings()
            if head.weight.requires_grad:
                # A trained head (full fine-tune): TRL's fused head, inside the forward, where DeepSpeed ZeRO-3
                # reduces the head's gradient. It scores only the labelled positions on GPUs, all of them on CPU.
                log_probs = model(**rows, shift_labels=labels, fused_lm_head=True).log_probs  # [B, T]
            else:
                # A frozen head (LoRA): only the completion tokens go through it, on any device (TRL's kernel: no
                # [tokens, vocab] logits in memory). TRL's fused head scores every position on CPU, the prompt's
                # too: a third of a shared-prompt step with ~600-token prompts.
                hidden = model(**rows, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]  # [B, T, H]
                scored = labels != -100
                with maybe_gather_lm_head_ctx(head.weight, head.bias):
                    scores = ChunkedLogProbFunction.apply(
                        hidden[scored],
                        head.weight,
                        head.bias,
                        labels[scored],
                        1.0,
                        VOCAB_TILE,
                        None,
                        1.0,
                        ("log_probs",),
                    )[0]  # [N]
                log_probs = scores.new_zeros(labels.shape).masked_scatter(scored, scores)  # [B, T]
            return (log_probs * (segments == 1)).sum(1), (log_probs * (segments == 2)).sum(1)

        def _compute_loss(self, model, inputs, return_outputs):
            if not self.share_prompt:
                return super()._compute_loss(model, inputs, return_outputs)
            assert not return_outputs, "the shared-prompt forward builds no logits to return"
            chosen_logps, rejected_logps = self._shared_prompt_logps(model, inputs)
            if self.precompute_ref_logps:
                ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            else:
                ref_chosen, ref_rejected = self.compute_ref_log_probs(self.ref_model or self.model, inputs)
            chosen_logratios, rejected_logratios = chosen_logps - ref_chosen, rejected_logps - ref_rejected
            loss = -F.logsigmoid(self.beta * (chosen_logratios - rejected_logratios)).mean()  # TRL's "sigmoid"

            # TRL's names for the same metrics, averaged over ranks.
            chosen_rewards = self.beta * chosen_logratios.detach()
            rejected_rewards = self.beta * rejected_logratios.detach()
            metrics = self._metrics["train" if self.model.training else "eval"]
            for key, value in (
                ("rewards/chosen", chosen_rewards),
                ("rewards/rejected", rejected_rewards),
                ("rewards/accuracies", (chosen_rewards > rejected_rewards).float()),
                ("rewards/margins", chosen_rewards - rejected_rewards),
                ("logps/chosen", chosen_logps.detach()),
                ("logps/rejected", rejected_logps.detach()),
            ):
                metrics[key].append(self.accelerator.gather(value).mean().item())
            return loss

    return RLRFDPOTrainer
