"""FastVID: the arrangement of a video against the official LLaVA-OneVision rules restated from the facts (DySeg,
budgets, salient tokens, density anchors, merging), by hand and on the tiny OneVision model."""

import math

import pytest
import torch

from llava.vtr import VTRConfig, get_strategy, load_model
from llava.vtr.strategy.fastvid import FastVID  # registers it
from llava.vtr.strategy.video import Video
from llava.vtr.tiny import demo_video
from llava_testlib import ov_chat


def official(features, importance, ratio, c=8, tau=0.9, d=0.4, p=4, beta=0.6, seed=0):
    """The output tokens of one video under the official LLaVA-OneVision code, restated from the facts in plain
    Python (features [T, n, D], importance [T, n]; float64 but for the density): {(frame, token): value}."""
    features = features.detach().double()
    frames, n, width = features.shape
    g = features.mean(1)
    g = g / g.norm(dim=1, keepdim=True)
    s = [float(g[i] @ g[i + 1]) for i in range(frames - 1)]
    lowest = sorted(range(frames - 1), key=lambda i: (s[i], i))[: c - 1]
    cuts = sorted(set(lowest) | {i for i in range(frames - 1) if s[i] < tau})
    bounds = [-1, *cuts, frames - 1]
    segments = [list(range(a + 1, b + 1)) for a, b in zip(bounds, bounds[1:])]
    retain = int(n * ratio)
    salient_count = retain - int(retain * d)
    share = retain - salient_count
    alloc = [0] * frames
    for segment in segments:
        length = len(segment)
        for j, t in enumerate(segment):
            if (length - 1 - j) % p == 0:
                alloc[t] = (share * length) // ((length + p - 1) // p)
    out, rest = {}, []
    for t in range(frames):
        salient = sorted(range(n), key=lambda j: (-float(importance[t, j]), j))[:salient_count]
        out.update({(t, j): features[t, j] for j in salient})
        rest.append([j for j in range(n) if j not in salient])
    noise = torch.rand((frames, n - salient_count), generator=torch.Generator().manual_seed(seed)) * 1e-6
    for segment in segments:
        for t in segment:
            if alloc[t] == 0:
                continue
            x = features[t, rest[t]].float()  # the density in float32, as theirs
            m = len(rest[t])
            dist = torch.tensor([[(x[i] - x[j]).norm() / math.sqrt(width) for j in range(m)] for i in range(m)])
            rho = [torch.exp(-(dist[i].sort().values[:4] ** 2).mean()) + noise[t, i] for i in range(m)]
            top = dist.max()
            delta = [min([dist[i, j] for j in range(m) if rho[j] > rho[i]], default=top) for i in range(m)]
            anchors = sorted(range(m), key=lambda i: (-float(delta[i] * rho[i]), i))[: alloc[t]]
            pool = [(t, j) for j in rest[t]] if alloc[t] == share else [(u, j) for u in segment for j in rest[u]]
            centres = [features[t, rest[t][a]] for a in anchors]
            members = [[] for _ in anchors]
            for u, j in pool:
                y = features[u, j]
                cos = [float(y @ a / (y.norm() * a.norm())) for a in centres]
                members[cos.index(max(cos))].append(y)
            for a, centre, group in zip(anchors, centres, members):
                w = max(1 / (len(group) + 1), beta)
                mean = torch.stack(group).mean(0) if group else torch.zeros_like(centre)
                out[(t, rest[t][a])] = w * centre + (1 - w) * mean
    return out


def square_grid(side: int) -> torch.Tensor:
    return torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)


def arrange(features, importance, ratio, grid=None, **fields):
    """The strategy's arrangement of a hand-built video (frames x tokens at rows 5.. of a prompt): (values [m, D],
    representatives [m] flat, frames [m], weights [m, frames x tokens])."""
    frames, width, _ = features.shape
    grid = square_grid(math.isqrt(width)) if grid is None else grid
    rows = torch.arange(frames * width).reshape(frames, width)
    video = Video(rows + 5, rows, features, grid.expand(frames, width, 2))
    config = VTRConfig(strategy="fastvid", keep_ratio=ratio, **fields)
    ctx = {"vision_importance": lambda: importance.reshape(-1)}
    mix, representative, frame = get_strategy("fastvid")().arrange(video, ratio, config, ctx).tensors()
    mix = mix.to_dense() if mix.is_sparse else mix
    return mix @ features.reshape(frames * width, -1).float(), representative, frame, mix


