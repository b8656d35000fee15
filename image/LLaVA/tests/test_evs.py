"""EVS: vLLM's retention rule restated here on hand-built frame sequences, and on the tiny LLaVA-OneVision."""

import pytest
import torch

import llava.vtr.strategy.evs  # noqa: F401 (registers evs)
from llava.vtr import VTRConfig, get_strategy, load_model
from llava_testlib import hand_video, ov_videos


def official_keep(frames, q):
    """vLLM's `compute_retention_mask` restated for a video given as T [N, D] frames at pruning rate q: the sorted
    flat indices kept. K = max(N, int(T N (1 - q))); a token's change is 1 - cosine (norms clamped at 1e-8) to the
    same token of the frame before, 255 in frame 0; the K largest changes, ties to the lower flat index."""
    count, per_frame = len(frames), frames[0].shape[0]
    budget = max(per_frame, int(count * per_frame * (1 - q)))
    ranked = []
    for t, frame in enumerate(frames):
        for i in range(per_frame):
            change = 255.0
            if t:
                a, b = frame[i], frames[t - 1][i]
                change = float(1 - torch.dot(a, b) / (max(a.norm(), 1e-8) * max(b.norm(), 1e-8)))
            ranked.append((-change, t * per_frame + i))
    return sorted(index for _, index in sorted(ranked)[:budget])


def kept(video, ratio):
    """The flat indices EVS keeps of `video`, checking they are all kept as they are, in their original order."""
    mix, representative, frame = get_strategy("evs")().arrange(video, ratio, VTRConfig(strategy="evs"), {}).tensors()
    mix = mix.to_dense()
    assert torch.equal(mix, torch.eye(mix.shape[1])[representative])  # nothing merged
    assert torch.equal(frame, representative // video.shape[1])  # each in its own frame
    assert torch.equal(representative, representative.sort().values)  # original order
    return representative.tolist()


def scene(count, per_frame, dim=6, seed=0):
    """T frames of distinct random tokens (no two changes anywhere near equal)."""
    return torch.randn(count, per_frame, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.7, 1.0])
def test_random_videos_keep_the_official_set(ratio):
    frames = scene(5, 8)
    assert kept(hand_video(frames), ratio) == official_keep(list(frames), 1 - ratio)


def test_a_static_video_keeps_its_first_frame_and_what_moved():
    """Frames 1.. repeat frame 0 except two tokens that change in frame 2 (and stay): with room for 2 tokens over a
    frame (0.34 of 24: 8), EVS keeps frame 0 and those two."""
    frames = scene(1, 6).repeat(4, 1, 1)
    frames[2:, [1, 4]] = scene(1, 2, seed=1)
    got = kept(hand_video(frames), 0.34)
    assert got == official_keep(list(frames), 1 - 0.34) == [0, 1, 2, 3, 4, 5, 13, 16]


def test_a_cut_to_a_new_scene_keeps_the_new_scene_first():
    """Two scenes of two frames each: the cut's frame changes everywhere, the frame after it barely."""
    first, second = scene(1, 5, seed=2), scene(1, 5, seed=3)
    frames = torch.cat([first, first + 1e-3, second, second + 1e-3])
    assert kept(hand_video(frames), 0.5) == list(range(5)) + list(range(10, 15))


def test_the_budget_truncates_in_float64_as_vllm():
    """K = max(N, int(T N (1 - q))) with q = 1 - ratio, one budget for the video: 0.1 of 20 x 50 tokens is
    99.99999999999997 -> 99 (vLLM's --video-pruning-rate 0.9), 1/3 of 24 is 7."""
    frames = scene(20, 50, dim=3)
    assert len(kept(hand_video(frames), 0.1)) == 99
    assert len(kept(hand_video(frames), 0.25)) == 250
    assert len(kept(hand_video(frames[:4, :6]), 1 / 3)) == 7
    assert kept(hand_video(frames), 0.02) == list(range(50))  # the floor: frame 0 alone
    assert kept(hand_video(frames[:1]), 0.1) == list(range(50))  # one frame: nothing pruned


def test_equal_changes_go_to_the_earlier_frame_then_the_earlier_token():
    """Every token turns from e1 to e2 and back: every change is exactly 1; the 3 tokens over frame 0 are frame 1's
    first three."""
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    frames = torch.stack([e1.expand(4, 2), e2.expand(4, 2), e1.expand(4, 2)])
    assert kept(hand_video(frames), 7 / 12) == [0, 1, 2, 3, 4, 5, 6]


def test_row_newlines_are_scored_like_any_token():
    """LLaVA-Video's grid layout (2 rows of 2 + a newline each): the newline vector is the same in every frame, so
    after frame 0 the newlines go first; the token that moved most is kept."""
    frames = scene(3, 6, seed=4)
    frames[:, [2, 5]] = torch.tensor([1.0, 2, 3, 4, 5, 6], dtype=torch.float64)
    grid = torch.tensor([[0, 0], [0, 1], [-1, -1], [1, 0], [1, 1], [-1, -1]])
    got = kept(hand_video(frames, grid), 0.5)
    assert got == official_keep(list(frames), 0.5)
    assert not {8, 11, 14, 17} & set(got)


def test_conventions():
    strategy = get_strategy("evs")
    assert (strategy.positions, strategy.mrope_positions, strategy.requires) == (
        "compact",
        "original",
        ("frames", "visual_grid"),
    )


def video_embeddings(path, inputs):
    """The merged input embeddings of an unpruned run (what EVS scores), read at the language model's input."""
    model = load_model(path, VTRConfig(enabled=False), attn_implementation="sdpa")
    seen = {}
    model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        model(**inputs)
    return seen["embeds"], model.config.video_token_id


def test_on_the_tiny_onevision(ov_path, ov_processor):
    """A padded batch of two 4-frame videos (4 tokens a frame, then the video's one newline): each keeps what vLLM's
    rule (its torch cosine, in the embeddings' dtype) keeps of its embeddings; the newline stays; positions contiguous."""
    inputs = ov_videos(ov_processor)
    embeds, video_token = video_embeddings(ov_path, inputs)
    model = load_model(ov_path, VTRConfig(strategy="evs", keep_ratio=0.5), attn_implementation="sdpa")
    with torch.no_grad():
        model(**inputs)
    stage = model.vtr_last.stages[0]
    for b in range(2):
        where = (inputs["input_ids"][b] == video_token).nonzero().reshape(-1)
        frames = embeds[b, where[:16]].reshape(4, 4, -1)
        change = 1 - torch.nn.functional.cosine_similarity(frames[1:], frames[:-1], dim=-1)
        change = torch.cat([torch.full((1, 4), 255.0), change]).reshape(-1)
        order = sorted(range(16), key=lambda i: (-float(change[i]), i))[:8]
        want = where[sorted(order)].tolist() + [int(where[16])]
        assert stage.kept_positions[b].tolist() == want
        assert stage.merged[b] == 0
    assert stage.layer == 0 and model.vtr_conventions().positions == "compact"
