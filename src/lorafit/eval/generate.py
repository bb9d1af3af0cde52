"""Batched greedy decoding with a KV cache and left padding, for evaluation and `lorafit generate`."""

from __future__ import annotations

import torch

from lorafit.model.llama import KVCache
from lorafit.model.quantize import dense_weights_on_cpu
from lorafit.train.distributed import all_ranks


def stop_token_ids(tokenizer) -> set[int]:
    """EOS plus the end-of-turn tokens chat templates use, so a chat model stops where its turn ends."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None and tid >= 0:
            ids.add(tid)
    return ids


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 256, batch_size: int = 16,
             stop_strings: list[str] | None = None, temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Continue each token prompt; returns the decoded continuations, cut at a stop token or stop string.

    Prompts are decoded in batches sorted by length (less padding); the output order is the input order.
    """
    with dense_weights_on_cpu(model):
        return _generate(model, tokenizer, prompts, max_new_tokens, batch_size, stop_strings, temperature, seed)


def _generate(model, tokenizer, prompts, max_new_tokens, batch_size, stop_strings, temperature, seed):
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stops = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    generator = torch.Generator(device=device).manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        batch = [prompts[i] for i in index]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=device)
        key_padding = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device).bool()
        positions = (key_padding.long().cumsum(-1) - 1).clamp(min=0)
        cache = KVCache(len(model.model.layers))
        generated = [[] for _ in batch]
        done = torch.zeros(len(batch), dtype=torch.bool, device=device)
        step_ids, step_pos = ids, positions
        for _ in range(max_new_tokens):
            hidden = model(step_ids, position_ids=step_pos, key_padding=key_padding, cache=cache)
            logits = model.logits(hidden[:, -1]).float()
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            else:
                next_ids = logits.argmax(-1)
            for b, tid in enumerate(next_ids.tolist()):
                if not done[b]:
                    if tid in stops:
                        done[b] = True
                    else:
                        generated[b].append(tid)
            if stop_strings:
                for b in range(len(batch)):
                    if not done[b] and any(s in tokenizer.decode(generated[b][-16:]) for s in stop_strings):
                        done[b] = True
            if all_ranks(bool(done.all())):  # several processes (FSDP): every rank runs each forward, so stop together
                break
            step_ids = next_ids[:, None]
            step_pos = step_pos[:, -1:] + 1
            key_padding = torch.cat([key_padding, torch.ones_like(key_padding[:, :1])], dim=1)
        for b, i in enumerate(index):
            text = tokenizer.decode(generated[b], skip_special_tokens=True)
            for s in stop_strings or []:
                text = text.split(s)[0]
            outputs[i] = text
    model.train(was_training)
    return outputs
