"""FastVID: the arrangement of a video against the official LLaVA-OneVision rules restated from the facts (DySeg,
budgets, salient tokens, density anchors, merging), by hand and on the tiny OneVision model."""

import math

import pytest
import torch

from llava.vtr import VTRConfig, get_strategy, load_model
from llava.vtr.strategy.fastvid import FastVID, official_tree  # registers it
from llava.vtr.strategy.video import Video
from llava.vtr.tiny import demo_video
from llava_testlib import hand_video, ov_chat


def official_budgets(tree, segments, similarity, n, retain, d, p):
    """Per frame ([salient], [anchors]) counts, built as each official tree's loops build them."""
    salient, anchors = [], []
    for segment in segments:
        length = len(segment)
        if tree == "onevision":  # per frame S and C; (C x L) // ceil(L / p) on the anchor frames
            share = int(retain * d)
            salient += [retain - share] * length
            for j in range(length):
                anchors.append((share * length) // ((length + p - 1) // p) if (length - 1 - j) % p == 0 else 0)
            continue
        total = retain * length
        share = int(total * d) if tree == "llava_video" else max(int(total * d), 1)
        if length == 1:
            salient.append(max(total - share, 0))
            anchors.append(share)
            continue
        if tree == "llava_video":
            runs = [1] * length
        else:  # sub-runs: cut where consecutive frames are less than 0.95 similar
            runs, current = [], 1
            for t in segment[:-1]:
                if similarity[t] < 0.95:
                    runs.append(current)
                    current = 0
                current += 1
            runs.append(current)
        slots = len(runs)
        spread = [(total - share) // slots + (1 if i < (total - share) % slots else 0) for i in range(slots)]
        m = (slots + p - 1) // p
        chunks = [share // m + (1 if i < share % m else 0) for i in range(m)]
        placed = []
        for i in range(slots):
            if i % p == 0:
                placed.append(chunks[i // p])
            else:
                placed.append(0)
        placed.reverse()
        for run, s, a in zip(runs, spread, placed):
            if tree == "qwen2_5_vl":
                a = min(a, n // 2)
                s = min(s, n - a)
            salient += [0] * (run - 1) + [max(s, 0)]
            anchors += [0] * (run - 1) + [a]
    return salient, anchors


def official(features, importance, ratio, tree="onevision", c=8, tau=0.9, d=0.4, p=4, beta=0.6, seed=0):
    """The output tokens of one video under the official code of `tree` ("onevision", "llava_video",
    "qwen2_5_vl"), restated from the facts in plain Python (features [T, n, D] of the grid tokens, importance
    [T, n]; float64 but for the density): {(frame, token): value}."""
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
    salient, alloc = official_budgets(tree, segments, s, n, retain, d, p)
    out, rest = {}, []
    for t in range(frames):
        top = sorted(range(n), key=lambda j: (-float(importance[t, j]), j))[: salient[t]]
        out.update({(t, j): features[t, j] for j in top})
        rest.append([j for j in range(n) if j not in top])
    noise = torch.rand((frames, n), generator=torch.Generator().manual_seed(seed)) * 1e-6
    for segment in segments:
        for t in segment:
            m = len(rest[t])
            if alloc[t] == 0 or m == 0:
                continue
            x = features[t, rest[t]].float()  # the density in float32, as theirs
            dist = torch.tensor([[(x[i] - x[j]).norm() / math.sqrt(width) for j in range(m)] for i in range(m)])
            rho = [torch.exp(-(dist[i].sort().values[:4] ** 2).mean()) + noise[t, i] for i in range(m)]
            top = dist.max()
            delta = [min([dist[i, j] for j in range(m) if rho[j] > rho[i]], default=top) for i in range(m)]
            anchors = sorted(range(m), key=lambda i: (-float(delta[i] * rho[i]), i))[: alloc[t]]
            own = [(t, rest[t][a]) for a in (anchors if tree == "onevision" else sorted(anchors))]
            if tree != "onevision":  # the segment's non-salient tokens but this frame's anchors
                pool = [(u, j) for u in segment for j in rest[u] if (u, j) not in own]
            elif alloc[t] == retain - salient[t]:  # a frame whose count is C: its own non-salient tokens
                pool = [(t, j) for j in rest[t]]
            else:
                pool = [(u, j) for u in segment for j in rest[u]]
            members = [[] for _ in own]
            for u, j in pool:
                y = features[u, j]
                cos = [float(y @ features[a] / (y.norm() * features[a].norm())) for a in own]
                members[cos.index(max(cos))].append(y)
            for key, group in zip(own, members):
                w = max(1 / (len(group) + 1), beta)
                mean = torch.stack(group).mean(0) if group else torch.zeros_like(features[key])
                out[key] = w * features[key] + (1 - w) * mean
    return out


SUB_RUNS = [0, 0, 0.5, 0.15, 1.5, 0, 0.5, 0.5, 0, 0, 0.5]  # turns (radians) between 12 frames: see the tests


def square_grid(side: int) -> torch.Tensor:
    return torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)


def arrange(features, importance, ratio, grid=None, mrope=False, **fields):
    """The strategy's arrangement of a hand-built video (frames x tokens at rows 5.. of a prompt; `mrope`: on an
    M-RoPE backbone, position ids [seq, 3]): (values [m, D], representatives [m] flat, frames [m], weights [m,
    frames x tokens])."""
    frames, width, _ = features.shape
    grid = square_grid(math.isqrt(width)) if grid is None else grid
    video = hand_video(features, grid, first_row=5)
    config = VTRConfig(strategy="fastvid", keep_ratio=ratio, **fields)
    length = frames * width + 10
    positions = torch.arange(length)[:, None].expand(-1, 3) if mrope else torch.arange(length)
    ctx = {"vision_importance": lambda: importance.reshape(-1), "position_ids": positions}
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


def drifting(steps, n=16, width=12, jitter=0.3, seed=0):
    """Frames [T, n, width] whose means turn by `steps` (radians) in one plane from each frame to the next, so
    consecutive frames' means have cosine cos(step): shared tokens plus each frame's own jitter, centred, plus
    the frame's mean."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(n, width, generator=generator)
    out, angle = [], 0.0
    for step in [0.0, *steps]:
        angle += step
        tokens = base + jitter * torch.randn(n, width, generator=generator)
        tokens -= tokens.mean(0)
        tokens[:, 0] += math.cos(angle)
        tokens[:, 1] += math.sin(angle)
        out.append(tokens)
    return torch.stack(out)


def with_row_newlines(cells, side: int, seed=0):
    """LLaVA-Video's `grid` layout of frames `cells` [T, side x side, D]: a newline token (one vector) after every
    row of every frame. Returns (features [T, side x (side + 1), D], grid [side x (side + 1), 2])."""
    frames, _, width = cells.shape
    newline = torch.randn(width, generator=torch.Generator().manual_seed(seed))
    rows = cells.reshape(frames, side, side, width)
    features = torch.cat([rows, newline.expand(frames, side, 1, width)], 2).reshape(frames, -1, width)
    layout = [(r, c) if c < side else (-1, -1) for r in range(side) for c in range(side + 1)]
    return features, torch.tensor(layout)


def official_with_newlines(features, importance, ratio, grid, **kw):
    """The official LLaVA-Video output of frames in its `grid` layout (`with_row_newlines`): the grid tokens'
    outputs and, as theirs re-adds them, the newline closing each row that keeps one ((i // W + 1) W - 1 in
    their layout of W = side + 1 tokens a row): {(frame, layout index): value}."""
    cells = (grid[:, 0] >= 0).nonzero().reshape(-1).tolist()
    row = math.isqrt(len(cells)) + 1
    want = official(features[:, cells], importance[:, cells], ratio, tree="llava_video", **kw)
    out = {(t, cells[j]): value for (t, j), value in want.items()}
    for t, j in list(out):
        newline = (j // row + 1) * row - 1
        out[(t, newline)] = features[t, newline].double()
    return out


def restated(fields) -> dict:
    """The `official` keywords of VTRConfig fields."""
    names = {
        "fastvid_segments": "c",
        "fastvid_tau": "tau",
        "fastvid_anchor_share": "d",
        "fastvid_anchor_stride": "p",
        "fastvid_beta": "beta",
        "seed": "seed",
    }
    return {names[k]: v for k, v in fields.items()}


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
    want = official(features, importance, ratio, **restated(fields))
    n = features.shape[1]
    assert [(int(r) // n, int(r) % n) for r in representative] == sorted(want)  # every frame, index order
    assert torch.equal(frame, representative // n)
    torch.testing.assert_close(values.double(), torch.stack([want[k] for k in sorted(want)]), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "lengths, fields, ratio",
    [
        ([1, 5, 6], dict(fastvid_segments=2), 0.5),  # 5 and 6 frames: two anchor frames each, remainders
        ([3, 2], dict(fastvid_segments=1, fastvid_beta=0.3), 0.6),  # beta below 1/2
        ([9], dict(fastvid_segments=1, fastvid_anchor_stride=3, seed=3), 0.25),  # anchors 5, 5, 4 on 8, 5, 2
        ([1] * 8, {}, 0.5),  # one-frame segments: an anchor's own token is not in its pool
    ],
)
def test_frames_with_row_newlines_follow_the_llava_video_tree(lengths, fields, ratio):
    """Frames in LLaVA-Video's layout (a newline closing every row): kept and merged tokens, values and order
    equal the official LLaVA-Video rules restated by hand (per-segment budgets with the remainders handed out, a
    frame's own anchors left out of its pool, anchors in index order), each row's newline kept when its row keeps
    a token."""
    cells = scenes(lengths)
    cells[2, 7] = cells[2, 9]
    features, grid = with_row_newlines(cells, 4)
    importance = torch.rand(features.shape[:2], generator=torch.Generator().manual_seed(1))
    values, representative, frame, _ = arrange(features, importance, ratio, grid=grid, **fields)
    want = official_with_newlines(features, importance, ratio, grid, **restated(fields))
    width = grid.shape[0]
    assert [(int(r) // width, int(r) % width) for r in representative] == sorted(want)
    assert torch.equal(frame, representative // width)
    torch.testing.assert_close(values.double(), torch.stack([want[k] for k in sorted(want)]), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "steps, fields, ratio",
    [
        # segments of 5 and 7 frames, sub-runs [3, 2] and [2, 1, 3, 1]; anchors capped at n // 2
        (SUB_RUNS, dict(fastvid_segments=2, fastvid_tau=0.84, fastvid_anchor_stride=2), 0.5),
        ([0.15] * 7, dict(fastvid_segments=1, fastvid_anchor_share=0.7), 0.75),  # one sub-run: all on frame 7
        ([1.5] * 7, {}, 0.125),  # one-frame segments where int(R d) = 0: one anchor each all the same
        ([0.5, 0.5, 1.5, 0.3, 0.3, 0.3, 0.5], dict(fastvid_segments=2, seed=2), 0.3),  # tau cuts, a 4-frame run
    ],
)
def test_an_mrope_backbone_follows_the_qwen2_5_vl_tree(steps, fields, ratio):
    """On an M-RoPE backbone (position ids [seq, 3]): kept and merged tokens, values and order equal the official
    Qwen2.5-VL rules restated by hand (sub-runs of frames at least 0.95 similar giving their budget to their last
    frame, anchors capped at half a frame, at least one a segment, the LLaVA-Video tree's pools)."""
    features = drifting(steps)
    importance = torch.rand(features.shape[:2], generator=torch.Generator().manual_seed(1))
    values, representative, frame, _ = arrange(features, importance, ratio, mrope=True, **fields)
    want = official(features, importance, ratio, tree="qwen2_5_vl", **restated(fields))
    n = features.shape[1]
    assert [(int(r) // n, int(r) % n) for r in representative] == sorted(want)
    assert torch.equal(frame, representative // n)
    torch.testing.assert_close(values.double(), torch.stack([want[k] for k in sorted(want)]), atol=1e-5, rtol=0)


def test_qwen2_5_vl_budgets_go_to_the_last_frame_of_each_sub_run():
    """16 tokens a frame at ratio 0.5 (R = 8), p = 2. Segment 0..4 (sub-runs 0..2, 3..4): 40 tokens, 16 anchors
    on sub-run 1 capped at 8 (frame 4: 8 salient of its 12, capped at 16 - 8), 12 salient on frame 2. Segment
    5..11 (sub-runs 5..6, 7, 8..10, 11): 22 anchors in slots of 11 on sub-runs 3 and 1, capped at 8; salient
    9, 9, 8, 8 (frame 7 capped at 8). Frames inside a sub-run keep nothing."""
    features = drifting(SUB_RUNS)
    importance = torch.rand(features.shape[:2], generator=torch.Generator().manual_seed(0))
    fields = dict(fastvid_segments=2, fastvid_tau=0.84, fastvid_anchor_stride=2)
    _, representative, *_ = arrange(features, importance, 0.5, mrope=True, **fields)
    assert per_frame(representative, 12, 16) == [0, 0, 12, 0, 16, 0, 9, 16, 0, 0, 8, 16]


def test_llava_video_budgets_hand_out_the_remainders():
    """13 x 13 tokens a frame with row newlines at ratio 0.1: R = 16. Segments of 1, 2, 3, 5 and 8 frames: R L
    tokens, int(R L 0.4) of them anchors: 10 + 6; 20 salient as 10, 10 and 12 anchors on the last; 29 as 10, 10,
    9 and 19; 48 as 10, 10, 10, 9, 9 and 32 as 16 on the last and 16 on the first; 77 as 10 x 5, 9 x 3 and 51 as
    26 on frame 7, 25 on frame 3. Each row that keeps a token keeps its newline."""
    features, grid = with_row_newlines(scenes([1, 2, 3, 5, 8], n=169, width=8, jitter=0.01), 13)
    importance = torch.rand(features.shape[:2], generator=torch.Generator().manual_seed(0))
    _, representative, *_ = arrange(features, importance, 0.1, grid=grid, fastvid_segments=1)
    width = grid.shape[0]
    cells = representative[grid[representative % width, 0] >= 0]
    want = [16, 10, 22, 10, 10, 28, 26, 10, 10, 9, 25, 10, 10, 10, 35, 10, 9, 9, 35]
    assert per_frame(cells, 19, width) == want
    rows = {(int(r) // width, int(grid[r % width, 0])) for r in cells}
    newlines = representative[grid[representative % width, 0] < 0]
    assert sorted((int(r) // width, int(r) % width // 14) for r in newlines) == sorted(rows)


def test_the_tree_follows_the_backbone():
    """Row newlines (LLaVA-Video's layout) pick the LLaVA-Video tree whatever the positions; M-RoPE position ids
    the Qwen2.5-VL tree; else (a plain grid, a newline closing the frame only, Video-LLaVA's CLS row) OneVision's."""
    square = square_grid(2)
    layouts = {
        "plain": square,
        "row newlines": with_row_newlines(torch.zeros(1, 4, 2), 2)[1],
        "frame newline": torch.cat([square, torch.tensor([[-1, -1]])]),
        "CLS row": torch.cat([torch.tensor([[-1, -1]]), square]),
    }
    picked = {}
    for name, grid in layouts.items():
        rows = torch.arange(2 * grid.shape[0]).reshape(2, -1)
        video = Video(rows, rows, torch.zeros(2, grid.shape[0], 4), grid.expand(2, -1, 2))
        for positions in (torch.arange(20), torch.zeros(20, 3, dtype=torch.long)):
            picked[(name, positions.ndim)] = official_tree(video, {"position_ids": positions})
    assert picked == {
        ("plain", 1): "onevision",
        ("plain", 2): "qwen2_5_vl",
        ("row newlines", 1): "llava_video",
        ("row newlines", 2): "llava_video",
        ("frame newline", 1): "onevision",
        ("frame newline", 2): "qwen2_5_vl",
        ("CLS row", 1): "onevision",
        ("CLS row", 2): "qwen2_5_vl",
    }


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


def test_the_tiny_llava_video_layout_gets_the_llava_video_tree(tmp_path_factory, monkeypatch):
    """A 12-frame video on a tiny LLaVA-OneVision checkpoint in LLaVA-Video's layout (average pooling, a newline
    after each of a frame's 2 rows of 2 tokens; ratio 0.5: R = 2): the LLM gets the official LLaVA-Video tree's
    tokens, restated from the embeddings and saliency the strategy got, with their rows' newlines, at their
    original positions, values included. The OneVision tree would merge nothing here (C = int(0.8) = 0)."""
    from llava.vtr import load_processor
    from llava.vtr.tiny import build_tiny_llava_onevision

    seen, arrange_video = [], FastVID.arrange

    def recording(self, video, ratio, config, ctx):
        arrangement = arrange_video(self, video, ratio, config, ctx)
        seen.append((video, ctx["vision_importance"]()[video.visual], arrangement.tensors()))
        return arrangement

    monkeypatch.setattr(FastVID, "arrange", recording)
    path = build_tiny_llava_onevision(tmp_path_factory.mktemp("ov-grid"), newline_position="grid", pool_mode="average")
    processor = load_processor(path)
    inputs = processor(
        text=ov_chat(processor, "What moves?", kinds=("video",)), videos=[demo_video(12, 64)], return_tensors="pt"
    )
    model = load_model(path, VTRConfig(strategy="fastvid", keep_ratio=0.5), attn_implementation="sdpa")
    with torch.no_grad():
        model(**inputs)
    ((video, importance, (mix, representative, _)),) = seen
    grid = video.grid[0]
    assert video.shape == (12, 6) and (grid[:, 0] < 0).sum() == 2
    want = official_with_newlines(video.features.float(), importance.float(), 0.5, grid)
    assert [(int(r) // 6, int(r) % 6) for r in representative] == sorted(want)
    values = mix.to_dense() @ video.features.reshape(12 * 6, -1).float()
    torch.testing.assert_close(values.double(), torch.stack([want[k] for k in sorted(want)]), atol=1e-5, rtol=0)
    ids = inputs["input_ids"][0]
    text = (ids != model.config.video_token_id).nonzero().reshape(-1)
    expected = sorted([*text.tolist(), *(int(video.rows[t, j]) for t, j in want)])
    assert model.vtr_last.kept_index[0].tolist() == expected
    stage = model.vtr_last.stages[0]
    assert stage.merged[0] > 0 and stage.image_tokens_kept[0] + stage.merged[0] == len(want)


def test_fastvid_tree_picks_a_tree_on_any_backbone(tmp_path_factory):
    """`fastvid_tree` overrides the backbone's tree: on LLaVA-Video's layout the OneVision tree merges nothing at
    ratio 0.5 (C = int(0.8) = 0), the LLaVA-Video tree (auto) merges; a name that is no tree is refused."""
    from llava.vtr import load_processor
    from llava.vtr.tiny import build_tiny_llava_onevision

    with pytest.raises(ValueError, match="fastvid_tree='llava' is invalid: choose one of"):
        VTRConfig(strategy="fastvid", fastvid_tree="llava")
    path = build_tiny_llava_onevision(tmp_path_factory.mktemp("ov-grid"), newline_position="grid", pool_mode="average")
    processor = load_processor(path)
    inputs = processor(
        text=ov_chat(processor, "What moves?", kinds=("video",)), videos=[demo_video(12, 64)], return_tensors="pt"
    )
    merged = {}
    for tree in ("auto", "onevision", "llava_video"):
        model = load_model(path, VTRConfig(strategy="fastvid", keep_ratio=0.5, fastvid_tree=tree))
        with torch.no_grad():
            model(**inputs)
        merged[tree] = model.vtr_last.stages[0].merged[0]
    assert merged["auto"] == merged["llava_video"] > 0 and merged["onevision"] == 0
