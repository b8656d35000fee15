"""VidCom2: the official per-frame budgets and picks restated here on hand-built frames, LLaVA-Video's newlines, and
the tiny LLaVA-OneVision in its own and LLaVA-Video's layout."""

import math

import pytest
import torch
import torch.nn.functional as F

import llava.vtr.strategy.vidcom2  # noqa: F401 (registers vidcom2)
from llava.vtr import VTRConfig, get_strategy, load_model, load_processor
from llava.vtr.tiny import build_tiny_llava_onevision
from llava_testlib import hand_video, ov_videos


def official_picks(frames, ratio):
    """xuyang-liu16/VidCom2 `vidcom2_compression` restated as formulas, in float64, for T [N, D] frames: per frame,
    the sorted indices kept. Channels: the D // 2 of lowest population variance; tokens L2-normalised over them;
    similarity to the video's and to the frame's mean token: sum over a = 2^-3..2^1 of exp(-d^2 / 2a); frame
    uniqueness -mean(video similarity), softmax at temperature 0.01; k_t = max(1, round(min(1, ratio (1 + p_t -
    1/T)) N)) (half to even); the k_t smallest video + frame similarities (for inputs without ties there: which
    tied token the official code keeps is `official_calls`' to say)."""
    count, per_frame, dim = len(frames), frames[0].shape[0], frames[0].shape[1]
    tokens = torch.cat(frames).double()
    variance = ((tokens - tokens.mean(0)) ** 2).mean(0)
    channels = sorted(range(dim), key=lambda c: float(variance[c]))[: dim // 2]
    x = tokens[:, channels]
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def kernel(a, b):
        d2 = float(((a - b) ** 2).sum())
        return sum(math.exp(-d2 / (2 * 2.0**k)) for k in range(-3, 2))

    video_centre = x.mean(0)
    picks, uniqueness, scores = [], [], []
    for t in range(count):
        frame = x[t * per_frame : (t + 1) * per_frame]
        to_video = [kernel(row, video_centre) for row in frame]
        scores.append([v + kernel(row, frame.mean(0)) for v, row in zip(to_video, frame)])
        uniqueness.append(-sum(to_video) / per_frame)
    weights = [math.exp((u - max(uniqueness)) / 0.01) for u in uniqueness]
    for t in range(count):
        scale = min(1.0, ratio * (1 + weights[t] / sum(weights) - 1 / count))
        k = max(1, round(scale * per_frame))
        picks.append(sorted(sorted(range(per_frame), key=lambda i: (scores[t][i], i))[:k]))
    return picks


def official_calls(frames, ratio):
    """The official `vidcom2_compression` (linear mapping) restated call by call, in the dtype of `frames` [T, N, D]
    as it runs: per frame, the sorted indices kept, a tie at the k-th score going as its
    `torch.topk(scores[t], k, largest=False, sorted=False)` breaks it."""
    count, n, dim = frames.shape
    flat = frames.reshape(count * n, dim)
    _, channels = torch.topk(flat.var(dim=0, unbiased=False), k=int(dim * 0.5), largest=False)
    x = F.normalize(flat[:, channels].view(-1, n, channels.numel()), dim=-1)

    def gaussian(centre):
        squared = ((x - centre) ** 2).sum(dim=-1)
        return sum(torch.exp(-squared / (2 * a)) for a in [2**k for k in range(-3, 2)])

    to_video, to_frame = gaussian(x.mean(dim=(0, 1), keepdim=True)), gaussian(x.mean(dim=1, keepdim=True))
    uniqueness = -to_video.mean(dim=-1)
    p = F.softmax((uniqueness - uniqueness.max()) / 0.01, dim=0)
    ks = ((ratio * (1 + p - p.mean())).clamp(max=1.0) * n).round().long().clamp(min=1).tolist()
    scores = to_video + to_frame
    return [
        torch.topk(scores[t], k=k, largest=False, sorted=False).indices.sort().values.tolist() for t, k in enumerate(ks)
    ]


def output(video, ratio):
    """VidCom2's output tokens of `video` as (frame, token in the frame) in order; checks nothing is merged."""
    arrangement = get_strategy("vidcom2")().arrange(video, ratio, VTRConfig(strategy="vidcom2"), {})
    mix, representative, frame = arrangement.tensors()
    mix = mix.to_dense()
    assert torch.equal(mix, torch.eye(mix.shape[1])[representative])
    assert torch.equal(frame, representative // video.shape[1])
    return [divmod(int(r), video.shape[1]) for r in representative]


def per_frame(video, ratio):
    got = output(video, ratio)
    return [[i for f, i in got if f == t] for t in range(video.shape[0])]


def scene(count, tokens, dim=8, seed=0):
    return torch.randn(count, tokens, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.8])
def test_random_videos_keep_the_official_picks(ratio):
    frames = scene(6, 12)
    assert per_frame(hand_video(frames), ratio) == official_picks(list(frames), ratio)


def test_a_static_video_splits_the_budget_evenly_rounding_half_to_even():
    """Equal frames are equally unique (p = 1/T): each keeps round(ratio N): 2.5 -> 2, 3.5 -> 4."""
    frames = scene(1, 10).repeat(4, 1, 1)
    assert [len(k) for k in per_frame(hand_video(frames), 0.25)] == [2, 2, 2, 2]
    assert [len(k) for k in per_frame(hand_video(frames), 0.35)] == [4, 4, 4, 4]
    assert per_frame(hand_video(frames), 0.35) == official_picks(list(frames), 0.35)


def test_a_new_scene_gets_the_larger_budget_and_the_sum_is_not_forced():
    """Three frames of one scene, then a cut: the cut frame is the most unique, p ~ 1 there: it keeps
    round(0.3 x (2 - 1/4) x 10) = 5, the others round(0.3 x 3/4 x 10) = 2: 11 tokens, not 0.3 x 40 = 12."""
    first, second = scene(1, 10, seed=1), scene(1, 10, seed=2)
    frames = torch.cat([first, first + 1e-3, first - 1e-3, second])
    got = per_frame(hand_video(frames), 0.3)
    assert [len(k) for k in got] == [2, 2, 2, 5]
    assert got == official_picks(list(frames), 0.3)


def test_every_frame_keeps_one_token_at_least():
    frames = scene(5, 12, seed=3)
    assert [len(k) for k in per_frame(hand_video(frames), 0.01)] == [1] * 5


def tie_prone(count, tokens, dim, dtype, seed, background):
    """Frames [count, tokens, dim] in `dtype`, random, unless `background`: then their first half of tokens repeat
    three vectors (a flat background: exact ties in the scores)."""
    generator = torch.Generator().manual_seed(seed)
    frames = torch.randn(count, tokens, dim, generator=generator) * torch.rand(dim, generator=generator) * 3
    if background:
        palette = torch.randn(3, dim, generator=generator)
        frames[:, : tokens // 2] = palette[torch.randint(0, 3, (count, tokens // 2), generator=generator)]
    return frames.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("background", [False, True])
def test_ties_go_as_the_official_topk_breaks_them(dtype, background):
    """In the features' dtype (fp16/bf16 scores tie often) and with a flat background (repeated tokens tie
    exactly), the kept tokens are those of the official calls: its topk(sorted=False), not the earlier token."""
    for seed, (count, tokens, dim) in enumerate([(4, 16, 12), (8, 25, 32), (16, 36, 64), (6, 196, 24)]):
        for ratio in (0.1, 0.25, 0.5):
            frames = tie_prone(count, tokens, dim, dtype, seed, background)
            assert per_frame(hand_video(frames), ratio) == official_calls(frames, ratio), (seed, ratio)


def test_llava_video_newlines_are_kept_after_the_frame_tokens():
    """LLaVA-Video's grid layout (3 rows of 3 tokens, each closed by a newline): the newlines are not scored, and each
    frame is its kept tokens in order, then its 3 newlines (the official mapping: token r*3+c at r*4+c, newlines at
    r*4+3); a CLS opening each frame (Video-LLaVA) stays first."""
    grid = torch.tensor([[r, c] for r in range(3) for c in (0, 1, 2, -1)])
    grid[grid[:, 1] < 0] = -1
    frames = scene(4, 12, seed=5)
    frames[:, 3::4] = 7.0  # the newline vector
    on = (grid[:, 0] >= 0).nonzero().reshape(-1)
    want = official_picks(list(frames[:, on]), 0.4)
    expected = [(t, r * 4 + c) for t, picks in enumerate(want) for r, c in (divmod(i, 3) for i in picks)]
    expected = [x for t in range(4) for x in [e for e in expected if e[0] == t] + [(t, 3), (t, 7), (t, 11)]]
    assert output(hand_video(frames, grid), 0.4) == expected
    with_cls = torch.cat([torch.full((1, 2), -1), grid])
    frames = torch.cat([torch.ones(4, 1, 8, dtype=torch.float64), frames], 1)
    assert output(hand_video(frames, with_cls), 0.4) == [
        x for t in range(4) for x in [(t, 0)] + [(f, i + 1) for f, i in expected if f == t]
    ]


def test_conventions():
    strategy = get_strategy("vidcom2")
    assert (strategy.positions, strategy.mrope_positions) == ("compact", "original")


def run(path, inputs, ratio):
    """(the merged input embeddings of an unpruned run, the VTR model after a vidcom2 run at `ratio`)."""
    stock = load_model(path, VTRConfig(enabled=False), attn_implementation="sdpa")
    seen = {}
    stock.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    model = load_model(path, VTRConfig(strategy="vidcom2", keep_ratio=ratio), attn_implementation="sdpa")
    with torch.no_grad():
        stock(**inputs)
        model(**inputs)
    return seen["embeds"], model


def test_on_the_tiny_onevision(ov_path, ov_processor):
    """A padded batch of two 4-frame videos of 4 tokens a frame, then the video's one newline (kept)."""
    inputs = ov_videos(ov_processor)
    embeds, model = run(ov_path, inputs, 0.5)
    stage = model.vtr_last.stages[0]
    for b in range(2):
        where = (inputs["input_ids"][b] == model.config.video_token_id).nonzero().reshape(-1)
        picks = official_picks(list(embeds[b, where[:16]].reshape(4, 4, -1)), 0.5)
        want = [int(where[t * 4 + i]) for t, p in enumerate(picks) for i in p] + [int(where[16])]
        assert stage.kept_positions[b].tolist() == want and stage.merged[b] == 0


def test_on_the_llava_video_layout(tmp_path):
    """LLaVA-Video's layout (4 frames of 2 rows of 2 + a newline): the LLM gets each frame's kept tokens, then that
    frame's two newlines."""
    path = str(
        build_tiny_llava_onevision(
            tmp_path,
            image_size=40,
            grid_pinpoints=((40, 80), (80, 40), (80, 80)),
            newline_position="grid",
            pool_mode="average",
        )
    )
    inputs = ov_videos(load_processor(path))
    embeds, model = run(path, inputs, 0.5)
    record = model.vtr_last
    for b in range(2):
        where = (inputs["input_ids"][b] == model.config.video_token_id).nonzero().reshape(-1).reshape(4, 6)
        grid = where[:, [0, 1, 3, 4]]
        picks = official_picks(list(embeds[b, grid]), 0.5)
        want = [p for t in range(4) for p in grid[t, picks[t]].tolist() + where[t, [2, 5]].tolist()]
        rows = record.kept_index[b]
        assert [p for p in rows.tolist() if p in set(where.reshape(-1).tolist())] == want
