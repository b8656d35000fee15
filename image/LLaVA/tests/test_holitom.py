"""HoliTom: the official code's math restated here on hand-built frame sequences (segmentation, budget, static
clusters, dynamic top-k, both token orders), the inner merge against a literal run of the stock layers, and the tiny
LLaVA-OneVision end to end."""

import math

import pytest
import torch

import llava.vtr.strategy.holitom  # noqa: F401 (registers holitom)
from llava.vtr import VTRConfig, get_strategy, load_model
from llava.vtr.strategy.video import Video
from llava_testlib import hand_video, ov_videos

# ----------------------------------------------------------------------------- the official math, restated


def official_windows(frames, tau):
    """select_static_windows: dp[i] = max(dp[i-1], max over w = 2..i+1 of dp[i-w] + G[i-w+1, i]), w ascending,
    strict >; G[s, e] = (e - s) x #places alike (cos > tau) between every consecutive pair of [s, e]."""
    count = len(frames)
    alike = [[float(torch.nn.functional.cosine_similarity(frames[t][p], frames[t + 1][p], dim=0)) > tau
              for p in range(len(frames[0]))] for t in range(count - 1)]  # fmt: skip

    def gain(s, e):
        return (e - s) * sum(all(alike[t][p] for t in range(s, e)) for p in range(len(frames[0])))

    dp, prev = [], []
    for i in range(count):
        best, start = (dp[i - 1] if i else 0), i
        for w in range(2, i + 2):
            value = (dp[i - w] if i - w >= 0 else 0) + gain(i - w + 1, i)
            if value > best:
                best, start = value, i - w + 1
        dp.append(best)
        prev.append(start)
    windows, i = [], count - 1
    while i >= 0:
        windows.append((prev[i], i))
        i = prev[i] - 1
    return windows[::-1], dp[-1], alike


def official_clusters(x, count, k, beta):
    """cluster_dpc_knn + merge_tokens_by_clustering (Beta blend) on x [n, d]: [(centre index, token)] by index.
    The official 1e-6 x torch.rand density noise (k = 2 makes every pair of mutual nearest tokens tie) is replaced
    by a fixed order: of equal densities the earlier token is the denser."""
    n, d = x.shape
    dist = [[float((x[i] - x[j]).norm()) / math.sqrt(d) for j in range(n)] for i in range(n)]
    density = [math.exp(-sum(v**2 for v in sorted(row)[:k]) / k) for row in dist]
    top = max(max(row) for row in dist)
    denser = [[density[j] > density[i] or density[j] == density[i] and j < i for j in range(n)] for i in range(n)]
    delta = [min([dist[i][j] for j in range(n) if denser[i][j]] or [top]) for i in range(n)]
    centres = sorted(sorted(range(n), key=lambda i: -delta[i] * density[i])[:count])
    members = {c: [] for c in centres}
    for i in range(n):
        if i not in members:
            members[min(centres, key=lambda c: (dist[i][c], centres.index(c)))].append(i)
    return [(c, beta * x[c] + (1 - beta) * x[members[c]].mean(0) if members[c] else x[c]) for c in centres]


def official_holitom(frames, attention, ratio, width, grid, tau=0.8, beta=0.6, k=7):
    """The reduced video, as [(frame, place or "newline", token)] in order: `frames` [T, N, D] raster order,
    `attention` [T, N]; grid=False: OneVision's one_token order, True: LLaVA-Video's (newline per kept row)."""
    count, places = frames.shape[:2]
    windows, saved, alike = official_windows(frames, tau)
    ratio = min(ratio / ((count * places - saved) / (count * places)), 1)
    out = []
    for s, e in windows:
        static = [p for p in range(places) if e > s and all(alike[t][p] for t in range(s, e))]
        dynamic = [p for p in range(places) if p not in static]
        static_out = []
        if round(len(static) * ratio):
            means = frames[s : e + 1, static].mean(0)
            c = round(len(static) * ratio)
            static_out = [(static[i], token) for i, token in official_clusters(means, c, min(k, c), beta)]
        for t in range(s, e + 1):
            keep = sorted(sorted(dynamic, key=lambda p: -attention[t, p])[: math.ceil(len(dynamic) * ratio)])
            mine = [(p, frames[t, p]) for p in keep]
            if not grid:
                out += [(s, p, x) for p, x in static_out] * (t == s) + [(t, p, x) for p, x in mine]
                continue
            mine = sorted(mine + static_out * (t == s), key=lambda item: item[0])
            for i, (p, x) in enumerate(mine):
                out.append((t, p, x))
                if i + 1 == len(mine) or mine[i + 1][0] // width != p // width:
                    out.append((t, "newline", None))
    return out