def scenes(lengths, n=16, width=12, jitter=0.05, seed=0):
    """Frames [T, n, width] of scenes of `lengths` frames: a scene is random tokens, its frames small changes of it."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for length in lengths:
        base = torch.randn(n, width, generator=generator)
        out += [base + jitter * torch.randn(n, width, generator=generator) for _ in range(length)]
    return torch.stack(out)


def per_frame(representative, frames: int, width: int) -> list[int]:
    """How many of the output tokens take each frame's place."""
    return torch.bincount(representative // width, minlength=frames).tolist()


@pytest.mark.parametrize(
    "lengths, fields, ratio",
    [
        ([1, 5, 6], dict(fastvid_segments=2), 0.5),  # cuts by tau and the lowest; 5- and 6-frame segments
        ([1, 5, 6], {}, 0.5),  # c = 8: seven lowest cuts
        ([9], dict(fastvid_segments=1, fastvid_anchor_stride=3, seed=3), 0.5),
        ([3, 2], dict(fastvid_segments=1, fastvid_beta=0.3), 0.6),  # beta below 1/2: w = 1/2 with one member
        # C = 1, a 3-frame segment, p = 2: frames 0 and 2 get 3 // 2 = 1 = C, so each merges its own frame only
        ([3, 4], dict(fastvid_segments=1, fastvid_anchor_stride=2), 0.25),
    ],
)
def test_the_arrangement_is_the_official_one(lengths, fields, ratio):
    """Kept and merged tokens, their values and order equal the official rules restated by hand; a frame holds two
    copies of one token (the seeded noise decides which is denser)."""
    features = scenes(lengths)
    features[2, 7] = features[2, 9]
    importance = torch.rand(features.shape[:2], generator=torch.Generator().manual_seed(1))
    values, representative, frame, _ = arrange(features, importance, ratio, **fields)
    names = {"fastvid_segments": "c", "fastvid_anchor_stride": "p", "fastvid_beta": "beta", "seed": "seed"}
    want = official(features, importance, ratio, **{names[k]: v for k, v in fields.items()})
    n = features.shape[1]
    assert [(int(r) // n, int(r) % n) for r in representative] == sorted(want)  # every frame, index order
    assert torch.equal(frame, representative // n)
    torch.testing.assert_close(values.double(), torch.stack([want[k] for k in sorted(want)]), atol=1e-5, rtol=0)


def test_static_frames_collapse_into_two_anchor_frames():
    """Eight copies of one frame make one segment: every frame keeps its S salient tokens, and only frames 3 and 7
    (the last and every 4th before it) hold anchors, 8 x C / 2 each."""
    frame = scenes([1], n=25)[0]
    features = frame.expand(8, -1, -1).clone()
    importance = torch.rand(25, generator=torch.Generator().manual_seed(0)).expand(8, -1)
    _, representative, *_ = arrange(features, importance, 0.5, fastvid_segments=1)
    retain = int(25 * 0.5)  # 12: C = int(4.8) = 4, S = 8
    assert per_frame(representative, 8, 25) == [8, 8, 8, 8 + 16, 8, 8, 8, 8 + 16]
    assert representative.numel() == 8 * retain


def test_a_scene_cut_opens_a_new_segment():
    """Scenes of 3 and 5 frames: the cut after frame 2 (similarity below tau) gives segments [3, 5]: 3 C on frame 2,
    5 C // 2 on frames 3 and 7, whose merged tokens mix only the second scene's tokens. Without the cut (tau = -1)
    one segment of 8 puts 4 C on frames 3 and 7."""
    features = scenes([3, 5], n=25)
    importance = torch.rand(features.shape[:2], generator=torch.Generator().manual_seed(2))
    n, salient, share = 25, 6, 4  # ratio 0.4: R = 10, C = 4
    _, representative, _, mix = arrange(features, importance, 0.4, fastvid_segments=1)
    want = [salient] * 8
    want[2] += 3 * share
    want[3] += 5 * share // 2
    want[7] += 5 * share // 2
    assert per_frame(representative, 8, n) == want
    for row, token in zip(mix, representative):
        sources = row.nonzero().reshape(-1) // n
        assert (sources < 3).all() if token // n < 3 else (sources >= 3).all()
    _, whole, *_ = arrange(features, importance, 0.4, fastvid_segments=1, fastvid_tau=-1.0)
    want = [salient] * 8
    want[3] += 4 * share
    want[7] += 4 * share
    assert per_frame(whole, 8, n) == want


def test_budget_counts_and_floors():
    """196 tokens a frame at ratio 0.1: R = int(19.6) = 19, S = 12, C = 7. Segments of 1, 2, 4, 5 and 8 frames give
    7; 14 on the last; 28 on the last; 17 on the first and last; 28 on frames 3 and 7 (5 x 7 // 2 drops one)."""
    features = scenes([1, 2, 4, 5, 8], n=196, width=8, jitter=0.01)
    importance = torch.rand(features.shape[:2], generator=torch.Generator().manual_seed(0))
    _, representative, *_ = arrange(features, importance, 0.1, fastvid_segments=1)
    anchors = [7, 0, 14, 0, 0, 0, 28, 17, 0, 0, 0, 17, 0, 0, 0, 28, 0, 0, 0, 28]
    assert per_frame(representative, 20, 196) == [12 + a for a in anchors]


def test_a_frame_wanting_more_anchors_than_tokens_takes_them_all():
    """ratio 1 on 4 tokens: S = 3, C = 1; a 2-frame segment wants 2 anchors on its last frame, which has 1 left."""
    features = scenes([2], n=4, jitter=0.0)
    _, representative, *_ = arrange(features, torch.rand(2, 4), 1.0, fastvid_segments=1)
    assert per_frame(representative, 2, 4) == [3, 4]


def test_ties_go_to_the_earlier_token_and_the_earlier_cut():
    """Equal importance: the first S tokens are salient. Identical frames (equal similarities): c = 3 cuts after
    frames 0 and 1, so frames 0 and 1 are single-frame segments (C each) and 2..7 one segment (3 C on 3 and 7)."""
    features = scenes([1], n=25)[0].expand(8, -1, -1).clone()
    _, representative, frame, _ = arrange(features, torch.ones(8, 25), 0.4, fastvid_segments=3)
    assert per_frame(representative, 8, 25) == [6 + 4, 6 + 4, 6, 6 + 12, 6, 6, 6, 6 + 12]
    for t in range(8):
        mine = representative[frame == t] % 25
        assert set(range(6)) <= set(mine.tolist())


def test_newlines_follow_their_rows_and_other_off_grid_tokens_stay():
    """A LLaVA-Video-like frame (an opening CLS-like row, 2 rows of 4 cells each closed by a newline): the opening
    token always stays; a newline stays when its row keeps a token (salient or merged); neither is scored nor mixed."""
    cells = [(r, c) for r in range(2) for c in range(4)]
    grid = torch.tensor([(-1, -1), *cells[:4], (-1, -1), *cells[4:], (-1, -1)])
    frames, width = 6, grid.shape[0]
    features = torch.randn(frames, width, 12, generator=torch.Generator().manual_seed(4))
    importance = torch.zeros(frames, width)
    importance[:, 1:5] = 1.0  # row 0 holds the salient tokens
    for ratio, retain in ((0.25, 2), (0.5, 4)):  # R = 2: S = 2, C = 0; R = 4: S = 3, C = 1 (one-frame segments)
        _, representative, frame, mix = arrange(features, importance, ratio, grid=grid)
        for t in range(frames):
            mine = (representative[frame == t] % width).tolist()
            on_rows = {int(grid[j, 0]) for j in mine if grid[j, 0] >= 0}
            assert 0 in mine and mine[:3] == [0, 1, 2]  # the CLS row, then the salient tokens of row 0
            assert (5 in mine) == (0 in on_rows) and (10 in mine) == (1 in on_rows)
            assert len([j for j in mine if grid[j, 0] >= 0]) == retain
        off = torch.tensor([t * width + j for t in range(frames) for j in (0, 5, 10)])
        assert torch.equal(mix[:, off].sum(0), torch.isin(off, representative).float())


def test_the_tiny_onevision_model_gets_the_official_tokens_at_their_positions(ov_path, ov_processor, monkeypatch):
    """A 10-frame video on the tiny LLaVA-OneVision (2 x 2 tokens a frame; ratio 0.75: S = 2, C = 1): the LLM gets
    the official output tokens, restated from the embeddings and saliency the strategy got, in prompt order at their
    original positions (gaps kept), with the text and the newline after the video, and generates."""
    seen, arrange_video = [], FastVID.arrange

    def recording(self, video, ratio, config, ctx):
        seen.append((video, ctx["vision_importance"]()[video.visual], ratio))
        return arrange_video(self, video, ratio, config, ctx)

    monkeypatch.setattr(FastVID, "arrange", recording)
    inputs = ov_processor(
        text=ov_chat(ov_processor, "What moves?", kinds=("video",)), videos=[demo_video(10, 64)], return_tensors="pt"
    )
    model = load_model(ov_path, VTRConfig(strategy="fastvid", keep_ratio=0.75), attn_implementation="sdpa")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    ((video, importance, ratio),) = seen
    assert video.shape == (10, 4) and ratio == 0.75
    want = official(video.features, importance, ratio)
    ids = inputs["input_ids"][0]
    placeholders = (ids == model.config.video_token_id).nonzero().reshape(-1)
    text = (ids != model.config.video_token_id).nonzero().reshape(-1)
    expected = sorted([*text.tolist(), int(placeholders[-1]), *(int(video.rows[t, j]) for t, j in want)])
    assert model.vtr_last.kept_index[0].tolist() == expected
    assert model.vtr_conventions().positions == "original"
    stage = model.vtr_last.stages[0]
    assert stage.image_tokens_kept[0] + stage.merged[0] == len(want) + 1 > 10 * 2 + 1
    assert out.shape[1] == ids.numel() + 3
