"""FrameFusion: the official rules restated here from its code (thu-nics/FrameFusion `main.py`), on hand-built frame
sequences, and a literal re-run of the tiny LLaVA-OneVision's stock layers with those rules applied between them
(the oracle of an in-LLM merging method: the contract suite's oracles cover pre-LLM arrangements only)."""

import math

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import llava.vtr.strategy.framefusion  # noqa: F401 (registers framefusion)
from llava.vtr import VTRConfig, get_strategy, load_model
from llava.vtr.strategy.framefusion import sparsity_bound
from llava.vtr.tiny import demo_image, demo_video
from llava_testlib import onevision_embed, ov_chat

STEPS = 3
ATOL = 1e-4


def official_bound(sparsities, cost, layers=28):
    """`_compute_pruning_ratio`: with S = prod(1 - s), T = sum of the running products and R = 28 c - T, the
    sparsity 1 - R / ((28 - k) S), or 0 when that fraction exceeds 1."""
    product = math.prod(1 - s for s in sparsities)
    spent = sum(math.prod(1 - s for s in sparsities[: i + 1]) for i in range(len(sparsities)))
    share = (layers * cost - spent) / ((layers - len(sparsities)) * product)
    return 0.0 if share > 1 else 1 - share


# ------------------------------------------------------------------------------------------- the schedule


def test_the_cost_schedule_gives_the_worked_values():
    for sparsities, want in [([], 0.7), ([0.5], 0.41481), ([0.5, 0.2], 0.27885), ([0.5, 0.2, 0.05], 0.25053)]:
        assert sparsity_bound(sparsities, 0.3) == pytest.approx(want, abs=1e-5)
        assert sparsity_bound(sparsities, 0.3) == official_bound(sparsities, 0.3)
    assert sparsity_bound([0.0], 0.3) == pytest.approx(0.72593, abs=1e-5)  # a single frame: nothing similar
    kept = 0.5 * 0.8 * 0.95 * (1 - sparsity_bound([0.5, 0.2, 0.05], 0.3))
    assert kept == pytest.approx(0.285, abs=1e-3)  # the video tokens' share after pruning
    assert sparsity_bound([], 1.0) == 0.0 and sparsity_bound([0.5], 0.9) == 0.0  # the budget is met already
    with pytest.raises(ValueError, match="framefusion: the cost 0.3 is too small for 27 merging layers"):
        sparsity_bound([0.1] * 27, 0.3)


# ------------------------------------------------------------------------------ hand-built frame sequences


def place_vectors(count, dim=16, seed=0):
    """`count` random directions, far from each other (|cos| well below 0.6)."""
    return torch.randn(count, dim, generator=torch.Generator().manual_seed(seed))


class Prompt:
    """Two text rows, a video of frames [T, P, D] (frame-major), two text rows; `run` calls the strategy as one
    engine stage does and applies what it kept and merged, as the engine gathers the sequence."""

    def __init__(self, frames, **cfg):
        count, places, dim = frames.shape
        text = place_vectors(4, dim, seed=99)
        self.hidden = torch.cat([text[:2], frames.reshape(-1, dim), text[2:]])[None]
        self.original = torch.arange(self.hidden.shape[1])
        self.visual = torch.zeros(self.hidden.shape[1], dtype=torch.bool)
        self.visual[2 : 2 + count * places] = True
        video = torch.arange(count).repeat_interleave(places)
        self.frames = torch.stack([torch.zeros_like(video), video], 1)
        self.config = VTRConfig(strategy="framefusion", **cfg)
        self.strategy, self.vtr_ctx = get_strategy("framefusion")(), {}

    @property
    def state(self):
        return self.vtr_ctx["framefusion"]

    def run(self, attention=None):
        """One stage: returns {prompt position kept as it is} and {prompt position of a merged token: its value}."""
        rows = self.visual.nonzero().reshape(-1)
        start, end = int(rows[0]), int(rows[-1]) + 1
        ctx = dict(
            image_token_indices=rows,
            original_index=self.original,
            hidden_states=self.hidden,
            frames=lambda: self.frames,
            vtr_ctx=self.vtr_ctx,
        )
        scores = self.strategy.compute_scores(attention, (start, end), self.config, **ctx)
        dropped = rows[scores[rows - start] == -math.inf]
        hidden, merged = self.hidden[0].clone(), {}
        out = None
        if dropped.numel():
            out = self.strategy.merge_tokens(
                hidden[dropped], None, self.config, dropped_index=dropped, vtr_ctx=self.vtr_ctx
            )
        representative = dropped[:0]
        if out is not None:
            values, which, after, _ = out
            representative = dropped[which]
            assert torch.equal(after, representative)  # each merged token right at its representative's row
            hidden[representative] = values
            merged = {int(self.original[r]): v for r, v in zip(representative.tolist(), values)}
        every = torch.arange(hidden.shape[0])
        rows_now = ~torch.isin(every, dropped) | torch.isin(every, representative)
        self.hidden, self.original, self.visual = hidden[rows_now][None], self.original[rows_now], self.visual[rows_now]
        kept = {int(i) for i in self.original[self.visual]} - set(merged)
        return kept, merged