# ----------------------------------------------------------------------------- hand-built videos


def holitom_video(frames, width, grid=False, newline=None):
    """A `Video` of `frames` [T, N, D] (raster order, rows of `width`) at rows 10.. of a prompt; grid=True lays each
    frame out as LLaVA-Video does, a newline token (`newline` [D]) after each row."""
    count, places, dim = frames.shape
    rc = torch.stack([torch.arange(places) // width, torch.arange(places) % width], -1)
    if grid:
        rows_of = places // width
        layout = torch.cat(
            [torch.cat([rc[r * width : (r + 1) * width], torch.full((1, 2), -1)]) for r in range(rows_of)]
        )
        feats = torch.cat(
            [
                torch.cat([frames[:, r * width : (r + 1) * width], newline.expand(count, 1, dim)], 1)
                for r in range(rows_of)
            ],
            1,
        )
    else:
        layout, feats = rc, frames
    return hand_video(feats, layout)


def arranged(video, attention, ratio, **cfg):
    """HoliTom's arrangement of `video`: [(frame, place or "newline", token)] as the reference gives it."""
    grid = video.grid[0]
    on = (grid[:, 0] >= 0).nonzero().reshape(-1)
    importance = torch.zeros(video.rows.numel())
    importance[video.visual[:, on].reshape(-1)] = attention.reshape(-1).float()
    config = VTRConfig(strategy="holitom", **cfg)
    ctx = {"vision_importance": lambda: importance}
    mix, representative, frame = get_strategy("holitom")().arrange(video, ratio, config, ctx).tensors()
    mix = mix.to_dense()
    tokens = mix.double() @ video.features.reshape(-1, video.features.shape[-1]).double()
    per_frame = video.shape[1]
    width = int(grid[on, 1].max()) + 1
    out = []
    for f, r, x in zip(frame.tolist(), representative.tolist(), tokens):
        row, col = grid[r % per_frame].tolist()
        out.append((f, "newline" if row < 0 else row * width + col, x))
        if row >= 0:
            assert r // per_frame == f  # a token takes the place of its own frame (a static one: its window's first)
    return out


def assert_same(got, want):
    assert [(f, p) for f, p, _ in got] == [(f, p) for f, p, _ in want]
    for (_, p, x), (_, _, y) in zip(got, want):
        if p != "newline":
            torch.testing.assert_close(x, y.double(), atol=1e-6, rtol=0)  # mix weights are float32


def two_scenes(seed=0):
    """5 frames of 2 x 4 places: frames 0-2 one scene in which place 5 changes every frame, a cut, frames 3-4 another
    scene, still. Attention random."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(8, 16, generator=g, dtype=torch.float64), torch.randn(8, 16, generator=g, dtype=torch.float64)
    frames = torch.stack([a, a, a, b, b]) + 0.01 * torch.randn(5, 8, 16, generator=g, dtype=torch.float64)
    frames[:3, 5] = torch.randn(3, 16, generator=g, dtype=torch.float64)
    return frames, torch.rand(5, 8, generator=g, dtype=torch.float64)


def test_a_cut_opens_a_window_and_still_places_collapse():
    frames, _ = two_scenes()
    windows, saved, _ = official_windows(frames, 0.8)
    assert (windows, saved) == ([(0, 2), (3, 4)], 2 * 7 + 1 * 8)
    from llava.vtr.strategy.holitom import static_windows

    similar = torch.nn.functional.cosine_similarity(frames[:-1], frames[1:], dim=-1) > 0.8
    assert static_windows(similar) == (windows, saved)
    assert static_windows(torch.zeros(0, 8, dtype=torch.bool)) == ([(0, 0)], 0.0)  # one frame


def test_a_longer_window_wins_only_by_saving_more():
    """Place 0 alike in frames 0-2, place 1 in 0-1, place 2 in 1-2: windows [0, 1], [1, 2] and [0, 2] all save 2,
    as much as [0, 1] + frame 2 alone: the first found, [0, 1], stays (strict >)."""
    g = torch.Generator().manual_seed(5)
    frames = torch.randn(3, 4, 64, generator=g, dtype=torch.float64)
    frames[:, 0] = frames[0, 0]
    frames[1, 1], frames[2, 2] = frames[0, 1], frames[1, 2]
    windows = ([(0, 1), (2, 2)], 2)
    assert official_windows(frames, 0.8)[:2] == windows
    from llava.vtr.strategy.holitom import static_windows

    assert static_windows(torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)) == windows
    attention = torch.rand(3, 4, generator=g, dtype=torch.float64)
    assert_same(arranged(holitom_video(frames, 2), attention, 0.5), official_holitom(frames, attention, 0.5, 2, False))


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.6, 1.0])
@pytest.mark.parametrize("grid", [False, True])
def test_two_scenes_equal_the_official_reduction(ratio, grid):
    frames, attention = two_scenes()
    newline = torch.full((16,), 7.0, dtype=torch.float64)
    want = official_holitom(frames, attention, ratio, width=4, grid=grid)
    assert_same(arranged(holitom_video(frames, 4, grid, newline), attention, ratio), want)
    if ratio == 0.3:  # r' = 0.3 x 40 / 18; static 7 -> round(4.67) = 5 and 8 -> round(5.33) = 5; dynamic 3 x ceil(0.67)
        assert sum(p != "newline" for _, p, _ in want) == 5 + 3 + 5


def test_random_videos_equal_the_official_reduction():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(9, 12, generator=g, dtype=torch.float64)
    frames = base + 0.6 * torch.randn(6, 9, 12, generator=g, dtype=torch.float64)  # some places alike, some not
    attention = torch.rand(6, 9, generator=g, dtype=torch.float64)
    for tau in (0.5, 0.8):
        want = official_holitom(frames, attention, 0.25, width=3, grid=False, tau=tau, beta=0.3, k=2)
        got = arranged(
            holitom_video(frames, 3), attention, 0.25, holitom_tau=tau, holitom_beta=0.3, holitom_neighbours=2
        )
        assert_same(got, want)


def test_counts_round_as_the_official_code():
    """2 frames of 8 places, 5 alike: r' = 0.34375 / (11 / 16) = 0.5 exactly; 5 static places give round(2.5) = 2
    clusters (Python rounds half to even), 3 dynamic ones ceil(1.5) = 2 a frame; ties of attention keep the earlier
    places."""
    g = torch.Generator().manual_seed(1)
    frames = torch.randn(1, 8, 6, generator=g, dtype=torch.float64).repeat(2, 1, 1)
    frames[1, 5:] = torch.randn(3, 6, generator=g, dtype=torch.float64)
    got = arranged(holitom_video(frames, 4), torch.ones(2, 8), 0.34375)
    assert [(f, p) for f, p, _ in got][2:] == [(0, 5), (0, 6), (1, 5), (1, 6)]
    assert len(got) == 2 + 2 + 2


def test_singleton_frames_keep_their_top_tokens_in_place_order():
    g = torch.Generator().manual_seed(2)
    frames = torch.randn(3, 6, 64, generator=g, dtype=torch.float64)  # nothing alike: three windows of one frame
    attention = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.3, 0.0], [0.5, 0.4, 0.3, 0.2, 0.1, 0.6], [0, 0, 0, 0, 0, 1.0]])
    got = arranged(holitom_video(frames, 3), attention, 0.5)
    assert [(f, p) for f, p, _ in got] == [(0, 1), (0, 3), (0, 4), (1, 0), (1, 1), (1, 5), (2, 0), (2, 1), (2, 5)]


def test_grid_newlines_close_only_rows_that_kept_a_token():
    g = torch.Generator().manual_seed(4)
    frames = torch.randn(1, 6, 8, generator=g, dtype=torch.float64)  # 3 rows of 2
    attention = torch.tensor([[0.9, 0.8, 0.0, 0.1, 0.2, 0.7]])
    got = arranged(holitom_video(frames, 2, True, torch.zeros(8, dtype=torch.float64)), attention, 0.5)
    assert [p for _, p, _ in got] == [0, 1, "newline", 5, "newline"]


def test_a_cls_row_opening_each_frame_stays_first_in_its_frame():
    """Video-LLaVA's frames open with a CLS row (off the grid, closing no row; no official port): kept as it is,
    ahead of its frame's tokens (in a window's first frame, ahead of the static ones); the rest as without it."""
    frames, attention = two_scenes()
    plain = holitom_video(frames, 4)
    cls = torch.randn(5, 1, 16, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    grid = torch.cat([torch.full((1, 2), -1), plain.grid[0]])
    rows = torch.arange(5 * 9).reshape(5, 9) + 10
    video = Video(rows, rows - 10, torch.cat([cls, frames], 1), grid.expand(5, 9, 2))
    got = arranged(video, attention, 0.3)
    official = official_holitom(frames, attention, 0.3, width=4, grid=False)  # frame by frame, frame 4 empty
    want = [item for f in range(5) for item in [(f, "newline", None)] + [o for o in official if o[0] == f]]
    assert_same(got, want)  # (`arranged` names every token off the grid "newline")
    assert [f for f, p, _ in got if p == "newline"] == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------- configuration


def test_schedule_budget_and_refusals():
    cls = get_strategy("holitom")
    assert cls.schedule_defaults(VTRConfig(strategy="holitom", keep_ratio=0.15), 28) == {
        "prune_layer": [0, 18],
        "keep_ratio": [0.15, 0.5],
    }
    assert cls.schedule_defaults(VTRConfig(strategy="holitom", keep_tokens=9), 4)["prune_layer"] == [0, 3]
    off = VTRConfig(strategy="holitom", keep_ratio=0.15, holitom_inner_ratio=0.0)
    assert cls.schedule_defaults(off, 28) == {"prune_layer": [0]}
    assert cls.schedule_defaults(VTRConfig(strategy="holitom", prune_layer=[0, 10], keep_tokens=9), 28) == {}
    for bad in (dict(prune_layer=0), dict(prune_layer=[0, 10], holitom_layer=12), dict(prune_layer=[2, 10])):
        with pytest.raises(ValueError, match="holitom reduces before the LLM"):
            cls.schedule_defaults(VTRConfig(strategy="holitom", keep_ratio=0.2, **bad), 28)
    with pytest.raises(ValueError, match="one budget"):
        cls.schedule_defaults(VTRConfig(strategy="holitom", prune_layer=[0, 9], keep_ratio=[0.2, 0.3]), 28)
    assert (cls.positions, cls.earlier_cache, cls.needs_attention) == ("compact", "keep", False)


# ----------------------------------------------------------------------------- the tiny LLaVA-OneVision


def holitom_model(path, **cfg):
    return load_model(path, VTRConfig(strategy="holitom", **cfg), attn_implementation="sdpa")


def run_layers(layers, rotary, h, positions, first, last):
    """Stock decoder layers [first, last) on one sample [1, seq, d], causal, at `positions` [1, seq]."""
    seq = h.shape[1]
    mask = torch.zeros(1, 1, seq, seq).masked_fill(~torch.ones(seq, seq, dtype=torch.bool).tril(), -1e30)
    cos, sin = rotary(h, positions)
    for layer in layers[first:last]:
        h = layer(h, attention_mask=mask, position_embeddings=(cos, sin))
    return h, mask, (cos, sin)


def official_inner(h, attention_row, rows, ratio):
    """The official merge before layer K on one sample: `h` [seq, d] entering layer K, `attention_row` [seq] the last
    token's attention in layer K-1 (heads averaged), `rows` the visual rows. Returns the rows kept and the states."""
    count = round(len(rows) * (1 - ratio))
    top = sorted(rows, key=lambda r: -float(attention_row[r]))[:count]
    unit = torch.nn.functional.normalize(h, dim=-1)
    targets = {r: max(top, key=lambda t: float(unit[r] @ unit[t])) for r in rows if r not in top}
    h = h.clone()
    for r in sorted(targets):  # in sequence order, each into its target as it is by then
        h[targets[r]] = (h[targets[r]] + h[r]) / 2
    kept = [i for i in range(h.shape[0]) if i not in targets]
    return kept, h[kept]


@pytest.mark.parametrize("inner_ratio", [0.5, 0.8])
def test_inner_merge_equals_the_official_one_on_the_tiny_onevision(ov_path, ov_processor, ov_stock, inner_ratio):
    """One video prompt: the stock decoder on the stage-0 prompt as the model hands it to layer 0, layer K-1's
    last-row attention (eager, heads averaged), the official merge, layers K.. at the kept tokens' positions: the logits
    equal the pruned prefill's, and the stage record counts what the official code keeps."""
    from llava.vtr.tiny import demo_video
    from llava_testlib import ov_chat

    inputs = ov_processor(
        text=ov_chat(ov_processor, "What moves?", kinds=("video",)), videos=[demo_video(4, 64)], return_tensors="pt"
    )
    # tau 0.999: the tiny video's frames are alike everywhere at the default 0.8; here 15 tokens reach the LLM
    model = holitom_model(ov_path, keep_ratio=1.0, holitom_inner_ratio=inner_ratio, holitom_tau=0.999)
    lm = model.model.language_model
    captured = {}
    hook = lm.layers[0].register_forward_pre_hook(lambda m, a: captured.setdefault("embeds", a[0]))
    with torch.no_grad():
        got = model(**inputs).logits
    hook.remove()
    before, k = model.vtr_last.stages
    assert before.layer == 0 and k.layer == model.vtr_config.prune_layers[1] == 3  # 18 of 28 -> 3 of 4
    stock = ov_stock["eager"].model.language_model
    h = captured["embeds"]
    start = int((inputs["input_ids"][0] == model.config.video_token_id).nonzero()[0])
    rows = list(range(start, start + k.image_tokens_before[0]))  # the reduced video, its newline last
    positions = torch.arange(h.shape[1])[None]
    with torch.no_grad():
        h, mask, rope = run_layers(stock.layers, stock.rotary_emb, h, positions, 0, k.layer - 1)
        layer = stock.layers[k.layer - 1]
        _, weights = layer.self_attn(layer.input_layernorm(h), position_embeddings=rope, attention_mask=mask)
        h = layer(h, attention_mask=mask, position_embeddings=rope)
        kept, states = official_inner(h[0], weights[0, :, -1].mean(0), rows, inner_ratio)
        # the kept tokens keep their positions (the merge leaves gaps), as the official code does
        out, _, _ = run_layers(stock.layers, stock.rotary_emb, states[None], torch.tensor(kept)[None], k.layer, 99)
        want = ov_stock["eager"].lm_head(stock.norm(out))
    assert k.image_tokens_kept[0] + k.merged[0] == round(len(rows) * (1 - inner_ratio))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_a_batch_runs_both_stages_and_decodes(ov_path, ov_processor):
    model = holitom_model(ov_path, keep_ratio=0.5)
    inputs = ov_videos(ov_processor)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    stages = model.vtr_last.stages
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert [s.layer for s in stages] == [0, 3] and stages[0].image_tokens_before == [17, 17]
    for b in range(2):  # the inner merge keeps round(Lv / 2) of what stage 0 handed the LLM (its newline included)
        handed = stages[0].image_tokens_kept[b] + stages[0].merged[b]
        assert stages[1].image_tokens_before[b] == handed
        assert stages[1].image_tokens_kept[b] + stages[1].merged[b] == round(handed / 2)


def test_llava_video_grid_layout_on_the_tiny_checkpoint(tmp_path_factory):
    """LLaVA-Video's layout (average pooling, a newline after each row of each frame): the 4 tiny frames are alike
    everywhere, one window; its 4 static places become 4 clusters at r' = 1 in frame 0's place with a newline after
    each of its 2 rows, frames 1-3 keep nothing (no newline either); the inner merge keeps round(6 / 2)."""
    from llava.vtr import load_processor
    from llava.vtr.tiny import build_tiny_llava_onevision

    path = build_tiny_llava_onevision(tmp_path_factory.mktemp("ov-grid"), newline_position="grid", pool_mode="average")
    model = holitom_model(path, keep_ratio=0.5)
    with torch.no_grad():
        model(**ov_videos(load_processor(path)))
    before, inner = model.vtr_last.stages
    assert before.image_tokens_before == [4 * (4 + 2)] * 2
    assert (before.image_tokens_kept, before.merged) == ([2, 2], [4, 4])  # the newlines kept, the clusters merged
    assert [n + m for n, m in zip(inner.image_tokens_kept, inner.merged)] == [3, 3]


def test_a_prompt_without_a_video_is_left_whole_inside_the_llm_too(ov_path, ov_processor, ov_stock):
    """A video method leaves an image prompt whole: the inner merge as well (the official code would merge the
    image's tokens there)."""
    from llava.vtr.tiny import demo_image
    from llava_testlib import ov_chat

    inputs = ov_processor(text=[ov_chat(ov_processor, kinds=("image",))], images=demo_image(64), return_tensors="pt")
    model = holitom_model(ov_path, keep_ratio=0.5)
    with torch.no_grad():
        got = model(**inputs).logits
    assert [s.merged[0] for s in model.vtr_last.stages] == [0, 0]
    assert model.vtr_last.stages[1].image_tokens_kept == model.vtr_last.stages[1].image_tokens_before
    torch.testing.assert_close(got, ov_stock["eager"](**inputs).logits, atol=1e-5, rtol=0)
