"""DyCoke: TTM restated from the official code's loops (KD-TAO/DyCoke dd74634, llava_arch.py `dycole_ttm`) on
hand-built frames and through the tiny LLaVA-OneVision, and the decode-time KV pruning against the stock decoder
layers run on the pruned prompt with a mask per layer that hides, at each step, the rows an independent top-k of
the eager attention of layer L-1 picks (the gate recomputed too)."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
import vtr_oracle

from llava.vtr import VTRConfig
from llava.vtr.strategy import get_strategy, register_strategy
from llava.vtr.strategy.dycoke import DyCoke
from llava.vtr.tiny import demo_video
from llava_testlib import hand_video, onevision_embed, ov_chat, vtr_model

# ----------------------------------------------------------------------------------------------- TTM


def official_ttm(x: torch.Tensor, per_frame: int, k: float) -> list[int]:
    """The official TTM's output as indices into x [F*T, D] (frame-major), restated from its two loops and calls, in
    x's dtype: pairs (i, i+1) for i = 0, 2, ... < nf-1, the similarity `cosine_similarity(normalize(A),
    normalize(B))`; then (i, i+2) for i = 0, 4, ... < nf-4, `cosine_similarity(A, C)` of the raw features; each
    pruned frame keeps `topk(similarity, int((1-k) T), largest=False).indices` (sorted: ascending similarity, ties
    as topk breaks them)."""
    nf = x.shape[0] // per_frame
    keep = int((1 - k) * per_frame)
    frame = [torch.arange(i * per_frame, (i + 1) * per_frame) for i in range(nf)]
    out = {}
    for i in range(0, nf - 1, 2):
        a, b = F.normalize(x[frame[i]], p=2, dim=1), F.normalize(x[frame[i + 1]], p=2, dim=1)
        out[i], out[i + 1] = frame[i], frame[i + 1][F.cosine_similarity(a, b, dim=1).topk(keep, largest=False).indices]
    for i in range(0, nf - 4, 4):
        similarity = F.cosine_similarity(x[frame[i]], x[frame[i + 2]], dim=1)
        out[i], out[i + 2] = frame[i], frame[i + 2][similarity.topk(keep, largest=False).indices]
    return torch.cat([out[i] for i in sorted(out)]).tolist()


def arrange(features: torch.Tensor, ratio: float) -> tuple[list[int], list[int]]:
    """(the flat token indices DyCoke hands the LLM for a video of `features`, in order; the prompt rows it
    records as decode candidates), the prompt's rows renumbered by 100 + row to tell them apart."""
    video = hand_video(features)
    ctx = {"original_index": torch.arange(int(video.rows.max()) + 1) + 100, "vtr_ctx": {}}
    arrangement = get_strategy("dycoke")().arrange(video, ratio, VTRConfig(strategy="dycoke"), ctx)
    (candidates,) = ctx["vtr_ctx"]["dycoke_decode_candidates"]
    return arrangement.tensors()[1].tolist(), candidates.tolist()


def arranged(features: torch.Tensor, ratio: float) -> list[int]:
    return arrange(features, ratio)[0]


def angles(values) -> torch.Tensor:
    """[tokens, 2] unit vectors at these angles: the cosine of two tokens is the cosine of their angle difference."""
    values = torch.tensor(values, dtype=torch.float32)
    return torch.stack([values.cos(), values.sin()], -1)


def test_a_pruned_frame_keeps_its_least_similar_tokens_most_dissimilar_first():
    first = angles([0.0] * 5)
    second = angles([0.5, 1.5, 0.1, 2.5, 1.0])  # cosines to the first: 0.88, 0.07, 0.99, -0.80, 0.54
    # int(0.4 x 5) = 2 kept: token 3 (-0.80), then token 1 (0.07): not in spatial order
    kept, candidates = arrange(torch.stack([first, second]), 0.4)
    assert kept == [0, 1, 2, 3, 4, 5 + 3, 5 + 1]
    # decode candidates: the output tokens' original rows (100 + 10 + token) but the last output
    assert candidates == [110, 111, 112, 113, 114, 115 + 3]


def tied(count: int, keep: int) -> list[int]:
    """The positions the official `topk(similarity, keep, largest=False)` keeps when all `count` similarities tie
    (which it picks is torch's, on this device)."""
    return torch.ones(count).topk(keep, largest=False).indices.tolist()


def test_static_frames_are_pruned_as_topk_breaks_ties_and_a_scene_cut_keeps_what_changed():
    scene = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])  # exact: cosines are exactly 1 or -1
    whole = lambda f: list(range(4 * f, 4 * f + 4))  # noqa: E731
    pruned = lambda f, keep: [4 * f + j for j in tied(4, keep)]  # noqa: E731
    # 8 identical frames: every cosine ties at 1; 2 of 4 stay, as topk breaks the tie; frames 0, 4 and 6 whole
    # (6: the last window's third frame, which the official second pass never reaches)
    static = arranged(torch.stack([scene] * 8), 0.5)
    assert static == whole(0) + pruned(1, 2) + pruned(2, 2) + pruned(3, 2) + whole(4) + pruned(5, 2) + whole(6) + (
        pruned(7, 2)
    )
    # a new scene from frame 2 on, differing in token 2: frame 2 (against frame 0) keeps that token; frames 1 and 3
    # (against the same scene) tie again
    cut = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, -1.0]])
    video = torch.stack([scene, scene] + [cut] * 6)
    assert arranged(video, 0.25) == whole(0) + pruned(1, 1) + [8 + 2] + pruned(3, 1) + whole(4) + pruned(5, 1) + (
        whole(6) + pruned(7, 1)
    )


def official_inputs(kind: str, frames: int, dtype) -> torch.Tensor:
    """Frames [frames, 6, 8] in `dtype`: random, static (scaled copies of one frame: every cosine near 1, told apart
    by rounding alone) or near-static (one frame plus 1e-4 noise)."""
    generator = torch.Generator().manual_seed(frames)
    x = torch.randn(frames, 6, 8, generator=generator, dtype=torch.float64)
    if kind == "static":
        x = x[:1].repeat(frames, 1, 1) * torch.linspace(1, 2, frames, dtype=torch.float64)[:, None, None]
    elif kind == "near-static":
        x = x[:1].repeat(frames, 1, 1) + 1e-4 * torch.randn(frames, 6, 8, generator=generator, dtype=torch.float64)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["random", "static", "near-static"])
@pytest.mark.parametrize("frames", [5, 6, 7, 8, 9, 12, 13])
def test_ttm_equals_the_official_calls(frames, kind, dtype):
    """Kept tokens and their order equal the official calls' in the features' dtype, where the similarities are
    near-ties (static frames, half precision) as well."""
    x = official_inputs(kind, frames, dtype)
    assert arranged(x, 0.3) == official_ttm(x.reshape(-1, 8), 6, 0.7)


def test_keep_counts_are_the_officials_for_k_one_minus_ratio():
    """keep_ratio r keeps int((1 - k) T) tokens of a pruned frame with k = 1 - r, as the official code does for
    k: r = 0.2 and T = 25 keep 4 (not int(0.2 x 25) = 5), 2 x 25 + 4 x 4 = 66 of 6 frames; and every r = j / 100
    on a few frame sizes gives the official count for k = 1 - r."""
    assert len(arranged(torch.randn(6, 25, 2), 0.2)) == 66
    for per_frame in (7, 25, 49, 196):
        x = torch.randn(6 * per_frame, 2)
        for j in range(1, 100):
            ratio = j / 100
            assert len(arranged(x.reshape(6, per_frame, 2), ratio)) == len(official_ttm(x, per_frame, 1 - ratio)), j


@pytest.mark.parametrize(("frames", "count"), [(8, 878), (16, 1618), (32, 3098)])
def test_budget_counts_of_the_official_setting(frames, count):
    """k = 0.7 on 196 tokens a frame: 58 kept a pruned frame, the last window's third frame whole (official)."""
    x = torch.randn(frames, 196, 2)
    kept = arranged(x, 0.3)
    assert len(kept) == count
    per_frame = Counter(t // 196 for t in kept)
    whole = sorted(f for f, n in per_frame.items() if n == 196)
    assert set(per_frame.values()) == {196, 58}
    assert whole == [*range(0, frames, 4), frames - 2]


def test_short_and_odd_videos():
    """Fewer than five frames (the official code raises): the same pairs, no second pass; a single frame whole.
    An odd count drops its last frame, as the official pairs never reach it."""
    torch.manual_seed(0)
    x = torch.randn(9, 4, 3)
    frames_of = lambda kept: [t // 4 for t in kept]  # noqa: E731
    assert frames_of(arranged(x[:1], 0.5)) == [0] * 4
    assert frames_of(arranged(x[:2], 0.5)) == [0] * 4 + [1] * 2
    assert frames_of(arranged(x[:3], 0.5)) == [0] * 4 + [1] * 2
    assert frames_of(arranged(x[:4], 0.5)) == [0] * 4 + [1] * 2 + [2] * 4 + [3] * 2
    # 9 frames: the second pass reaches the window at 4 (4 < 9 - 4), so frame 6 is pruned; frame 8 is dropped
    assert frames_of(arranged(x, 0.5)) == [0] * 4 + [1, 1, 2, 2, 3, 3] + [4] * 4 + [5, 5, 6, 6, 7, 7]


def test_default_budget_is_the_official_k():
    model_cfg = get_strategy("dycoke").schedule_defaults(VTRConfig(strategy="dycoke"), 28)
    assert model_cfg == {"prune_layer": 0, "keep_tokens": None, "keep_ratio": 0.3}


# ----------------------------------------------------------------------------------------------- model runs


@pytest.fixture(scope="module")
def videos(ov_processor):
    """Two left-padded prompts, an 8-frame video each (4 tokens a frame after pooling, then one newline)."""
    texts = [
        ov_chat(ov_processor, "What moves?", kinds=("video",)),
        ov_chat(ov_processor, "Describe the video in detail. Is there a car?", kinds=("video",)),
    ]
    clips = [demo_video(8, 64), demo_video(8, 64)[::-1].copy()]
    return ov_processor(text=texts, videos=clips, return_tensors="pt", padding=True)


def literal_prompt(stock, inputs, kept_index):
    """The pruned prompt itself: embeddings of the kept rows in their order, compact positions and validity."""
    embeds = onevision_embed(stock, inputs)
    mask = inputs["attention_mask"].bool()
    index = kept_index.clamp_min(0)
    valid = (kept_index >= 0) & mask.gather(1, index)
    hidden = torch.stack([embeds[b, index[b]] for b in range(index.shape[0])])
    positions = vtr_oracle.compact((mask.long().cumsum(1) - 1).clamp_min(0).gather(1, index), valid)
    return hidden, positions, valid


def official_candidates(stock, inputs, kept_index) -> torch.Tensor:
    """[batch, P] bool: the official decode region [start, start + len(TTM) - 1) in the pruned prompt: the rows of
    the video's frame tokens (its placeholders but the newline closing it), but the last of them; no image row."""
    video = inputs["input_ids"] == stock.config.video_token_id
    frames = video & (video.long().cumsum(1) < video.sum(1, keepdim=True))
    region = frames.gather(1, kept_index.clamp_min(0)) & (kept_index >= 0)
    for b in range(region.shape[0]):
        region[b, region[b].nonzero().max()] = False
    return region


@torch.no_grad()
def oracle_decode(stock, inputs, kept_index, new_ids, layer, hides=None):
    """Stock decoder layers (eager) on the pruned prompt plus `new_ids` [batch, n], decode row P + t hiding
    `hides[t]` ([batch, P] bool) in layers >= `layer`. Returns (logits [batch, n + 1, vocab] of rows P-1.., the
    eager attention weights of layer `layer` - 1 [batch, heads, P + n, P + n])."""
    hidden, positions, valid = literal_prompt(stock, inputs, kept_index)
    lm = stock.model.language_model
    prompt, n = hidden.shape[1], new_ids.shape[1]
    top = positions.masked_fill(~valid, -1).amax(1, keepdim=True)
    hidden = torch.cat([hidden, stock.get_input_embeddings()(new_ids)], 1)
    positions = torch.cat([positions, top + 1 + torch.arange(n)], 1)
    valid = torch.cat([valid, torch.ones_like(new_ids, dtype=torch.bool)], 1)
    length = prompt + n
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None] & valid[:, None, :]
    late = allowed.clone()
    if hides is not None and n:
        late[:, prompt:, :prompt] &= ~torch.stack(hides[:n], 1)
    masks = [torch.zeros(a.shape).masked_fill(~a, torch.finfo(torch.float32).min)[:, None] for a in (allowed, late)]
    weights = {}
    handle = lm.layers[layer - 1].self_attn.register_forward_hook(lambda m, a, out: weights.update(w=out[1]))
    cos, sin = lm.rotary_emb(hidden, positions)
    try:
        for i, decoder_layer in enumerate(lm.layers):
            hidden = decoder_layer(hidden, attention_mask=masks[i >= layer], position_embeddings=(cos, sin))
    finally:
        handle.remove()
    return stock.lm_head(lm.norm(hidden))[:, prompt - 1 :], weights["w"]


def expected_hides(weights, candidates, steps: int, gate: float, prune: float):
    """Per decode step t (query row P + t): the candidate rows an independent top-k of layer L-1's attention (mean
    over heads) hides, when the cosine over them to the step before is below `gate` (the first step always)."""
    prompt = candidates.shape[1]
    hides, previous, similarities = [], None, []
    for t in range(steps):
        v = weights[:, :, prompt + t, :prompt].mean(1) * candidates
        hide = torch.zeros_like(candidates)
        for b in range(candidates.shape[0]):
            similarity = None if previous is None else float(F.cosine_similarity(v[b], previous[b], dim=0))
            similarities.append(similarity)
            if similarity is None or similarity < gate:
                rows = candidates[b].nonzero().reshape(-1)
                count = int(rows.numel() * (1 - prune))
                top = rows[torch.topk(v[b, rows], count).indices]
                hide[b, rows] = True
                hide[b, top] = False
        hides.append(hide)
        previous = v
    return hides, similarities


def generate(ov_path, impl, videos, steps, **cfg):
    model = vtr_model(ov_path, impl, strategy="dycoke", keep_ratio=0.75, dycoke_layer=2, **cfg)
    out = model.generate(
        **videos, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    return model.vtr_last, out.sequences[:, videos["input_ids"].shape[1] :], torch.stack(out.logits, 1)


def split_gate(ov_path, ov_stock, videos) -> float:
    """A gate between the two samples' cosines at the second decode step (the path to it is the same whatever
    the gate: the first step always prunes), so one sample prunes there and the other does not."""
    record, new, _ = generate(ov_path, "eager", videos, 3, dycoke_gate=1.0)
    _, weights = oracle_decode(ov_stock["eager"], videos, record.kept_index, new[:, :2], 2)
    candidates = official_candidates(ov_stock["eager"], videos, record.kept_index)
    _, similarities = expected_hides(weights, candidates, 2, 1.0, 0.8)
    return sum(similarities[2:4]) / 2


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("gate", [0.9, 1.0, "split"])
def test_decode_equals_masking_oracle(ov_path, ov_stock, videos, impl, gate):
    """Greedy generate on a padded video batch: TTM's kept rows in the official order, and at each decode step the
    rows hidden from layers >= L are those an independent top-k of the eager attention picks, gated; the logits
    equal the stock layers run with those rows masked."""
    steps, stock = 5, ov_stock["eager"]
    gate = split_gate(ov_path, ov_stock, videos) if gate == "split" else gate
    record, new, logits = generate(ov_path, impl, videos, steps, dycoke_gate=gate)
    # TTM: each sample's video rows in the official order (int(0.75 x 4) = 3 kept a pruned frame)
    with torch.no_grad():
        embeds = onevision_embed(stock, videos)
    for b in range(2):
        rows = (videos["input_ids"][b] == stock.config.video_token_id).nonzero().reshape(-1)
        frames = rows[:-1]  # the newline closing the video is no frame's
        expected = frames[official_ttm(embeds[b, frames], 4, 0.25)].tolist() + [int(rows[-1])]
        assert [r for r in record.kept_index[b].tolist() if r in set(rows.tolist())] == expected
    assert min(record.stages[0].merged) > 0  # some pruned frames' tokens came out of prompt order
    # decode: one record per step after the first token, each hiding exactly the independent selection
    assert len(record.decode) == steps - 1 and all(d.layer == 2 for d in record.decode)
    _, weights = oracle_decode(stock, videos, record.kept_index, new[:, : steps - 1], 2)
    candidates = official_candidates(stock, videos, record.kept_index)
    hides, similarities = expected_hides(weights, candidates, steps - 1, gate, 0.8)
    for t, (got, want) in enumerate(zip(record.decode, hides)):
        assert torch.equal(got.hidden, want), f"step {t}"
    expected_logits, _ = oracle_decode(stock, videos, record.kept_index, new[:, : steps - 1], 2, hides)
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)
    pruned = [h.any(1).tolist() for h in hides]
    assert pruned[0] == [True, True]  # the first step of each prompt always prunes
    # int(n x 0.2) of a sample's n candidates stay visible when it prunes: n = len(TTM) - 1 = 3 x 4 (frames 0, 4,
    # 6 whole) + 5 x 3 - 1 = 26 (the official img_len: the last TTM row and the newline are no candidates), 5 visible
    assert candidates.sum(1).tolist() == [26, 26] and hides[0].sum(1).tolist() == [21, 21]
    if gate == 0.9:  # the tiny model's consecutive attentions are all closer than 0.9: no later step prunes
        assert not any(any(p) for p in pruned[1:]), similarities
    elif gate == 1.0:
        assert all(all(p) for p in pruned), similarities
    else:
        assert sorted(pruned[1]) == [False, True], similarities


def test_images_and_the_last_ttm_row_are_never_candidates(ov_path, ov_stock, ov_batch):
    """An image, then a 4-frame video, in each prompt of a padded batch: the decode steps rank, count and gate over
    the official region only, the video's TTM rows but the last (4 + 2 + 4 + 2 - 1 = 11, 2 seen when a step prunes):
    the image's rows, the last TTM row and the newline after the video are always seen."""
    steps, stock = 4, ov_stock["eager"]
    model = vtr_model(ov_path, "sdpa", strategy="dycoke", keep_ratio=0.5, dycoke_layer=2, dycoke_gate=1.0)
    new = model.generate(**ov_batch, max_new_tokens=steps, do_sample=False)[:, ov_batch["input_ids"].shape[1] :]
    kept = model.vtr_last.kept_index
    candidates = official_candidates(stock, ov_batch, kept)
    images = (ov_batch["input_ids"].gather(1, kept.clamp_min(0)) == stock.config.image_token_id) & (kept >= 0)
    assert candidates.sum(1).tolist() == [11, 11] and bool(images.any(1).all())
    _, weights = oracle_decode(stock, ov_batch, kept, new[:, : steps - 1], 2)
    hides, _ = expected_hides(weights, candidates, steps - 1, 1.0, 0.8)
    assert [d.hidden.tolist() for d in model.vtr_last.decode] == [h.tolist() for h in hides]
    assert all(h.sum(1).tolist() == [9, 9] for h in hides)


def sample_inputs(inputs, b: int) -> dict:
    """Sample `b` of a batch of one video a prompt."""
    return {k: v[b : b + 1] for k, v in inputs.items()}


@register_strategy("test_dycoke_beams")
class BeamWatch(DyCoke):
    """DyCoke that checks, at each step, that its per-row state followed beam search's reordering of the cache: the
    key of the token the previous step appended, which it kept, is the cache's own again. `log`: per step (followed,
    some row moved)."""

    log: list = []

    def decode_keep(self, attention, visual, state, config, query_len):
        keys = attention.keys[:, :, -2]  # the previous step's token, in this step's (reordered) rows
        if "last" in state:
            self.log.append((torch.equal(keys, state["last"]), not torch.equal(keys, state["unordered"][0])))
        state["last"] = attention.keys[:, :, -1]
        state["unordered"] = [state["last"]]  # in a list: the engine leaves it as it is
        return super().decode_keep(attention, visual, state, config, query_len)


def test_beams_follow_their_own_paths(ov_path, ov_stock, videos):
    """Beam search reorders the strategy's per-row state with the cache, and each returned sequence's score is the
    log-probability the masking oracle gives its own path, the gate computed along that path."""
    stock, gate = ov_stock["eager"], split_gate(ov_path, ov_stock, videos)
    BeamWatch.log.clear()
    model = vtr_model(ov_path, "sdpa", strategy="test_dycoke_beams", keep_ratio=0.75, dycoke_layer=2, dycoke_gate=gate)
    out = model.generate(
        **videos,
        max_new_tokens=5,
        do_sample=False,
        num_beams=3,
        num_return_sequences=3,
        length_penalty=0.0,
        return_dict_in_generate=True,
        output_scores=True,
    )
    log = BeamWatch.log
    assert len(log) == 3 and all(followed for followed, _ in log) and any(moved for _, moved in log), log
    new = out.sequences[:, videos["input_ids"].shape[1] :]
    for row in range(new.shape[0]):
        b, path = row // 3, new[row : row + 1]
        inputs, kept = sample_inputs(videos, b), model.vtr_last.kept_index[row : row + 1]
        _, weights = oracle_decode(stock, inputs, kept, path[:, :-1], 2)
        hides, _ = expected_hides(weights, official_candidates(stock, inputs, kept), path.shape[1] - 1, gate, 0.8)
        logits, _ = oracle_decode(stock, inputs, kept, path[:, :-1], 2, hides)
        score = logits.log_softmax(-1).gather(2, path[..., None]).sum()
        torch.testing.assert_close(out.sequences_scores[row], score, atol=1e-4, rtol=1e-4)


def test_each_prompt_starts_its_own_gate(ov_path, videos):
    """The previous step's attention is per prompt: a second generate() prunes at its first step again."""
    model = vtr_model(ov_path, "sdpa", strategy="dycoke", dycoke_gate=-1.0)  # later steps never prune
    for _ in range(2):
        model.generate(**videos, max_new_tokens=3, do_sample=False)
        assert [d.hidden.any(1).tolist() for d in model.vtr_last.decode] == [[True, True], [False, False]]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"dycoke_layer": 4}, r"layers >= 4 .* must be in \[1, 3\]"),
        ({"dycoke_layer": 2, "prune_layer": 3}, "prune at a layer <= 1"),
        ({"kernel": "flash_attention_2"}, "attn_implementation='flash_attention_2' cannot take"),
    ],
)
def test_refusals(ov_path, videos, settings, message):
    settings = dict(settings)
    kernel = settings.pop("kernel", None)
    model = vtr_model(ov_path, "sdpa", strategy="dycoke", **settings)
    if kernel is not None:
        model.model.language_model.config._attn_implementation = kernel  # as if loaded so
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(**videos)


def test_without_decode_pruning_there_is_no_decode_hook(ov_path, ov_batch):
    """dycoke_decode_prune=0: DyCoke is its TTM alone (no decode layer, so it also runs on decoders a decode hook
    cannot reach, such as Qwen3.5's recurrent layers); decode steps record nothing."""
    assert get_strategy("dycoke")().decode_layer(VTRConfig(strategy="dycoke", dycoke_decode_prune=0.0)) is None
    model = vtr_model(ov_path, "sdpa", strategy="dycoke", keep_ratio=0.5, dycoke_decode_prune=0.0)
    model.generate(**ov_batch, max_new_tokens=3, do_sample=False)
    assert model.vtr_last.decode == [] and model.vtr_last.stages[0].layer == 0
