"""Helpers for the LLaVA fork's tests: prompts, the VTR model loader and the no-machinery oracle."""

import torch

from llava.vtr import VTRConfig, load_model

QUESTION = "What is shown in the image?"


def chat(processor, question=QUESTION, images=1):
    content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def vtr_model(path, impl="sdpa", **cfg):
    return load_model(path, VTRConfig(**cfg), attn_implementation=impl)


@torch.no_grad()
def oracle_forward(stock, inputs, prune_stages, prompt_len, position_ids=None):
    """Reference computation with no pruning machinery at all: the stock layers on the full sequence, with a
    per-layer attention mask that hides the tokens dropped at each stage from layer K on, and hides every
    dropped token from rows after the prompt (decode steps) in every layer. Eager attention, explicit mask.

    prune_stages: list of (K, dropped[batch, prompt_len] bool). Returns logits [batch, seq, vocab].
    """
    model = stock.model
    input_ids = inputs["input_ids"]
    batch, seq = input_ids.shape
    embeds = model.get_input_embeddings()(input_ids)
    if "pixel_values" in inputs:
        cfg = stock.config
        extra = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
        feats = model.get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            return_dict=True,
            **extra,
        ).pooler_output
        feats = torch.cat(feats, 0)
        embeds = embeds.masked_scatter((input_ids == stock.config.image_token_id)[..., None], feats)
    valid = inputs.get("attention_mask", torch.ones(batch, seq)).bool()
    if position_ids is None:
        position_ids = torch.arange(seq).unsqueeze(0).expand(batch, -1)
    lm = model.language_model
    cos, sin = lm.rotary_emb(embeds, position_ids)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    all_dropped = torch.zeros(batch, seq, dtype=torch.bool)
    for _, dropped in prune_stages:
        all_dropped[:, : dropped.shape[1]] |= dropped
    is_decode_row = (torch.arange(seq) >= prompt_len)[None, :, None]
    h = embeds
    for i, layer in enumerate(lm.layers):
        hidden_here = torch.zeros(batch, seq, dtype=torch.bool)
        for k, dropped in prune_stages:
            if i >= k:
                hidden_here[:, : dropped.shape[1]] |= dropped
        allowed = causal[None] & valid[:, None, :]
        allowed = allowed & ~(hidden_here[:, None, :] | (is_decode_row & all_dropped[:, None, :]))
        mask = torch.zeros(batch, 1, seq, seq).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        h = layer(h, attention_mask=mask, position_embeddings=(cos, sin))
    return stock.lm_head(lm.norm(h))


def stage_drops(record, batch, prompt_len, image_mask):
    """(K, dropped[batch, prompt_len]) per stage, from what the model reports it kept."""
    stages = []
    alive = image_mask.clone()
    for stage in record.stages:
        kept = torch.zeros(batch, prompt_len, dtype=torch.bool)
        for b, positions in enumerate(stage.kept_positions):
            kept[b, positions] = True
        dropped = alive & ~kept
        stages.append((stage.layer, dropped))
        alive = alive & kept
    return stages


@torch.no_grad()
def oracle_greedy(stock, inputs, prune_stages, steps):
    """Greedy decode with `oracle_forward`, recomputing the whole sequence each step; positions as generate()
    makes them (cumulative sum of the attention mask). Returns (tokens [batch, steps], logits [batch, steps, vocab])."""
    ids = inputs["input_ids"]
    mask = inputs["attention_mask"]
    prompt_len = ids.shape[1]
    out, step_logits = [], []
    for _ in range(steps):
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        step_inputs = dict(inputs, input_ids=ids, attention_mask=mask)
        logits = oracle_forward(stock, step_inputs, prune_stages, prompt_len, position_ids=pos)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        step_logits.append(logits[:, -1])
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return torch.cat(out, 1), torch.stack(step_logits, 1)