def test_static_frames_collapse_into_the_first_and_the_budget_ends_merging():
    """Four identical frames of two places: every later token is similar (r = 6/8 >= u = 0.7), so only
    int(0.7 x 8) = 5 merge, ties to the earlier in chain order (place 0's frames 1-3, place 1's frames 1-2), each
    run into its chain's first frame; FrameFusion ends there: no pruning stage follows."""
    places = place_vectors(2)
    prompt = Prompt(places.expand(4, 2, 16).clone())
    kept, merged = prompt.run()
    video = lambda t, p: 2 + 2 * t + p  # noqa: E731 (prompt position of place p of frame t)
    assert kept == {video(3, 1)} and set(merged) == {video(0, 0), video(0, 1)}
    torch.testing.assert_close(merged[video(0, 0)], places[0])
    assert prompt.state["phase"] == "done" and prompt.state["sparsity"] == []
    assert prompt.run() == ({video(0, 0), video(0, 1), video(3, 1)}, {})  # later stages keep everything


def test_a_scene_cut_opens_a_new_group_and_the_mean_counts_each_token_once():
    """Frames 0-1 show one scene and frames 2-3 another: each place's chain is [-2, ~1, ~0, ~1], so frame 1 merges
    into frame 0 and frame 3 into frame 2 (r = 4/8 < 0.7: all similar ones, and the cascade goes on); the next
    stage finds nothing similar (r = 0 < 0.1) and stops merging; the one after prunes by the last row's attention
    to round(4 x (1 - rho)) tokens, ties to the earlier."""
    a, b = place_vectors(2, seed=1), place_vectors(2, seed=2)
    noise = 0.05 * place_vectors(8, seed=3).reshape(4, 2, 16)
    frames = torch.stack([a, a, b, b]) + noise
    prompt = Prompt(frames)
    kept, merged = prompt.run()
    video = lambda t, p: 2 + 2 * t + p  # noqa: E731
    assert kept == set() and set(merged) == {video(0, 0), video(0, 1), video(2, 0), video(2, 1)}
    for t, p in [(0, 0), (0, 1), (2, 0), (2, 1)]:
        torch.testing.assert_close(merged[video(t, p)], (frames[t, p] + frames[t + 1, p]) / 2)
    assert prompt.state["sparsity"] == [0.5] and prompt.state["phase"] == "merging"
    assert prompt.run() == (set(merged), {})
    assert prompt.state["sparsity"] == [0.5, 0.0] and prompt.state["phase"] == "pruning"
    length = prompt.hidden.shape[1]  # text, 4 merged tokens, text: the last row's attention over them
    attention = torch.zeros(1, 2, length, length)
    attention[0, :, -1, 2:6] = torch.tensor([[0.3, 0.1, 0.3, 0.3], [0.3, 0.2, 0.3, 0.3]])
    count = round(4 * (1 - official_bound([0.5, 0.0], 0.3)))
    assert count == 2
    kept, merged = prompt.run(attention)
    assert kept == {video(0, 0), video(2, 0)} and merged == {}  # a three-way tie: the earlier two
    assert prompt.state["phase"] == "done"


def test_pruning_rounds_half_to_even():
    """27 tokens, none similar, cost 0.625: rho = 1 - 16.5 / 27, so pruning keeps round(16.5) = 16 (Python's
    round, as the official code), not 17."""
    prompt = Prompt(place_vectors(27, dim=64, seed=4).reshape(3, 9, 64), framefusion_cost=0.625)
    prompt.run()
    assert prompt.state["sparsity"] == [0.0] and prompt.state["phase"] == "pruning"
    length = prompt.hidden.shape[1]
    attention = torch.rand(1, 2, length, length, generator=torch.Generator().manual_seed(5))
    kept, _ = prompt.run(attention)
    assert 27 * (1 - official_bound([0.0], 0.625)) == 16.5 and len(kept) == 16


def test_a_met_budget_merges_nothing_and_an_explicit_budget_is_the_cost():
    frames = place_vectors(2).expand(4, 2, 16).clone()
    prompt = Prompt(frames, keep_ratio=1.0)  # an explicit budget: the cost (1.0: every token, every layer)
    kept, merged = prompt.run()
    assert len(kept) == 8 and merged == {} and prompt.state["phase"] == "done"
    prompt = Prompt(frames, keep_tokens=4)  # 4 of 8 video tokens: cost 0.5, u = 0.5 <= r = 0.75: top-k of 4
    kept, merged = prompt.run()
    assert prompt.state["cost"] == 0.5 and len(kept) + len(merged) == 4


# ---------------------------------------------------------------------- the literal oracle, tiny OneVision


def noise_video(frames=8, seed=0):
    return np.random.default_rng(seed).integers(0, 255, size=(frames, 64, 64, 3), dtype=np.uint8)


def blended_video(frames=8, seed=0):
    """The demo scene with 30 % of its pixels replaced by noise, a new draw each frame."""
    rng = np.random.default_rng(seed)
    return np.where(rng.random((frames, 64, 64, 1)) < 0.3, noise_video(frames, seed), demo_video(frames, 64))


def causal(n):
    return torch.zeros(1, 1, n, n).masked_fill(
        ~torch.ones(n, n, dtype=torch.bool).tril(), torch.finfo(torch.float32).min
    )


def literal_merge(h, place, state, cfg):
    """One merging call written out from the official code on the current sequence h [n, d]: chains by place in
    sequence order, cosines in the states' dtype, the r < u / top-k branches, runs into the token before them, the
    mean (target + members) / (m + 1). Returns the rows kept and the new states."""
    order = [i for p in range(int(place.max()) + 1) for i in (place == p).nonzero().reshape(-1).tolist()]
    ignore = torch.tensor(-2.0)
    sims = [ignore] + [
        (h[a] * h[b]).sum() / (h[a].norm() * h[b].norm()) if place[a] == place[b] else ignore
        for a, b in zip(order, order[1:])
    ]
    similar = [j for j, s in enumerate(sims) if bool(s >= cfg["framefusion_threshold"])]
    bound = official_bound(state["sparsity"], cfg["framefusion_cost"])
    share = len(similar) / len(order)
    if share < bound:
        state["sparsity"].append(share)
        state["phase"] = "prune" if share < cfg["framefusion_min_similar"] else "merge"
    else:
        ranked = sorted(range(len(order)), key=lambda j: -float(sims[j]))  # stable: ties to the earlier
        similar, state["phase"] = sorted(ranked[: int(bound * len(order))]), "done"
    groups, keep = {}, torch.ones(h.shape[0], dtype=torch.bool)
    for j in similar:
        target = order[j - 1] if j - 1 not in similar else next(t for t, m in groups.items() if order[j - 1] in m)
        groups.setdefault(target, []).append(order[j])
        keep[order[j]] = False
    out = h.clone()
    for target, members in groups.items():
        out[target] = (h[target] + sum(h[m] for m in members)) / (len(members) + 1)
    state["trace"].append(("merge" if state["phase"] != "done" else "top-k", len(groups), len(similar)))
    return keep, out


def literal_prune(layer, h, rotary, place, state, cfg):
    """The importance pruning: `layer`'s attention on its input h (the stock module, eager: the layer before the
    stage, whose attention the official code has just run), its last row averaged over heads, the round(n (1 - rho)) frame tokens it attends to most (ties to the earlier); the rest stays."""
    _, weights = layer.self_attn(layer.input_layernorm(h[None]), rotary, causal(h.shape[0]))
    received = weights[0, :, -1].mean(0)
    video = (place >= 0).nonzero().reshape(-1).tolist()
    count = round(len(video) * (1 - official_bound(state["sparsity"], cfg["framefusion_cost"])))
    keep = place < 0
    keep[sorted(video, key=lambda i: -float(received[i]))[:count]] = True
    state["phase"] = "done"
    state["trace"].append(("prune", 0, len(video) - count))
    return keep


@torch.no_grad()
def literal_framefusion(stock, inputs, frames, cfg, steps=STEPS):
    """FrameFusion on the stock layers of a one-video prompt: at every layer's input, one call of the rules above
    (the official code's c0 and, at the engine's boundaries, its later calls), the reduced rows keeping their
    prompt positions; each layer caches the rows it ran on, and decoding continues after the prompt. Returns
    (the prompt positions of the final rows, prefill logits, greedy tokens, the steps' logits)."""
    cfg = dict(framefusion_threshold=0.6, framefusion_cost=0.3, framefusion_min_similar=0.1) | cfg
    lm = stock.model.language_model
    h = onevision_embed(stock, inputs)[0]
    ids = torch.arange(h.shape[0])
    video = (inputs["input_ids"][0] == stock.config.video_token_id).nonzero().reshape(-1)
    per = (video.numel() - 1) // frames  # the frames' tokens, then the video's one newline
    place = torch.full_like(ids, -1)
    place[video[: frames * per]] = torch.arange(frames * per) % per
    state, cache = {"phase": "merge", "sparsity": [], "trace": []}, DynamicCache(config=lm.config)
    before = None  # the previous layer and its input
    for layer in lm.layers:
        keep = None
        if state["phase"] == "merge":
            keep, h = literal_merge(h, place, state, cfg)
        elif state["phase"] == "prune":
            keep = literal_prune(before[0], before[1], lm.rotary_emb(h[None], ids[None]), place, state, cfg)
        if keep is not None:
            h, ids, place = h[keep], ids[keep], place[keep]
        rotary = lm.rotary_emb(h[None], ids[None])
        before = (layer, h)
        h = layer(h[None], attention_mask=causal(h.shape[0]), position_embeddings=rotary, past_key_values=cache)[0]
    logits = [stock.lm_head(lm.norm(h))[-1]]
    tokens = [logits[-1].argmax()]
    for step in range(steps - 1):
        x = lm.embed_tokens(tokens[-1].reshape(1, 1))
        rotary = lm.rotary_emb(x, torch.tensor([[len(inputs["input_ids"][0]) + step]]))
        for layer in lm.layers:
            x = layer(x, attention_mask=None, position_embeddings=rotary, past_key_values=cache)
        logits.append(stock.lm_head(lm.norm(x))[0, -1])
        tokens.append(logits[-1].argmax())
    prefill = stock.lm_head(lm.norm(h))
    return ids, prefill, torch.stack(tokens), torch.stack(logits), state["trace"]


def vtr_run(path, inputs, **cfg):
    """The VTR model's pruned prefill and greedy decode: (model, final rows' prompt positions, logits, tokens,
    the steps' logits)."""
    model = load_model(path, VTRConfig(strategy="framefusion", **cfg), attn_implementation="eager")
    with torch.no_grad():
        logits = model(**inputs).logits
    rows = model.vtr_last.kept_index
    out = model.generate(
        **inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
        return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
    return model, rows, logits, tokens, torch.stack(out.logits, 1)


def one_video(processor, video, question="What moves?"):
    return processor(text=[ov_chat(processor, question, kinds=("video",))], videos=[video], return_tensors="pt")


CASES = {  # video, config: what the cascade does at layers 0, 1, ...
    "cascade": (noise_video(), dict(framefusion_threshold=0.7), ["merge", "merge", "merge", "top-k"]),
    "merge, prune": (noise_video(), dict(framefusion_threshold=0.7, framefusion_min_similar=0.2), ["merge", "prune"]),
    "top-k": (blended_video(), {}, ["top-k"]),
    "merge, merge, top-k": (blended_video(seed=2), dict(framefusion_threshold=0.95), ["merge", "merge", "top-k"]),
}


@pytest.mark.parametrize("case", CASES)
def test_prefill_and_decode_equal_the_literal_rerun(ov_path, ov_processor, ov_stock, case):
    """The kept rows and their prompt positions, every prefill logit, each stage's merged and removed counts, and
    the greedy decode on each layer's own cache equal the literal re-run."""
    video, cfg, actions = CASES[case]
    inputs = one_video(ov_processor, video)
    ids, prefill, want_tokens, want_logits, trace = literal_framefusion(ov_stock["eager"], inputs, 8, cfg)
    assert [action for action, *_ in trace] == actions
    model, rows, logits, tokens, step_logits = vtr_run(ov_path, inputs, **cfg)
    assert model.vtr_config.prune_layers == [0, 1, 2, 3]
    assert rows[0].tolist() == ids.tolist()
    torch.testing.assert_close(logits[0], prefill, atol=ATOL, rtol=0)
    assert tokens[0].tolist() == want_tokens.tolist()
    torch.testing.assert_close(step_logits[0], want_logits, atol=ATOL, rtol=0)
    counts = [
        (s.merged[0], s.image_tokens_before[0] - s.image_tokens_kept[0] - s.merged[0]) for s in model.vtr_last.stages
    ]
    assert counts == [(merged, gone) for _, merged, gone in trace] + [(0, 0)] * (4 - len(trace))


def test_a_padded_batch_gives_each_prompt_its_own_run(ov_path, ov_processor):
    """Two left-padded prompts whose cascades differ (one merges then prunes, the other ends at the top-k): each
    keeps, merges and decodes as it does alone."""
    cfg = dict(framefusion_threshold=0.7, framefusion_min_similar=0.2)
    texts = [
        ov_chat(ov_processor, "What moves?", ("video",)),
        ov_chat(ov_processor, "Describe it. Is it a car?", ("video",)),
    ]
    videos = [noise_video(), blended_video()]
    batch = ov_processor(text=texts, videos=videos, return_tensors="pt", padding=True)
    _, rows, logits, tokens, step_logits = vtr_run(ov_path, batch, **cfg)
    for b, (text, video) in enumerate(zip(texts, videos)):
        inputs = ov_processor(text=[text], videos=[video], return_tensors="pt")
        _, alone, alone_logits, alone_tokens, alone_steps = vtr_run(ov_path, inputs, **cfg)
        pad = int((batch["attention_mask"][b] == 0).sum())
        real = rows[b] >= pad
        assert (rows[b][real] - pad).tolist() == alone[0].tolist()
        torch.testing.assert_close(logits[b][real], alone_logits[0], atol=ATOL, rtol=0)
        assert tokens[b].tolist() == alone_tokens[0].tolist()
        torch.testing.assert_close(step_logits[b], alone_steps[0], atol=ATOL, rtol=0)


def test_the_schedule_it_fills_in_and_its_refusals(ov_path, ov_processor, ov_stock):
    model = load_model(ov_path, VTRConfig(strategy="framefusion"), attn_implementation="eager")
    config = model.vtr_config
    assert config.prune_layers == [0, 1, 2, 3] and config.budget_defaulted
    assert tuple(model.vtr_conventions())[:3] == ("previous", "original", "keep")
    model.set_vtr_config(VTRConfig(strategy="framefusion", convention="common"))
    assert model.vtr_config.prune_layers == [0, 1, 2, 3]
    inputs = ov_processor(text=[ov_chat(ov_processor, kinds=("image",))], images=demo_image(64), return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, ov_stock["eager"](**inputs).logits, atol=ATOL, rtol=0)
    assert [stage.merged[0] for stage in model.vtr_last.stages] == [0, 0, 0, 0]  # an image alone is left whole
    model.set_vtr_config(VTRConfig(strategy="framefusion", token_merge=False))
    with pytest.raises(ValueError, match="framefusion merges tokens .* token_merge=False"):
        model(**one_video(ov_processor, noise_video()))


def test_an_explicit_ratio_is_read_once_and_never_said_to_compound(caplog):
    """keep_ratio sets FrameFusion's cost once: the schedule it fills in carries it per stage, so the config does not
    warn that it compounds over the stages."""
    config = VTRConfig(strategy="framefusion", keep_ratio=0.3)
    updates = get_strategy("framefusion").schedule_defaults(config, 4)
    assert updates == {"prune_layer": [0, 1, 2, 3], "keep_ratio": [0.3] * 4}
    caplog.clear()
    VTRConfig(strategy="framefusion", **updates)
    assert "compound" not in caplog.text and "applies at each" not in caplog.text
